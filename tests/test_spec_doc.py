"""docs/spec.md is what the generator writes from the spec models, names every key, and its
example is a valid spec; the README and docs/sweeps.md link it, and docs/sweeps.md names the defaults
that change results."""

import dataclasses
import re
import subprocess
import sys
from pathlib import Path

import yaml

from orchestrator.boundary_config import BoundaryConfig
from orchestrator.spec import DIVERGENCE_FIELDS, RESERVED, Divergence, LogRange, Resources, SweepSpec, parse_spec
from orchestrator.spec_doc import BOUNDARY_SKIP, NO_MEANING, OUT, render, results_defaults
from workloads.config import SCHEDULES
from workloads.trial import TrialConfig

ROOT = Path(__file__).resolve().parent.parent


def test_docs_spec_md_is_the_generators_output():
    res = subprocess.run([sys.executable, str(ROOT / "docs" / "gen_spec_reference.py"), "--check"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert render() == render() == OUT.read_text()


def rows_of(text: str) -> dict[str, list[str]]:
    """Table rows by key: {'`resources.cpus`': [type, default, allowed, meaning]}."""
    out = {}
    for line in text.splitlines():
        if line.startswith("| `"):
            cells = [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]
            out[cells[0]] = cells[1:]
    return out


def test_every_key_is_listed_with_a_meaning():
    rows = rows_of(render())
    keys = ([f"`{k}`" for k in SweepSpec.model_fields] + [f"`resources.{k}`" for k in Resources.model_fields]
            + [f"`divergence.{k}`" for k in Divergence.model_fields]
            + [f"`axes.<field>.{k}`" for k in LogRange.model_fields]
            + [f"`{f.name}`" for f in dataclasses.fields(TrialConfig)
               if f.name not in RESERVED and f.name not in DIVERGENCE_FIELDS])
    boundary = [f"`boundary.{k}`" for k in BoundaryConfig.model_fields if k not in BOUNDARY_SKIP]
    assert set(keys + boundary) == set(rows), sorted(set(keys + boundary) ^ set(rows))
    undocumented = [k for k in keys if rows[k][3] == NO_MEANING or not rows[k][3]]
    assert not undocumented
    assert "`boundary.crash`" not in rows and "`boundary.lr_range`" in rows
    # types, defaults and allowed values come from the models
    assert rows["`schedule`"][:3] == ["str", "cosine", ", ".join(SCHEDULES)]
    assert rows["`steps`"][1:3] == ["required", "> 0"] and rows["`seeds`"][1:3] == ["1", ">= 1"]
    assert rows["`crash`"][1] == "[diverged, collapsed]" and "degraded" in rows["`crash`"][2]
    assert rows["`depth`"][2] == ">= 1" and rows["`warmup_steps`"][2] == ">= 0" and rows["`beta2`"][2] == ">= 0, < 1"
    assert rows["`boundary.resolution`"][1:3] == ["null", "> 1"] and "1.5" in rows["`boundary.resolution`"][3]


def test_the_example_spec_in_the_reference_is_valid():
    example = re.search(r"```yaml\n(.*?)```", OUT.read_text(), re.S).group(1)
    spec = parse_spec(yaml.safe_load(example))
    assert set(spec.axes) == {"lr", "warmup_steps", "depth", "stabilizers"} and spec.boundary


def test_the_docs_link_the_reference_and_name_the_defaults_that_change_results():
    assert "[docs/spec.md](docs/spec.md)" in (ROOT / "README.md").read_text()
    sweeps = (ROOT / "docs" / "sweeps.md").read_text()
    assert "[spec.md](spec.md)" in sweeps
    d = TrialConfig()
    for text in (f"`schedule: {d.schedule}`", f"`min_lr_ratio: {d.min_lr_ratio:g}`",
                 f"`warmup_steps: {d.warmup_steps}`",
                 f"`eval_batches: {d.eval_batches}`", f"`eval_interval: {d.eval_interval}`",
                 f"`probe_interval: {d.probe_interval}`"):
        assert text in sweeps, text
        assert any(text in line for line in results_defaults()), text
