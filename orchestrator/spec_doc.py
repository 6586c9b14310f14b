"""The sweep-spec reference (``docs/spec.md``), generated from the models that validate a spec.

Every key of a spec, with its type, default, allowed values and one line of meaning, read from:
``orchestrator.spec`` (``SweepSpec`` and its blocks ``Resources``, ``Divergence``, ``LogRange``:
pydantic models whose attribute docstrings are their descriptions), ``orchestrator.boundary``
(``BoundaryConfig``, the ``boundary:`` block) and ``workloads.config.TrialConfig`` (the fields of
``fixed:`` and ``axes:``; meanings from ``field_help()``, the fields' metadata that is also the
``python -m workloads.trial`` help; allowed values from ``field_choices()`` and from what
``TrialConfig`` itself accepts, probed). The
output depends on nothing but the code, so it is the same on every run:

    python docs/gen_spec_reference.py            # rewrite docs/spec.md
    python docs/gen_spec_reference.py --check    # exit 1 when docs/spec.md is stale (a test runs it)
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any

from pydantic import BaseModel

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "docs" / "spec.md"
NO_MEANING = "(undocumented: add a docstring under the field)"

BOUNDARY_HELP = {
    # used where a BoundaryConfig field has no docstring of its own
    "lr_range": "[low, high], 0 < low < high: the learning rates searched, in log space (required)",
    "resolution": "a cell has converged when its bracket's crash LR / stable LR is at most this",
    "max_trials_per_cell": "a cell's budget of trials (seeds included): its search stops there, converged or not",
    "seeds": "seeds run at both ends of a cell's final bracket; seeds vote per LR, a tie is a crash",
    "max_in_flight_per_cell": "a cell's trials running at once",
}
SPEC_HELP = {
    # where the ``python -m workloads.trial`` help speaks of the command line, what a spec writes
    "stabilizer_options": "per-stabilizer options, a mapping: {weyl: {tau: 0.05}, mlra: {rank: 4}}",
    "stop_on": "event kinds that stop the run",
}
BOUNDARY_SKIP = ("crash", "kappa", "seed_offset")
"""BoundaryConfig fields that are not keys of the block (set from the spec's top-level keys)."""


# ------------------------------------------------------------------------------- formatting
def _type(t: Any) -> str:
    origin, args = typing.get_origin(t), typing.get_args(t)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        return " or ".join(_type(a) for a in inner) + (" or null" if len(inner) < len(args) else "")
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"list of {_type(args[0])}"
        return "[" + ", ".join(_type(a) for a in args) + "]"
    if origin in (list, typing.List):  # noqa: UP006
        return f"list of {_type(args[0])}" if args else "list"
    if origin in (dict, typing.Mapping) or (origin is not None and getattr(origin, "__name__", "") == "Mapping"):
        return "mapping"
    if isinstance(t, type) and issubclass(t, BaseModel):
        return "block"
    if t is Any:
        return "any"
    return getattr(t, "__name__", str(t))


def _value(v: Any) -> str:
    """A default as one would write it in YAML."""
    if v is None:
        return "null"
    if v == "":
        return '""'
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, (tuple, list)):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k}: {_value(x)}" for k, x in v.items()) + "}"
    if isinstance(v, BaseModel):
        return "see below"
    return str(v)


def _cell(text: str) -> str:
    """One table cell: one line, ``|`` escaped, ``*`` escaped outside code spans."""
    parts = " ".join(str(text).split()).replace("|", "\\|").split("`")
    return "`".join(p if i % 2 else p.replace("*", "\\*") for i, p in enumerate(parts))


def _constraints(field) -> list[str]:
    out = []
    for m in field.metadata:
        for attr, op in (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<=")):
            if getattr(m, attr, None) is not None:
                out.append(f"{op} {_value(getattr(m, attr))}")
        if getattr(m, "max_length", None) is not None:
            out.append(f"at most {m.max_length} characters")
        if getattr(m, "pattern", None):
            out.append(f"matches `{m.pattern}`")
    return out


def _table(rows: list[tuple[str, str, str, str, str]]) -> list[str]:
    out = ["| key | type | default | allowed | meaning |", "| --- | --- | --- | --- | --- |"]
    out += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return out


def _model_rows(model: type[BaseModel], prefix: str = "", allowed: dict[str, str] | None = None,
                help_: dict[str, str] | None = None, skip=()) -> list[tuple[str, str, str, str, str]]:
    rows = []
    for name, f in model.model_fields.items():
        if name in skip:
            continue
        default = "required" if f.is_required() else _value(f.get_default(call_default_factory=True))
        allow = "; ".join([*(allowed or {}).get(name, "").split("; ")] + _constraints(f)).strip("; ")
        meaning = f.description or SPEC_HELP.get(name) or (help_ or {}).get(name) or NO_MEANING
        rows.append((f"`{prefix}{name}`", _type(f.annotation), default, allow, meaning))
    return rows


# ------------------------------------------------------------------------- the trial fields
def _probe(field: str, value: Any) -> bool:
    """Whether TrialConfig accepts ``value`` for ``field`` (the other fields at their defaults)."""
    from workloads.config import ConfigError, TrialConfig

    try:
        TrialConfig(**{field: value})
    except (ConfigError, TypeError, ValueError):
        return False
    return True


def _trial_allowed(f: dataclasses.Field, hint: Any) -> str:
    from workloads.config import field_choices
    from workloads.stabilizers import REGISTRY

    choices = field_choices()
    if f.name in choices:
        return ", ".join(str(c) for c in choices[f.name])
    if f.name == "stabilizers":
        return ", ".join(sorted(REGISTRY)) + " (combine with `+`: `weyl+qk_norm`)"
    if f.name == "device":
        return "auto, cpu, cuda, cuda:N"
    base = next((a for a in typing.get_args(hint) if a is not type(None)), hint)
    if base is int and f.name != "vocab_size":
        return ">= 1" if not _probe(f.name, 0) else ">= 0" if not _probe(f.name, -1) else ""
    if base is float:
        parts = ["> 0" if not _probe(f.name, 0.0) else ">= 0" if not _probe(f.name, -1e-3) else ""]
        if _probe(f.name, 0.5) and not _probe(f.name, 1.0):
            parts.append("< 1")
        return ", ".join(p for p in parts if p)
    return ""


def _trial_rows() -> list[tuple[str, str, str, str, str]]:
    from orchestrator.spec import DIVERGENCE_FIELDS, RESERVED
    from workloads.config import TrialConfig, field_help

    meanings = field_help()
    hints = typing.get_type_hints(TrialConfig)
    rows = []
    for f in dataclasses.fields(TrialConfig):
        if f.name in RESERVED or f.name in DIVERGENCE_FIELDS:
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        help_ = SPEC_HELP.get(f.name) or meanings.get(f.name, NO_MEANING).replace("--", "")
        rows.append((f"`{f.name}`", _type(hints[f.name]), _value(default), _trial_allowed(f, hints[f.name]), help_))
    return rows


def results_defaults() -> list[str]:
    """The trial defaults that change results, in words (also named in docs/sweeps.md)."""
    from workloads.config import TrialConfig

    d = TrialConfig()
    return [
        f"`schedule: {d.schedule}`: after the warmup the LR decays along a cosine to `min_lr_ratio: "
        f"{d.min_lr_ratio:g}` x `lr` ({d.min_lr_ratio:.0%} of the peak LR) at the last step; `constant` keeps "
        "the peak LR",
        f"`warmup_steps: {d.warmup_steps}`: no warmup (with N > 0 the LR ramps up linearly to `lr` over the "
        "first N steps)",
        f"`eval_batches: {d.eval_batches}` validation batches per validation loss, every `eval_interval: "
        f"{d.eval_interval}` steps and at the end: the final loss that classes a run is measured on them",
        f"`probe_interval: {d.probe_interval}`: steps between stability probes (forensics sees the probes at "
        "this resolution)",
        f"`weight_decay: {d.weight_decay:g}` (matrices only), `beta2: {d.beta2:g}`, `grad_clip: {d.grad_clip:g}` "
        "(off, so that instabilities are not masked)",
    ]


# ---------------------------------------------------------------------------------- render
def render() -> str:
    from orchestrator.boundary_config import BoundaryConfig
    from orchestrator.spec import Divergence, LogRange, Resources, SweepSpec
    from workloads.config import field_help
    from workloads.divergence import STOP_KINDS
    from workloads.models import WORKLOADS
    from workloads.outcome import CLASSES

    top_allowed = {"workload": ", ".join(WORKLOADS),
                   "crash": "a list of " + ", ".join(c for c in CLASSES if c != "stable")}
    out = [
        "# Sweep spec reference",
        "",
        "<!-- generated by `python docs/gen_spec_reference.py` from the spec models (orchestrator/spec.py, "
        "orchestrator/boundary_config.py, workloads/config.py); do not edit by hand: a test compares this file with "
        "the generator's output -->",
        "",
        "A spec is a YAML mapping; `ablate sweep SPEC` runs its grid, `ablate boundary SPEC` searches its "
        "cells' crash boundary. Unknown keys are refused, naming the key and what is allowed. Numbers: YAML 1.1 "
        "(PyYAML) reads `1e-3` as a string: write `1.0e-3` (a numeric string is accepted wherever a trial field "
        "is a float).",
        "",
        "```yaml",
        "name: warmup-depth                # MLflow parent run, Tune experiment folder",
        "workload: gpt",
        "steps: 1000",
        "fixed: {width: 256, heads: 4, seq_len: 128, schedule: cosine}",
        "axes:",
        "  lr: {log_range: [1.0e-4, 1.0], num: 9}",
        "  warmup_steps: [0, 50]",
        "  depth: [2, 4]",
        "  stabilizers: [none, qk_norm, weyl+qk_norm]",
        "seeds: 2",
        "resources: {cpus: 1, gpus: 0.25}",
        "boundary: {lr_range: [1.0e-4, 1.0]}   # only for ablate boundary",
        "```",
        "",
        "## Top-level keys",
        "",
        *_table(_model_rows(SweepSpec, allowed=top_allowed)),
        "",
        "## `resources:`",
        "",
        *_table(_model_rows(Resources, "resources.")),
        "",
        "## `divergence:`",
        "",
        "Events are recorded and never stop a run; early stopping (`stop_on`) only saves compute "
        "([classes.md](classes.md#early-stopping)).",
        "",
        *_table(_model_rows(Divergence, "divergence.", allowed={"stop_on": "a list of " + ", ".join(STOP_KINDS)
                                                                + " (must include nonfinite)"},
                            help_=field_help())),
        "",
        "## `boundary:` (ablate boundary)",
        "",
        "Which classes count as a crash is the top-level `crash:` (and `degraded_kappa:`), not a key of this block.",
        "",
        *_table(_model_rows(BoundaryConfig, "boundary.", help_=BOUNDARY_HELP, skip=BOUNDARY_SKIP)),
        "",
        "## An axis's values",
        "",
        "An axis is a list of values (`[0, 50]`), or a log-spaced range:",
        "",
        *_table(_model_rows(LogRange, "axes.<field>.")),
        "",
        "## Trial fields (`fixed:` and `axes:`)",
        "",
        "Any of these under `fixed:` (one value) or `axes:` (swept). `workload`, `steps` and the "
        "`divergence:` keys are set by their own keys; the torch threads by `resources.cpus`.",
        "",
        *_table(_trial_rows()),
        "",
        "### Defaults that change results",
        "",
        "Left out of a spec, these defaults decide what a run measures:",
        "",
        *[f"- {line}" for line in results_defaults()],
        "",
    ]
    return "\n".join(out)


def main(argv: list[str]) -> int:
    import sys

    text = render()
    if "--check" in argv:
        if not OUT.is_file() or OUT.read_text() != text:
            print(f"{OUT.relative_to(ROOT)} differs from the spec models; run: python docs/gen_spec_reference.py",
                  file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text)
    print(f"wrote {OUT.relative_to(ROOT)}")
    return 0
