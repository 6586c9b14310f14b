"""Does Weyl's cap hold? The realised sigma_1(W_t - W_{t-1}) / sigma_1(W_{t-1}) of every matrix at
every step, by a full SVD, over tau (issue 20).

WeylAdamW bounds each matrix's step so that this ratio is at most tau; its sigma_1 are estimated
(power iteration, an upper bound from the residual). This script trains with ``weyl`` and measures the
ratio exactly: max (the claim is max <= 1.05), p99, and the matrix-steps over +5 %, for GPT and ViT at
the smoke size (depth 2, width 64), at lr 0.1 and 1, weight decay 0 and 0.1. The step is the whole
change of the matrix, weight decay included. Matrices are those of ``workloads.matrices`` (the rule
Weyl and weight decay share); every step is checked (no probe steps).

    python benchmarks/weyl_cap.py [--steps 300] [--workloads gpt,vit] [--lrs 0.1,1] [--wds 0,0.1]
"""

from __future__ import annotations

import argparse
import time

import torch

from workloads.stabilizers.weyl import matrix_shape
from workloads.trainer import Trainer
from workloads.trial import TrialConfig

SMOKE = dict(depth=2, width=64, heads=2, seq_len=64, batch_size=16, img_size=32, schedule="constant",
             warmup_steps=0)


@torch.no_grad()
def _sigma1(t: torch.Tensor) -> torch.Tensor:
    return torch.linalg.matrix_norm(t.double(), 2)


def realised_ratios(cfg: TrialConfig, steps: int) -> tuple[torch.Tensor, list[str], dict]:
    """``[steps, matrices]`` realised ratio / tau, the matrices' names, and the optimizer's tau."""
    tr = Trainer(cfg)
    tau = tr.opt.param_groups[0]["tau"]
    names = {p: n for n, p in tr.model.named_parameters()}
    mats = [p for p in tr.model.parameters() if matrix_shape(p) is not None]
    labels = []
    for p in mats:
        c = matrix_shape(p)[0]
        labels += [names[p]] if c == 1 else [f"{names[p]}[{j}]" for j in range(c)]
    rows = []
    for s in range(steps):
        before = [p.detach().clone() for p in mats]
        tr.step(s, probe=False)
        if not all(bool(torch.isfinite(p).all()) for p in mats):  # the run diverged: stop measuring
            break
        ratios = []
        for p, w0 in zip(mats, before):
            c, r, n = matrix_shape(p)
            d = (p.detach() - w0).reshape(c, r, n)
            ratios.append(_sigma1(d) / _sigma1(w0.reshape(c, r, n)).clamp_min(1e-300) / tau)
        rows.append(torch.cat(ratios))
    return torch.stack(rows), labels, {"tau": tau}


def summary(ratios: torch.Tensor, labels: list[str]) -> dict:
    flat = ratios[torch.isfinite(ratios)]
    i = int(torch.nan_to_num(ratios, nan=-1.0).argmax())
    step, m = divmod(i, ratios.shape[1])
    capped = flat[flat > 0.9]  # the matrix-steps at (or near) the cap: how close to tau they get
    return {"max": float(flat.max()), "p99": float(torch.quantile(flat, 0.99)),
            "capped_median": float(capped.median()) if capped.numel() else float("nan"),
            "capped": int(capped.numel()),
            "over": int((flat > 1.05).sum()), "count": int(flat.numel()), "worst": f"{labels[m]}, step {step}",
            "steps": ratios.shape[0]}  # fewer than asked where the run diverged


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--workloads", default="gpt,vit")
    ap.add_argument("--lrs", default="0.1,1")
    ap.add_argument("--wds", default="0,0.1")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--options", default="", help="weyl options, e.g. squarings=4,weight_power_iters=2")
    args = ap.parse_args()
    opts = {k: (float(v) if "." in v or "e" in v else int(v))
            for k, v in (kv.split("=") for kv in args.options.split(",") if kv)}
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}; smoke size {SMOKE}; {args.steps} steps; weyl options {opts or 'defaults'}")
    print("| run | max | p99 | matrix-steps over +5 % | median of those > 0.9 (count) | worst (matrix, step) | s |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    worst = 0.0
    for w in args.workloads.split(","):
        for lr in (float(x) for x in args.lrs.split(",")):
            for wd in (float(x) for x in args.wds.split(",")):
                cfg = TrialConfig(workload=w, lr=lr, weight_decay=wd, stabilizers=("weyl",), device="cpu",
                                  steps=args.steps, seed=args.seed, stabilizer_options={"weyl": opts}, **SMOKE)
                t0 = time.perf_counter()
                r, labels, _ = realised_ratios(cfg, args.steps)
                s = summary(r, labels)
                worst = max(worst, s["max"])
                note = "" if s["steps"] == args.steps else f", diverged at step {s['steps']}"
                print(f"| {w}, lr {lr:g}, wd {wd:g} | {s['max']:.4f} | {s['p99']:.3f} | {s['over']} / {s['count']} "
                      f"({100 * s['over'] / s['count']:.2f} %){note} | {s['capped_median']:.3f} ({s['capped']}) | {s['worst']} | {time.perf_counter() - t0:.0f} |",
                      flush=True)
    print(f"max over all runs: {worst:.4f} ({'holds' if worst <= 1.05 else 'EXCEEDS'} 1.05 tau)")


if __name__ == "__main__":
    main()
