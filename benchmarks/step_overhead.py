"""Step-time overhead of each stabilizer against plain AdamW, and of probe steps, side by side.

For GPT and ViT at the default small sizes, every variant gets its own ``Trainer`` (the trial
loop's real step). The variants' steps are interleaved round-robin (each round starting one
variant further on), so that machine noise hits them alike. A ratio is the median over rounds of
the variant's time over ``none``'s in the same round: paired, so that the machine's slow drifts
(the plain ViT step measured between 71 and 93 ms on one day here) cancel. The probe overhead is the
extra time of a probe step (capture forward, gradient and weight probes) over an ordinary step of
the same round, spread over the default probe interval:

    probe_ratio = 1 + (t_probe / t_step - 1) / probe_interval

Targets (issue #2): weyl <= 1.15x, sigma_reparam <= 1.25x, probes <= 1.05x.

    python benchmarks/step_overhead.py [--rounds 15] [--steps-per-round 4] [--device auto]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from workloads.trainer import Trainer
from workloads.trial import TrialConfig

TARGETS = {"weyl": 1.15, "sigma_reparam": 1.25, "probes": 1.05}
VARIANTS = ("none", "weyl", "sigma_reparam", "qk_norm", "mlra")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(workload: str, rounds: int, per_round: int, device: str) -> dict[str, float]:
    base = TrialConfig(workload=workload, device=device, steps=10**6)
    trainers = {v: Trainer(base.replace(stabilizers=() if v == "none" else (v,))) for v in VARIANTS}
    probe_trainer = Trainer(base)
    times: dict[str, list[float]] = {v: [] for v in (*VARIANTS, "probe_step", "plain_step")}
    step = 0
    names = list(trainers)
    for r in range(rounds + 1):  # round 0 warms up (allocations, power-iteration vectors)
        for v in names[r % len(names):] + names[:r % len(names)]:  # each round starts one further on
            tr = trainers[v]
            _sync(tr.device)
            t0 = time.perf_counter()
            for _ in range(per_round):
                tr.step(step, probe=False)
            _sync(tr.device)
            if r:
                times[v].append((time.perf_counter() - t0) / per_round)
        for kind, probe in (("plain_step", False), ("probe_step", True)):
            _sync(probe_trainer.device)
            t0 = time.perf_counter()
            probe_trainer.step(step, probe=probe)
            _sync(probe_trainer.device)
            if r:
                times[kind].append(time.perf_counter() - t0)
        step += 1
    med = {k: statistics.median(v) for k, v in times.items()}

    def paired(a: str, b: str) -> float:  # median over rounds of a / b in the same round
        return statistics.median(x / y for x, y in zip(times[a], times[b]))

    out = {v: paired(v, "none") for v in VARIANTS}
    out["probe_step_x"] = paired("probe_step", "plain_step")
    out["probes"] = 1 + (out["probe_step_x"] - 1) / base.probe_interval
    out["step_ms"] = med["none"] * 1e3
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--steps-per-round", type=int, default=4)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--workloads", default="gpt,vit")
    args = ap.parse_args()
    interval = TrialConfig().probe_interval
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, device {args.device}, "
          f"probe_interval {interval}")
    print(f"{'workload':<8} {'step ms':>8} " + " ".join(f"{v:>13}" for v in VARIANTS)
          + f" {'probe step':>10} {'probes':>8}")
    failed = []
    for w in args.workloads.split(","):
        r = measure(w, args.rounds, args.steps_per_round, args.device)
        print(f"{w:<8} {r['step_ms']:>8.1f} " + " ".join(f"{r[v]:>12.3f}x" for v in VARIANTS)
              + f" {r['probe_step_x']:>9.2f}x {r['probes']:>7.3f}x")
        failed += [f"{w}/{k} {r[k]:.3f}x > {t}x" for k, t in TARGETS.items() if r[k] > t]
    print("targets: " + ", ".join(f"{k} <= {t}x" for k, t in TARGETS.items()))
    print("all targets met" if not failed else "missed: " + "; ".join(failed))


if __name__ == "__main__":
    main()
