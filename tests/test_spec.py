import pytest
import yaml

from orchestrator.spec import SpecError, load_spec, parse_spec

BASE = {"name": "s", "workload": "gpt", "steps": 10, "axes": {"lr": [1e-3, 1e-2]}}


def spec(**changes):
    raw = dict(BASE)
    raw.update(changes)
    return parse_spec(raw)


@pytest.mark.parametrize("changes, message", [
    (dict(axes={"stabilizers": ["none", "weyl+magic"]}),
     r"axes.stabilizers\[1\]: unknown stabilizer\(s\) \['magic'\].*allowed: mlra, none, qk_norm, sigma_reparam, weyl"),
    (dict(axes={"lr": [1e-3, -0.1]}), r"axes.lr: -0.1 is not a learning rate; allowed: finite numbers > 0"),
    (dict(axes={"lr": {"log_range": [1e-2, 1e-4], "num": 3}}), r"axes.lr.log_range: \[0.01, 0.0001\] must satisfy 0 < low < high"),
    (dict(axes={"lr": {"log_range": [1e-4, 1e-2]}}), r"axes.lr: .* is not a list or \{log_range: \[low, high\], num: N\} \(Field required\)"),
    (dict(axes={"lr": []}), r"axes.lr: \[\] must be a non-empty list"),
    (dict(learning_rate=0.1), r"learning_rate: unknown key; allowed: axes, boundary, cells, concurrency"),
    (dict(resources={"cpus": 1, "tpus": 4}), r"resources.tpus: unknown key; allowed: cpus, gpus"),
    (dict(resources={"cpus": 0}), r"resources.cpus: 0: Input should be greater than 0"),
    (dict(resources={"gpus": 1.5}), r"resources.gpus: 1.5: .*whole number"),
    (dict(workload="bert"), r"workload: 'bert' is not one of \['gpt', 'vit', 'swin'\]"),
    (dict(steps=0), r"steps: 0: Input should be greater than 0"),
    (dict(fixed={"depht": 4}), r"fixed.depht: unknown or reserved trial field; allowed: .*depth"),
    (dict(fixed={"steps": 4}), r"fixed.steps: .*top-level 'steps'"),
    (dict(fixed={"max_loss_ratio": 3}), r"fixed.max_loss_ratio: .*divergence"),
    (dict(fixed={"lr": 0.1}), r"axes.lr: also set in fixed"),
    (dict(fixed={"width": 30, "heads": 4}), r"fixed.width: 30 must be divisible by heads"),
    (dict(axes={"lr": [1e-3], "depth": [2, 0]}), r"axes.depth: 0 must be an integer >= 1"),
    (dict(divergence={"stop_on": ["nonfinite", "boredom"]}), r"divergence.stop_on: kind\(s\) \['boredom'\] cannot stop .*allowed: \['nonfinite', 'above_initial'\]"),
    (dict(divergence={"stop_on": ["loss_ratio"]}), r"divergence.stop_on: .*loss_ratio is recorded as events but cannot stop"),
    (dict(divergence={"stop_grace": 2}), r"divergence.stop_grace: 2: Input should be less than or equal to 1"),
    (dict(crash=["diverged", "exploded"]), r"crash: \['diverged', 'exploded'\]; allowed: a list of \['degraded', 'collapsed', 'diverged'\]"),
    (dict(crash=[]), r"crash: \[\]; allowed"),
    (dict(degraded_kappa=0), r"degraded_kappa: 0: Input should be greater than 0"),
    (dict(divergence={"spike_ratio": 0.5}), r"divergence.spike_ratio: 0.5: Input should be greater than 1"),
    (dict(name="my sweep!"), r"name: 'my sweep!': String should match pattern"),
    (dict(seeds=2, axes={"lr": [1e-3], "seed": [0, 1]}), r"seeds: give either"),
    (dict(fixed={"data": "digits"}), r"fixed.data: 'digits' is not a source for gpt"),
])
def test_bad_specs_name_field_value_and_allowed(changes, message):
    with pytest.raises(SpecError, match=message):
        spec(**changes)


def test_grid_expansion_log_range_seeds_and_stabilizer_combinations():
    s = spec(axes={"lr": {"log_range": [1e-4, 1e-1], "num": 4},
                   "stabilizers": ["none", "weyl", "weyl+qk_norm", ["sigma_reparam", "mlra"]]},
             seeds=2, resources={"cpus": 2, "gpus": 0})
    trials = s.trials()
    assert len(trials) == 4 * 4 * 2
    assert sorted({t.lr for t in trials}) == [1e-4, 1e-3, 1e-2, 1e-1]
    assert {t.stabilizer_label for t in trials} == {"none", "weyl", "qk_norm+weyl", "mlra+sigma_reparam"}
    assert {t.seed for t in trials} == {0, 1}
    assert all(t.threads == 2 and t.device == "cpu" and t.steps == 10 for t in trials)


def test_shipped_specs_are_valid():
    from pathlib import Path

    paths = sorted(Path(__file__).parent.parent.joinpath("search_spaces").glob("*.yaml"))
    assert {p.stem for p in paths} >= {"smoke", "gpt_warmup_ablation", "vit_ablation", "swin_ablation"}
    from orchestrator.boundary_config import boundary_config

    for p in paths:
        s = load_spec(p)
        assert s.trials(), p
        if s.boundary:
            boundary_config(s)


def test_load_spec_file_errors(tmp_path):
    with pytest.raises(SpecError, match="no such file"):
        load_spec(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed")
    with pytest.raises(SpecError, match="not valid YAML"):
        load_spec(bad)
    bad.write_text(yaml.safe_dump([1, 2]))
    with pytest.raises(SpecError, match="a spec is a YAML mapping"):
        load_spec(bad)


def test_unreadable_specs_are_one_line_errors(tmp_path):
    """Not YAML, binary, a folder: one SpecError line each (the CLI's exit 2), never a traceback."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nworkload: gpt\n  steps: [10\n")
    with pytest.raises(SpecError) as e:
        load_spec(bad)
    assert str(e.value) == f"spec: {str(bad)!r} is not valid YAML at line 3, column 8: mapping values are not allowed here"
    bad.write_bytes(bytes(range(256)))
    with pytest.raises(SpecError, match=r"is not a text file \(byte 0x80 at offset 128 is not UTF-8\)"):
        load_spec(bad)
    bad.write_bytes(b"name: x\x00\x00")
    with pytest.raises(SpecError, match="is not a text file \\(it holds NUL bytes\\)"):
        load_spec(bad)
    with pytest.raises(SpecError, match="is not a file"):
        load_spec(tmp_path)


def test_log_range_num_is_counted_before_it_is_expanded():
    """A log_range's num counts towards max_trials before its values are built: 1e8 points are
    refused at once (building them first took 31 s for 1e6 and would exhaust memory at 1e8)."""
    raw = {"name": "n", "workload": "gpt", "steps": 5, "axes": {"lr": {"log_range": [1e-4, 1.0], "num": 100_000_000}}}
    with pytest.raises(SpecError, match=r"the grid has 100,000,000 trials \(lr: 100,000,000\), above max_trials 10,000"):
        parse_spec(raw)
    with pytest.raises(SpecError, match=r"the grid has 20,000 trials \(lr: 2,000 x seeds: 10\)"):
        parse_spec({**raw, "axes": {"lr": {"log_range": [1e-4, 1.0], "num": 2000}}, "seeds": 10})
    with pytest.raises(SpecError, match=r"axes.lr.log_range: \[1.0, 0.1\] must satisfy 0 < low < high"):
        parse_spec({**raw, "axes": {"lr": {"log_range": [1.0, 0.1], "num": 3}}})
    assert len(parse_spec({**raw, "axes": {"lr": {"log_range": [1e-4, 1.0], "num": 5}}}).trials()) == 5


def test_spec_names_the_workloads_without_importing_them():
    from workloads.models import WORKLOADS
    from orchestrator import spec

    assert spec.WORKLOADS == WORKLOADS


_NO_TORCH = """
import sys, time
t0 = time.perf_counter()
from orchestrator.boundary_config import boundary_config
from orchestrator.cli import app
from orchestrator.preflight import plan
from orchestrator.spec import SpecError, load_spec
p = plan(sys.argv[1], "boundary")
assert len(p.spec.trials()) == 4 and p.cells == 4, p.cells
for bad in sys.argv[2:]:
    try:
        boundary_config(load_spec(bad))
    except SpecError as e:
        print("REFUSED", e)
print("SECONDS", time.perf_counter() - t0)
print("HEAVY", sorted(m for m in ("torch", "ray", "mlflow", "optuna", "timm", "pyarrow") if m in sys.modules))
"""


def test_validation_imports_no_torch(tmp_path):
    """Issue #32: a spec is validated, its trials built and its data sources checked (what ``ablate
    check``, ``sweep`` and ``boundary`` do before anything starts) without torch, Ray or MLflow:
    a refusal comes in a fraction of a second. A fresh interpreter, as the command line is."""
    import subprocess
    import sys

    good = dict(BASE, axes={"stabilizers": ["none", "weyl+qk_norm"], "warmup_steps": [0, 10]},
                boundary={"lr_range": [1e-3, 1.0]}, fixed={"data": "stdlib", "weight_decay": 0.01})
    (tmp_path / "good.yaml").write_text(yaml.safe_dump(good))
    bad = dict(good, boundary={"lr_range": [1e-3, float("inf")]})
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(bad))
    out = subprocess.run([sys.executable, "-c", _NO_TORCH, str(tmp_path / "good.yaml"), str(tmp_path / "bad.yaml")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = dict(ln.split(" ", 1) for ln in out.stdout.splitlines())
    assert lines["HEAVY"] == "[]", lines
    assert lines["REFUSED"] == "boundary.lr_range[1]: inf: Input should be a finite number"
    # and the public names still lead to the implementations (imported on first use)
    from workloads.stabilizers import REGISTRY, WeylAdamW
    from workloads.trial import TrialConfig
    import workloads.config

    assert TrialConfig is workloads.config.TrialConfig and REGISTRY["weyl"].optimizer == WeylAdamW.__name__


_INF = ".inf"


@pytest.mark.parametrize("text, message", [
    # the boundary block, every numeric key
    ("boundary: {lr_range: [1.0e-3, .inf]}", r"boundary.lr_range\[1\]: inf: Input should be a finite number"),
    ("boundary: {lr_range: [.nan, 1.0]}", r"boundary.lr_range\[0\]: nan: Input should be a finite number"),
    ("boundary: {lr_range: [-.inf, 1.0]}", r"boundary.lr_range\[0\]: -inf: Input should be a finite number"),
    ("boundary: {lr_range: [1.0e-3, 1.0], resolution: .inf}", r"boundary.resolution: inf: Input should be a finite"),
    ("boundary: {lr_range: [1.0e-3, 1.0], resolution: .nan}", r"boundary.resolution: nan: Input should be a finite"),
    ("boundary: {lr_range: [1.0e-3, 1.0], max_trials_per_cell: .inf}",
     r"boundary.max_trials_per_cell: inf: Input should be a finite number"),
    ("boundary: {lr_range: [1.0e-3, 1.0], min_trials_per_cell: .nan}",
     r"boundary.min_trials_per_cell: nan: Input should be a finite number"),
    ("boundary: {lr_range: [1.0e-3, 1.0], max_in_flight_per_cell: .inf}",
     r"boundary.max_in_flight_per_cell: inf: Input should be a finite number"),
    ("boundary: {method: bisect, lr_range: [1.0e-3, 1.0], seeds: .inf}",
     r"boundary.seeds: inf: Input should be a finite number"),
])
def test_every_boundary_number_refuses_non_finite_values(text, message):
    from orchestrator.boundary_config import boundary_config

    raw = yaml.safe_load("name: b\nworkload: gpt\nsteps: 10\naxes: {stabilizers: [none]}\n" + text)
    with pytest.raises(SpecError, match=message):
        boundary_config(parse_spec(raw))


@pytest.mark.parametrize("text, message", [
    ("resources: {cpus: .inf}", r"resources.cpus: inf: Input should be a finite number"),
    ("resources: {gpus: .inf}", r"resources.gpus: inf: Input should be a finite number"),
    ("degraded_kappa: .nan", r"degraded_kappa: nan: Input should be a finite number"),
    ("steps: .inf", r"steps: inf: Input should be a finite number"),
    ("divergence: {max_loss_ratio: .inf}", r"divergence.max_loss_ratio: inf: Input should be a finite number"),
    ("divergence: {stop_margin: .nan}", r"divergence.stop_margin: nan: Input should be a finite number"),
    ("fixed: {weight_decay: .inf}", r"fixed.weight_decay: inf is not a finite number; allowed: finite numbers"),
    ("fixed: {beta2: .nan}", r"fixed.beta2: nan is not a finite number"),
    ("fixed: {min_lr_ratio: inf}", r"fixed.min_lr_ratio: inf is not a finite number"),  # a string, as YAML reads it
    ("fixed: {stabilizer_options: {weyl: {tau: .inf}}}", r"stabilizer_options.weyl.tau: inf must be a finite number"),
    ("axes: {lr: [1.0e-3, .nan]}", r"axes.lr: nan is not a finite number"),
    ("axes: {lr: {log_range: [1.0e-3, .inf], num: 3}}", r"axes.lr: .* \(Input should be a finite number\)"),
    ("axes: {mlp_ratio: [4.0, .inf]}", r"axes.mlp_ratio: inf is not a finite number"),
])
def test_numeric_spec_fields_refuse_non_finite_values(text, message):
    raw = yaml.safe_load("name: b\nworkload: gpt\nsteps: 10\n" + text)
    raw.setdefault("axes", {"lr": [1e-3]})
    with pytest.raises(SpecError, match=message):
        parse_spec(raw)


def test_cells_are_explicit_combinations_each_with_every_axis_combination():
    s = spec(axes={"lr": [1e-3, 1e-2]}, seeds=2,
             cells=[{"stabilizers": "none", "depth": 4}, {"stabilizers": "weyl", "depth": 2}])
    got = [(t.stabilizer_label, t.depth, t.lr, t.seed) for t in s.trials()]
    assert got == [(st, d, lr, seed) for st, d in (("none", 4), ("weyl", 2))
                   for lr in (1e-3, 1e-2) for seed in (0, 1)]
    assert s.grid_size() == len(got) == 8
    assert s.swept == ["stabilizers", "depth", "lr"]


@pytest.mark.parametrize("cells, message", [
    ([{"stabilizers": "none", "depth": 4}, {"stabilizers": "weyl"}], r"cells\[1\]: sets \['stabilizers'\], cells\[0\] sets"),
    ([{"stabilizers": "none"}, {"stabilizers": "none"}], r"cells\[1\]: .* is the same cell as cells\[0\]"),
    ([{"lr": 0.1}], r"cells.lr: also set in axes"),
    ([{"depht": 4}], r"cells.depht: unknown or reserved trial field"),
    ([{"stabilizers": "wyel"}], r"cells\[0\].stabilizers: unknown stabilizer"),
    ([{"depth": 0}], r"cells.depth: 0 must be an integer >= 1"),
    ({"depth": 4}, r"cells: .* must be a list of mappings"),
])
def test_bad_cells_name_the_cell_and_field(cells, message):
    with pytest.raises(SpecError, match=message):
        spec(cells=cells)


def test_boundary_cells_are_the_spec_cells_with_the_axes():
    from orchestrator.boundary import cells_of
    from orchestrator.boundary_config import boundary_config

    s = parse_spec({"name": "b", "workload": "gpt", "steps": 5, "axes": {"warmup_steps": [0, 1]},
                    "cells": [{"stabilizers": "none", "depth": 2}, {"stabilizers": "qk_norm", "depth": 1}],
                    "boundary": {"lr_range": [1e-3, 1.0]}})
    cells = cells_of(s, boundary_config(s))
    assert [c.key for c in cells] == ["stabilizers=none depth=2 warmup_steps=0", "stabilizers=none depth=2 warmup_steps=1",
                                      "stabilizers=qk_norm depth=1 warmup_steps=0", "stabilizers=qk_norm depth=1 warmup_steps=1"]
    with pytest.raises(SpecError, match=r"cells.lr: not allowed in a boundary search"):
        boundary_config(parse_spec({"name": "b", "workload": "gpt", "steps": 5, "cells": [{"lr": 0.1}],
                                    "boundary": {"lr_range": [1e-3, 1.0]}}))
