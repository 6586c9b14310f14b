"""GPU step time of every stabilizer and of probe steps against plain AdamW, eager and compiled
(issue 12). Needs CUDA; exits with a message without it.

Sizes: GPT depth 12, width 768, 12 heads, seq 1024, batch 16 (86 M parameters) and the
``vit_ablation`` ViT (depth 12, width 384, 6 heads, batch 128, 32x32, patch 4), bf16 autocast.
Each variant is a ``Trainer`` (the trial loop's real step, read once per ``sync_interval`` steps as
the loop does); ``bare`` is the same model as ``none`` stepped without the loop (forward, backward,
optimizer only, no loss read). With compilation each variant also runs with ``compile: true``. Variants run
interleaved round-robin; each one's time is the median over rounds; ratios are against ``none``
in the same run, paired by round (the median over rounds of the variant's time over ``none``'s in
the same round). Probes: ``1 + (t_probe / t_step - 1) / probe_interval``. MFU uses
nanoGPT's FLOP count (6 N + 12 L d T per token, per image token for the ViT) over ``--peak-tflops``.

Targets: weyl, sigma_reparam <= 1.10x; qk_norm, mlra, probes <= 1.05x; none <= 1.02x bare;
compiled bare >= 1.25x the eager bare's throughput.

``--mode eager`` times the eager variants only, ``--mode compiled`` the compiled ones against the
eager ``none`` and ``bare`` (the references of the ratios), ``--mode both`` (default) all of them.
``--budget-s`` ends the timed rounds of the i-th of n workloads once (i + 1) / n of that many seconds
have passed since the start (after at least one timed round), so that a run inside a time limit
still reports; ``--json`` writes the figures after each workload. ``benchmarks/gpu_session.sh``
runs the whole GPU measurement in parts that each fit one call of a lent GPU machine.

    python benchmarks/gpu_step.py [--workloads gpt,vit] [--variants none,weyl,...] [--mode both]
                                  [--rounds 10] [--steps-per-round 25] [--budget-s S] [--json F]
    python benchmarks/gpu_step.py --cpu-smoke --rounds 1 --steps-per-round 2 --mode eager  # script check
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from workloads.trainer import Trainer
from workloads.trial import TrialConfig

SIZES = {
    "gpt": dict(workload="gpt", depth=12, width=768, heads=12, seq_len=1024, batch_size=16),
    "vit": dict(workload="vit", depth=12, width=384, heads=6, img_size=32, patch_size=4, batch_size=128),
}
TINY = {  # --cpu-smoke: the script's own check, not a measurement
    "gpt": dict(workload="gpt", depth=2, width=32, heads=2, seq_len=16, batch_size=2),
    "vit": dict(workload="vit", depth=2, width=32, heads=2, img_size=16, patch_size=4, batch_size=4),
}
VARIANTS = ("none", "weyl", "sigma_reparam", "qk_norm", "mlra")
TARGETS = {"weyl": 1.10, "sigma_reparam": 1.10, "qk_norm": 1.05, "mlra": 1.05, "probes": 1.05, "none/bare": 1.02}


def bare_step(tr: Trainer, step: int) -> None:
    """Forward, backward, optimizer: no host sync (no loss read, no probes)."""
    for g in tr.opt.param_groups:
        g["lr"] = tr.cfg.lr
    x, y = tr.data.train.next()
    with tr.autocast():
        loss = tr.loss_fn(x, y)
    tr.opt.zero_grad(set_to_none=True)
    loss.backward()
    tr.opt.step()


def flops_per_step(tr: Trainer) -> float:
    cfg = tr.cfg
    n = sum(p.numel() for p in tr.model.parameters())
    if cfg.workload == "gpt":
        n -= tr.model.wpe.weight.numel()
        t = cfg.seq_len
    else:
        t = (cfg.img_size // cfg.patch_size) ** 2 + 1
    return (6 * n + 12 * cfg.depth * cfg.width * t) * t * cfg.batch_size


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def measure(workload: str, rounds: int, per_round: int, mode: str, lr: float, device: str = "cuda",
            sizes: dict = SIZES, variants: tuple[str, ...] = VARIANTS, deadline: float = float("inf")) -> dict:
    """Median seconds per step of every variant. A variant's round is ``per_round`` steps followed
    by one read of their losses, as the trial loop does once per ``sync_interval`` steps. Timed
    rounds stop early at ``deadline`` (``time.monotonic()``), after at least one."""
    base = TrialConfig(**sizes[workload], device=device, precision="bf16" if device == "cuda" else "fp32",
                       steps=10**6, lr=lr)
    t_build = time.monotonic()
    fns = {}
    for v in variants:
        if mode == "compiled" and v != "none":
            continue
        tr = Trainer(base.replace(stabilizers=() if v == "none" else (v,)))
        fns[v] = (lambda tr: lambda s: tr.step(s, probe=False)[0])(tr)
        if v == "none":
            fns["bare"] = (lambda tr: lambda s: bare_step(tr, s))(tr)
            if mode != "compiled":
                fns["probe_step"] = (lambda tr: lambda s: tr.step(s, probe=True)[0])(tr)
            flops = flops_per_step(tr)
    if mode != "eager":
        for v in variants:
            tr = Trainer(base.replace(stabilizers=() if v == "none" else (v,), compile=True))
            fns[f"{v} (compiled)"] = (lambda tr: lambda s: tr.step(s, probe=False)[0])(tr)
            if v == "none":
                fns["bare (compiled)"] = (lambda tr: lambda s: bare_step(tr, s))(tr)
    _log(f"{workload}: {len(fns)} variants built in {time.monotonic() - t_build:.0f} s")
    dev = torch.device(device)
    times: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(rounds + 2):  # two warm-up rounds (allocator, compilation, power-iteration bases)
        t_round = time.monotonic()
        for k, fn in fns.items():
            n = 1 if k == "probe_step" else per_round
            _sync(dev)
            t0 = time.perf_counter()
            losses = [fn(r * per_round + s) for s in range(n)]
            if losses[0] is not None:
                torch.stack(losses).tolist()  # the loop's one loss read per block
            _sync(dev)
            if r >= 2:
                times[k].append((time.perf_counter() - t0) / n)
        _log(f"{workload}: round {r + 1}/{rounds + 2} ({'warm-up' if r < 2 else 'timed'}) "
             f"in {time.monotonic() - t_round:.1f} s")
        if r >= 2 and time.monotonic() > deadline:
            _log(f"{workload}: time budget reached after {r - 1} timed round(s)")
            break
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"med": med, "times": times, "flops": flops, "interval": base.probe_interval,
            "rounds": len(times["none"])}


def report(w: str, r: dict, size: dict, peak_tflops: float) -> tuple[dict, list[str]]:
    """Print one workload's table; return its figures (for --json) and the targets it missed.
    Ratios are paired: the median over rounds of one variant's time over another's in the same
    round (as ``step_overhead.py``), so that drifts of the machine cancel."""
    med, times = r["med"], r["times"]

    def paired(a: str, b: str) -> float:
        return statistics.median(x / y for x, y in zip(times[a], times[b]))

    print(f"\n{w}: {size} (median of {r['rounds']} timed rounds)")
    print("| variant | ms / step | x none | MFU |\n| --- | --- | --- | --- |")
    for k, t in med.items():
        print(f"| {k} | {t * 1e3:.1f} | {paired(k, 'none'):.3f} | {r['flops'] / t / (peak_tflops * 1e12):.1%} |")
    ratios = {v: paired(v, "none") for v in VARIANTS[1:] if v in med}
    ratios["none/bare"] = paired("none", "bare")
    if "probe_step" in med:
        ratios["probes"] = 1 + (paired("probe_step", "none") - 1) / r["interval"]
        print(f"probes at interval {r['interval']}: {ratios['probes']:.3f}x")
    failed = [f"{w}/{k} {ratios[k]:.3f}x > {t}x" for k, t in TARGETS.items() if k in ratios and ratios[k] > t]
    if "bare (compiled)" in med:
        speed = ratios["compiled bare/bare speed-up"] = paired("bare", "bare (compiled)")
        print(f"compiled bare loop: {speed:.2f}x the eager bare loop's throughput (target >= 1.25x)")
        for v in VARIANTS:
            if f"{v} (compiled)" in med:
                ratios[f"{v} (compiled)"] = paired(f"{v} (compiled)", "none (compiled)")
        if speed < 1.25:
            failed.append(f"{w}/compile {speed:.2f}x < 1.25x")
    figures = {"size": size, "rounds": r["rounds"], "ms_per_step": {k: t * 1e3 for k, t in med.items()},
               "mfu": {k: r["flops"] / t / (peak_tflops * 1e12) for k, t in med.items()}, "ratios": ratios}
    return figures, failed


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workloads", default="gpt,vit", help="comma list of: " + ", ".join(SIZES))
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma list of: " + ", ".join(VARIANTS))
    ap.add_argument("--mode", default="both", choices=("eager", "compiled", "both"))
    ap.add_argument("--no-compile", action="store_true", help="same as --mode eager")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--steps-per-round", type=int, default=TrialConfig().sync_interval,
                    help="steps between loss reads (the trial loop's sync_interval)")
    ap.add_argument("--budget-s", type=float, default=float("inf"),
                    help="seconds for the whole run: the i-th of n workloads stops its timed rounds at (i+1)/n of it")
    ap.add_argument("--json", default=None, help="write the figures to this file after each workload")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="bf16 dense peak (H100 SXM: 989)")
    ap.add_argument("--cpu-smoke", action="store_true",
                    help="run tiny models on the CPU (checks that the script works; the figures mean nothing)")
    args = ap.parse_args()
    t_start = time.monotonic()
    mode = "eager" if args.no_compile else args.mode
    variants = tuple(v for v in args.variants.split(",") if v)
    workloads = [w for w in args.workloads.split(",") if w]
    for name, got, allowed in (("--variants", variants, VARIANTS), ("--workloads", workloads, tuple(SIZES))):
        bad = [x for x in got if x not in allowed]
        if bad:
            ap.error(f"{name}: unknown {', '.join(bad)}; allowed: {', '.join(allowed)}")
    variants = ("none", *[v for v in variants if v != "none"])  # none is every ratio's reference
    device, sizes = "cuda", SIZES
    if args.cpu_smoke:
        device, sizes = "cpu", TINY
    elif not torch.cuda.is_available():
        print("gpu_step.py: no CUDA device; this benchmark measures GPU step times "
              "(run benchmarks/step_overhead.py for the CPU ratios, or --cpu-smoke to check the script)",
              file=sys.stderr)
        return 2
    where = "CPU smoke run (tiny sizes, fp32)" if args.cpu_smoke else f"{torch.cuda.get_device_name()}, bf16 autocast"
    print(f"torch {torch.__version__}, {where}, mode {mode}")
    failed, results = [], {"torch": torch.__version__, "device": where, "mode": mode, "workloads": {}}
    for i, w in enumerate(workloads):  # workload i's timed rounds end at (i + 1) / n of the budget
        r = measure(w, args.rounds, args.steps_per_round, mode, args.lr, device, sizes, variants,
                    deadline=t_start + args.budget_s * (i + 1) / len(workloads))
        results["workloads"][w], missed = report(w, r, sizes[w], args.peak_tflops)
        failed += missed
        if args.json:
            with open(args.json, "w") as f:
                json.dump(results, f, indent=1)
    if args.cpu_smoke:
        print("\nCPU smoke run: the script works; targets are checked on a GPU only")
    else:
        print("\nall targets met" if not failed else "\nmissed: " + "; ".join(failed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
