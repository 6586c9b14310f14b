"""The published directions on the crash boundary (issue 30), from one exported boundary search
(``search_spaces/directions.yaml``; ``ablate export`` wrote ``boundary.parquet`` and
``trials.parquet``): for each claim, the two cells it compares, their LR50 with its 90 % interval,
the LR50 ratio and a verdict from the intervals alone (:func:`verdict`): *reproduced* where they are
disjoint in the claimed direction, *reversed* where they are disjoint the other way, *not resolved
at this size* where they overlap (not distinguishable: never a ranking). Then Zhai et al.'s
mechanism: the minimum attention entropy at the end of the runs near each cell's LR50 (within x1.5),
``last/attn_entropy/min`` of the trials table (the last value of MLflow's ``attn_entropy/min``, the
smallest per-head entropy over the layers, ``workloads/probes.py``), with run counts.

    python docs/directions.py docs/results/directions --out docs/results/directions/contrasts.md
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))  # the repo root, for workloads
from compare_boundaries import cell_text, interval, overlap  # noqa: E402  (docs/ holds scripts, not a package)

from workloads.divergence import DivergenceConfig  # noqa: E402


@dataclass(frozen=True)
class Claim:
    """``cell`` against ``reference`` (each ``(stabilizer, warmup_steps, depth)``); ``higher``: the
    paper says ``cell``'s LR50 lies above the reference's (False: below)."""

    source: str
    text: str
    reference: tuple[str, int, int]
    cell: tuple[str, int, int]
    higher: bool


WARMUP = 75  # 25 % of directions.yaml's 300 steps
CLAIMS = [
    Claim("Wortsman et al. 2023", "warmup raises LR50 (lowers LR sensitivity)", ("none", 0, 2), ("none", WARMUP, 2), True),
    Claim("Wortsman et al. 2023", "a deeper model crashes at a lower LR", ("none", 0, 2), ("none", 0, 4), False),
    Claim("Wortsman et al. 2023", "qk-layernorm widens the stable LR range", ("none", 0, 2), ("qk_norm", 0, 2), True),
    Claim("Zhai et al. 2023", "sigmaReparam trains without warmup where the baseline fails",
          ("none", 0, 2), ("sigma_reparam", 0, 2), True),
    Claim("Qi et al. 2025", "Weyl without warmup trains where AdamW without warmup fails",
          ("none", 0, 2), ("weyl", 0, 2), True),
    Claim("Qi et al. 2025", "Weyl without warmup trains where AdamW needs warmup (LR50 at least AdamW's with it)",
          ("none", WARMUP, 2), ("weyl", 0, 2), True),
]
ENTROPY_CELLS = [("none", 0, 2), ("qk_norm", 0, 2), ("sigma_reparam", 0, 2)]
NEAR = 1.5  # runs within x1.5 of the cell's LR50
COLLAPSE = DivergenceConfig().entropy_collapse  # nats: the entropy_collapse event's threshold


def verdict(reference: dict, cell: dict, higher: bool) -> str:
    """From the two cells' 90 % intervals of LR50 (a censored cell's: its bound to the end of the
    axis): disjoint in the claimed direction -> "reproduced", disjoint the other way -> "reversed",
    overlapping -> "not resolved at this size"."""
    if overlap(reference, cell):  # the rule compare_boundaries.py calls signal / not distinguishable
        return "not resolved at this size"
    above = interval(cell)[0] > interval(reference)[1]
    return "reproduced" if above == higher else "reversed"


def key_of(r: dict) -> tuple[str, int, int]:
    return r["stabilizer"], int(r["warmup_steps"]), int(r["depth"])


def name(k: tuple[str, int, int]) -> str:
    return f"{k[0]} w{k[1]} d{k[2]}"


def ratio_text(reference: dict, cell: dict) -> str:
    if reference.get("censored") or cell.get("censored"):
        return "–"
    return f"{cell['lr50'] / reference['lr50']:.2f}"


def trials_to_resolve(reference: dict, cell: dict, cap: int = 1000) -> int | None:
    """Trials a cell would need for the two intervals to come apart at this LR50 ratio, if each
    interval's log-width shrinks as 1/sqrt(trials) and the ratio holds: intervals of equal log-width
    are disjoint when each is narrower than the ratio, so each cell needs n (ln w / ln ratio)^2
    (n its trials, w its interval's width high / low); the larger of the two, at most ``cap`` (None:
    a censored cell, or a ratio within 1 % of 1)."""
    if reference.get("censored") or cell.get("censored"):
        return None
    r = abs(math.log(cell["lr50"] / reference["lr50"]))
    if r < math.log(1.01):
        return None
    need = max(x["n_trials"] * (math.log(x["lr50_high"] / x["lr50_low"]) / r) ** 2 for x in (reference, cell))
    return min(cap, math.ceil(need))


def contrasts(cells: dict[tuple, dict], claims: list[Claim] = CLAIMS) -> str:
    lines = ["**The papers' directions on the crash boundary: per claim the two cells compared (stabilizer, "
             "warmup steps, depth), their LR50 [90 % interval] (trials), the LR50 ratio cell / reference, and the "
             "verdict from the intervals alone: reproduced = disjoint in the claimed direction, reversed = disjoint "
             "the other way, not resolved at this size = overlapping (not distinguishable); † = the cell's trial "
             "budget was spent before its interval reached the resolution; trials to resolve = trials a cell for "
             "disjoint intervals at this ratio if each interval's log-width shrinks as 1/sqrt(trials) (1000: at "
             "least that many)**", "",
             "| claim | source | reference cell | LR50 [90 %] (trials) | compared cell | LR50 [90 %] (trials) "
             "| ratio | claimed | verdict | trials to resolve |", "|" + " --- |" * 10]
    for c in claims:
        ref, cell = cells.get(c.reference), cells.get(c.cell)
        if ref is None or cell is None:
            lines.append(f"| {c.text} | {c.source} | {name(c.reference)} | – | {name(c.cell)} | – | – | "
                         f"{'higher' if c.higher else 'lower'} | not run | – |")
            continue
        lines.append(f"| {c.text} | {c.source} | {name(c.reference)} | {cell_text(ref)} ({ref['n_trials']}) | "
                     f"{name(c.cell)} | {cell_text(cell)} ({cell['n_trials']}) | {ratio_text(ref, cell)} | "
                     f"{'higher' if c.higher else 'lower'} | {verdict(ref, cell, c.higher)} | {need_text(ref, cell)} |")
    return "\n".join(lines) + "\n"


def need_text(reference: dict, cell: dict) -> str:
    n = trials_to_resolve(reference, cell)
    return "–" if n is None else str(n)


def _summary(xs: list[float]) -> str:
    return f"{statistics.median(xs):.3f} [{min(xs):.3f}, {max(xs):.3f}] ({len(xs)})" if xs else "– (0)"


def entropy_near_lr50(cells: dict[tuple, dict], trials: list[dict], keys: list[tuple] = ENTROPY_CELLS,
                      near: float = NEAR) -> str:
    """Per cell, the runs with LR within x``near`` of its LR50: the minimum attention entropy at their
    end (median [min, max] (runs)), of all of them, those that did not crash and those that did, and how
    many of each end below ``COLLAPSE`` nats (a head attending to about one key); runs whose last
    entropy is not finite (a non-finite loss) are counted apart."""
    seq = {int(t["seq_len"]) for t in trials if t.get("seq_len")}
    top = f"; uniform attention over {max(seq)} keys: ln {max(seq)} = {math.log(max(seq)):.2f} nats" if seq else ""
    lines = [f"**Minimum attention entropy (nats) at the end of the runs near each cell's LR50 (LR within x{near:g} "
             "of it): last/attn_entropy/min, the smallest per-head entropy over the layers at the last probe "
             "(MLflow's attn_entropy/min), median [min, max] (runs), of all runs, those that did not crash (stable or "
             f"degraded) and those that did (crash = the spec's crash classes); below {COLLAPSE:g}: runs ending below "
             f"{COLLAPSE:g} nats (the entropy_collapse event's threshold) / runs, not crashed and crashed; non-finite: runs whose last value is not "
             f"finite{top}**", "",
             f"| cell | LR50 | LRs near it | runs | all | not crashed | crashed | below {COLLAPSE:g}: not crashed / crashed "
             "| non-finite |", "|" + " --- |" * 9]
    for k in keys:
        r = cells.get(k)
        if r is None or r.get("censored") or r.get("lr50") is None:
            lines.append(f"| {name(k)} | {'–' if r is None else cell_text(r)} | – | 0 | – | – | – | – | – |")
            continue
        lo, hi = r["lr50"] / near, r["lr50"] * near
        near_runs = [t for t in trials if key_of(t) == k and lo <= t["lr"] <= hi and t["status"] != "failed"]
        ent = [(t["last/attn_entropy/min"], bool(t["crashed"])) for t in near_runs]
        fin = [(e, c) for e, c in ent if e is not None and math.isfinite(e)]
        lines.append(f"| {name(k)} | {r['lr50']:.3g} | {lo:.3g}-{hi:.3g} | {len(near_runs)} | "
                     f"{_summary([e for e, _ in fin])} | {_summary([e for e, c in fin if not c])} | "
                     f"{_summary([e for e, c in fin if c])} | "
                     f"{sum(e < COLLAPSE for e, c in fin if not c)}/{sum(not c for _, c in fin)} / "
                     f"{sum(e < COLLAPSE for e, c in fin if c)}/{sum(c for _, c in fin)} | {len(ent) - len(fin)} |")
    return "\n".join(lines) + "\n"


def load(results: Path) -> tuple[dict[tuple, dict], list[dict]]:
    import pyarrow.parquet as pq

    cells = {key_of(r): r for r in pq.read_table(results / "boundary.parquet").to_pylist()}
    trials = pq.read_table(results / "trials.parquet").to_pylist()
    return cells, trials


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results", type=Path, help="the export folder (boundary.parquet, trials.parquet)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    cells, trials = load(args.results)
    text = contrasts(cells) + "\n" + entropy_near_lr50(cells, trials)
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
