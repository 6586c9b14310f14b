import math

import pytest

from orchestrator.boundary import Cell, CellSearch, dense_grid_size, next_lr, search_local
from orchestrator.boundary_config import BoundaryConfig
from orchestrator.spec import SpecError, parse_spec
from workloads.outcome import Point
from workloads.trial import TrialConfig

CFG = BoundaryConfig(lr_range=(1e-4, 1.0), method="bisect", resolution=2 ** 0.25, max_trials_per_cell=20)
L0 = 5.0


def P(lr, crashed, seed=0, loss=2.0):
    return Point(lr, seed, math.inf if crashed else loss, L0, 3.0)


def result(crashed, loss=2.0):
    """What a trial's summary says: a crash is a non-finite loss here."""
    return {"final_loss": math.inf if crashed else loss, "initial_loss": L0, "baseline_loss": 3.0,
            "stop_reason": "nonfinite" if crashed else None}


def test_bisection_order_top_bottom_then_middle_then_one_reprobe():
    assert next_lr([], CFG) == 1.0
    obs = [P(1.0, True)]
    assert next_lr(obs, CFG) == 1e-4
    obs.append(P(1e-4, False))
    assert next_lr(obs, CFG) == pytest.approx(1e-2)
    assert next_lr([P(1.0, False)], CFG) is None  # stable at the top: above the range
    assert next_lr([P(1.0, True), P(1e-4, True)], CFG) is None  # below the range
    # converged at [0.01, 0.0115]: one re-probe above the crash end (resolution^2 x it), then done
    done = [P(1.0, True), P(1e-4, False), P(0.01, False), P(0.0115, True)]
    probe = next_lr(done, CFG)
    assert probe == pytest.approx(0.0115 * CFG.resolution ** 2, rel=1e-5)
    assert next_lr(done + [P(probe, True)], CFG) is None


def test_a_stable_reprobe_moves_the_bracket_up():
    # 0.0115 crashed by chance; the re-probe above it is stable: bisection resumes in [0.0163, 1]
    obs = [P(1.0, True), P(1e-4, False), P(0.01, False), P(0.0115, True), P(0.0163, False)]
    assert next_lr(obs, CFG) == pytest.approx(math.sqrt(0.0163 * 1.0), rel=1e-5)


def test_collapsed_is_a_crash_by_default_and_degraded_is_not():
    cfg = BoundaryConfig(lr_range=(1e-4, 1.0), method="bisect")
    obs = [P(1.0, False, loss=3.5), P(1e-4, False, loss=2.0)]  # 3.5 >= the baseline 3.0: collapsed
    assert next_lr(obs, cfg) == pytest.approx(1e-2)
    degraded = [P(1.0, False, loss=2.9), P(1e-4, False, loss=2.0)]  # (2.9-2)/(5-2) = 0.3 <= 0.5
    assert next_lr(degraded, cfg) is None  # stable at the top
    strict = BoundaryConfig(lr_range=(1e-4, 1.0), method="bisect", crash=("diverged", "collapsed", "degraded"), kappa=0.2)
    assert next_lr(degraded, strict) == pytest.approx(1e-2)


@pytest.mark.parametrize("truth", [3e-4, 2.2e-3, 0.0415, 0.5])
def test_synthetic_boundary_is_bracketed_within_resolution(tmp_path, truth):
    calls = []

    def fake(cfg):
        calls.append(cfg.lr)
        return result(cfg.lr > truth)

    cell = Cell("synthetic", {}, {"workload": "gpt", "steps": 1})
    rep = search_local([cell], CFG, f"sqlite:///{tmp_path / 'o.db'}", "t", fake)[0]
    assert rep["stable_lr"] <= truth < rep["crash_lr"]
    assert rep["crash_lr"] / rep["stable_lr"] <= CFG.resolution and rep["converged"]
    assert len(calls) <= dense_grid_size(CFG) / 4
    assert not rep["non_monotonic"]


def test_seeds_repeat_the_bracket_ends_and_count_crashes(tmp_path):
    cfg = BoundaryConfig(lr_range=(1e-3, 1.0), method="bisect", resolution=1.5, seeds=3, max_trials_per_cell=30)

    def noisy(c):  # seed 2 crashes one step lower than the others
        limit = 0.05 if c.seed != 2 else 0.03
        return result(c.lr > limit)

    cell = Cell("noisy", {}, {"workload": "gpt", "steps": 1})
    rep = search_local([cell], cfg, f"sqlite:///{tmp_path / 'o.db'}", "t", noisy)[0]
    assert rep["stable_end_seeds"] == 3 and rep["crash_end_seeds"] == 3
    assert rep["crash_end_crashed"] == 3
    assert rep["stable_end_crashed"] == (1 if rep["stable_lr"] > 0.03 else 0)


def test_interrupted_search_resumes_from_the_optuna_store(tmp_path):
    storage = f"sqlite:///{tmp_path / 'o.db'}"
    cell = Cell("c", {}, {"workload": "gpt", "steps": 1})
    calls = []

    def fake(cfg):
        calls.append(cfg.lr)
        return result(cfg.lr > 0.01)

    first = CellSearch(cell, CFG, storage, "t")
    for _ in range(3):  # three trials, then "the driver dies" with a fourth asked but never told
        trial, lr, seed = first.ask()
        first.tell(trial, fake(type("C", (), {"lr": lr})))
    first.ask()
    rep = search_local([cell], CFG, storage, "t", fake)[0]
    # the trial cut off by the interruption is not a failure and does not count (issue 31)
    assert rep["converged"] and rep["trials"] == len(calls) and rep["failed_trials"] == 0
    assert rep["interrupted_trials"] == 1
    assert rep["stop_reason"] == "interval" and rep["method"] == "bisect"
    again = len(calls)
    search_local([cell], CFG, storage, "t", fake)
    assert len(calls) == again  # a finished cell runs nothing more


def test_boundary_spec_errors():
    base = {"name": "b", "workload": "gpt", "steps": 5, "axes": {"stabilizers": ["none"]}}
    from orchestrator.boundary_config import boundary_config

    with pytest.raises(SpecError, match="boundary: missing"):
        boundary_config(parse_spec(base))
    with pytest.raises(SpecError, match=r"boundary.lr_range: \[1.0, 0.1\] must satisfy"):
        boundary_config(parse_spec({**base, "boundary": {"lr_range": [1.0, 0.1]}}))
    with pytest.raises(SpecError, match="boundary.resolution"):
        boundary_config(parse_spec({**base, "boundary": {"lr_range": [0.1, 1.0], "resolution": 1.0}}))
    with pytest.raises(SpecError, match="boundary.seedz: .*keys: lr_range"):
        boundary_config(parse_spec({**base, "boundary": {"lr_range": [0.1, 1.0], "seedz": 2}}))
    with pytest.raises(SpecError, match="boundary.degraded_ratio: not a boundary setting.*top-level crash"):
        boundary_config(parse_spec({**base, "boundary": {"lr_range": [0.1, 1.0], "degraded_ratio": 1.5}}))
    # the search chooses every LR and seed: a grid over either is refused, with the reason
    for axes, field in (({"lr": [0.1, 0.2]}, "axes.lr"), ({"seed": [0, 1]}, "axes.seed")):
        with pytest.raises(SpecError, match=rf"{field}: not allowed in a boundary search: the search chooses"):
            boundary_config(parse_spec({**base, "axes": {**base["axes"], **axes},
                                        "boundary": {"lr_range": [0.1, 1.0]}}))
    with pytest.raises(SpecError, match="boundary.seeds: 3: only for method: bisect"):
        boundary_config(parse_spec({**base, "boundary": {"lr_range": [0.1, 1.0], "seeds": 3}}))
    with pytest.raises(SpecError, match="seeds: 2: not used by a boundary search"):
        boundary_config(parse_spec({**base, "seeds": 2, "boundary": {"lr_range": [0.1, 1.0]}}))
    with pytest.raises(SpecError, match="boundary.method: 'grid'"):
        boundary_config(parse_spec({**base, "boundary": {"lr_range": [0.1, 1.0], "method": "grid"}}))
    from orchestrator.boundary import cells_of

    spec = parse_spec({**base, "axes": {"stabilizers": ["none", "weyl"], "depth": [1, 2]},
                       "boundary": {"lr_range": [0.1, 1.0]}})
    cells = cells_of(spec, boundary_config(spec))
    assert sorted(c.key for c in cells) == ["stabilizers=none depth=1", "stabilizers=none depth=2",
                                            "stabilizers=weyl depth=1", "stabilizers=weyl depth=2"]


# ------------------------------------------------------------------------------- method: psi
def logistic_cell(mu: float, s: float):
    """A synthetic cell: P(crash | lr) = F((log lr - mu) / s), each outcome drawn from the trial's
    seed (so the search's seeds decide the draws: exact and repeatable)."""
    import numpy as np

    def fake(c):
        u = np.random.default_rng(c.seed).random()
        return result(u < 1 / (1 + math.exp(-(math.log(c.lr) - mu) / s)))

    return fake


def test_psi_gives_every_trial_a_fresh_seed_offset_by_fixed_seed():
    base = {"name": "b", "workload": "gpt", "steps": 5, "axes": {"stabilizers": ["none"]},
            "boundary": {"lr_range": [1e-3, 1.0], "max_trials_per_cell": 10}}
    from orchestrator.boundary import cells_of
    from orchestrator.boundary_config import boundary_config

    runs = {}
    for offset in (0, 100):
        spec = parse_spec({**base, "fixed": {"seed": offset}})
        cfg = boundary_config(spec)
        assert cfg.seed_offset == offset and cfg.method == "psi"
        seen = []

        def fake(c, seen=seen):
            seen.append((c.lr, c.seed))
            return logistic_cell(math.log(0.1), 0.3)(c)

        search_local(cells_of(spec, cfg), cfg, None, f"o{offset}", fake)
        runs[offset] = seen
        assert [s for _, s in seen] == list(range(offset, offset + len(seen)))
    assert not {s for _, s in runs[0]} & {s for _, s in runs[100]}  # two searches share no run


@pytest.mark.parametrize("mu_lr, s", [(0.02, 0.04), (0.15, 0.366)])  # a sharp and a wide (band x5) cell
def test_psi_converges_on_a_synthetic_cell(mu_lr, s):
    # budget 80: the wide cell's draws after its 3 reference trials take 69 trials (45 with one)
    cfg = BoundaryConfig(lr_range=(1e-3, 1.0), resolution=1.6, max_trials_per_cell=80)
    cell = Cell("synthetic", {}, {"workload": "gpt", "steps": 1})
    rep = search_local([cell], cfg, None, "t", logistic_cell(math.log(mu_lr), s))[0]
    assert rep["converged"] and rep["stop_reason"] == "interval"
    assert cfg.min_trials_per_cell <= rep["n_trials"] < cfg.max_trials_per_cell
    assert rep["lr50_high"] / rep["lr50_low"] <= 1.6
    assert rep["lr50_low"] <= mu_lr <= rep["lr50_high"]
    assert rep["lr10_low"] <= rep["lr10"] <= rep["lr50"] <= rep["lr90"] <= rep["lr90_high"]
    assert rep["n_seeds"] == rep["n_trials"]
    # the same search again is the same search: exact
    again = search_local([cell], cfg, None, "t2", logistic_cell(math.log(mu_lr), s))[0]
    assert again["lr50"] == rep["lr50"] and again["n_trials"] == rep["n_trials"]


def test_psi_stops_at_the_budget_and_at_the_range_edge_and_says_which():
    cell = Cell("c", {}, {"workload": "gpt", "steps": 1})
    tight = BoundaryConfig(lr_range=(1e-3, 1.0), resolution=1.05, max_trials_per_cell=12)
    rep = search_local([cell], tight, None, "b", logistic_cell(math.log(0.1), 0.3))[0]
    assert rep["stop_reason"] == "budget" and not rep["converged"] and rep["n_trials"] == 12
    cfg = BoundaryConfig(lr_range=(1e-3, 1.0), max_trials_per_cell=40)
    rep = search_local([cell], cfg, None, "e", lambda c: result(False))[0]  # nothing ever crashes
    assert rep["stop_reason"] == "range_edge" and rep["censored"] == "above" and not rep["converged"]
    assert rep["p_above_range"] >= 0.9 and rep["n_trials"] < 40
    # censored: no LR50 and no band (numbers the prior made), a one-sided bound inside the range
    assert rep["lr50"] is None and rep["lr50_low"] is None and rep["lr50_high"] is None and rep["lr10"] is None
    assert 1e-3 < rep["lr50_bound"] <= 1.0


def test_psi_proposals_in_flight_spread_and_resume_from_the_store(tmp_path):
    storage = f"sqlite:///{tmp_path / 'o.db'}"
    cell = Cell("c", {}, {"workload": "gpt", "steps": 1})
    cfg = BoundaryConfig(lr_range=(1e-3, 1.0), max_in_flight_per_cell=4, max_trials_per_cell=24)
    fake = logistic_cell(math.log(0.05), 0.2)
    first = CellSearch(cell, cfg, storage, "t")
    refs = [first.ask() for _ in range(4)]  # the reference trials first, then nothing until they finish
    assert refs[3] is None and [(lr, seed) for _, lr, seed in refs[:3]] == [(1e-3, 0), (1e-3, 1), (1e-3, 2)]
    for trial, lr, seed in refs[:3]:
        assert trial.user_attrs["reference"]
        first.tell(trial, fake(type("C", (), {"lr": lr, "seed": seed})))
    for _ in range(2):  # two rounds of 4 in flight, told
        batch = [first.ask() for _ in range(4)]
        assert first.ask() is None  # at most max_in_flight_per_cell at once
        lrs = [lr for _, lr, _ in batch]
        assert len(set(lrs)) > 1  # pending trials counted: the proposals do not all coincide
        for trial, lr, seed in batch:
            first.tell(trial, fake(type("C", (), {"lr": lr, "seed": seed})))
    first.ask()  # "the driver dies" with one trial asked and never told
    rep = search_local([cell], cfg, storage, "t", fake)[0]
    assert rep["interrupted_trials"] == 1 and rep["failed_trials"] == 0 and rep["n_trials"] >= 8
    assert rep["stop_reason"] in ("interval", "budget")
    seeds = [t.user_attrs["seed"] for t in CellSearch(cell, cfg, storage, "t").study.get_trials()]
    assert len(set(seeds)) == len(seeds)  # the resumed search does not reuse a seed


def small_grid():
    """A grid small enough to check point by point: 25 LR50s, 5 widths, 2 floors, 2 lapses."""
    from orchestrator import psychometric as psy

    return psy.make_grid((1e-3, 1.0), n_s=5, floors=(0.02, 0.3), floor_prior=(0.7, 0.3), lapses=(0.02, 0.2),
                         lapse_prior=(0.6, 0.4), n_candidates=9, max_step=0.5)


def test_grid_posterior_equals_the_direct_likelihood():
    import numpy as np

    from orchestrator import psychometric as psy

    rng = np.random.default_rng(3)
    grid = small_grid()
    assert grid.shape == (25, 5, 2, 2)
    cands = psy.candidates(grid)
    # runs off the lattice (computed directly) and on it (read from the lattice table), some repeated
    lrs = list(np.exp(rng.uniform(math.log(1e-3), 0, 20))) + [cands[3]] * 3 + [cands[5], cands[0], cands[-1]]
    crashed = list(rng.random(len(lrs)) < 0.5)
    post = psy.posterior(grid, lrs, crashed)
    # direct: for every grid point the product of Bernoulli probabilities of the model's formula,
    # P = floor + (1 - floor - lapse) F((x - x50) / s + z0), z0 = log((0.5 - floor) / (0.5 - lapse))
    direct = np.zeros(grid.shape)
    trapezoid = lambda i, n: 0.5 if i in (0, n - 1) else 1.0  # noqa: E731
    for i, x50 in enumerate(grid.x50):
        for j, ls in enumerate(grid.log_s):
            for a, (g, wg) in enumerate(zip((0.02, 0.3), (0.7, 0.3))):
                for b, (lam, wl) in enumerate(zip((0.02, 0.2), (0.6, 0.4))):
                    z0 = math.log((0.5 - g) / (0.5 - lam))
                    lik = 1.0
                    for lr, c in zip(lrs, crashed):
                        p = g + (1 - g - lam) / (1 + math.exp(-((math.log(lr) - x50) / math.exp(ls) + z0)))
                        lik *= p if c else 1 - p
                    prior = math.exp(ls) ** psy.S_POWER * trapezoid(i, 25) * trapezoid(j, 5) * wg * wl
                    direct[i, j, a, b] = lik * prior
    direct /= direct.sum()
    np.testing.assert_allclose(post, direct, rtol=1e-9, atol=1e-300)
    ll = psy.log_likelihood(grid, lrs, crashed) + grid.log_prior
    np.testing.assert_allclose(np.exp(ll - ll.max()) / np.exp(ll - ll.max()).sum(), direct, rtol=1e-9)
    # at every grid point the fitted P(crash) at its own LR50 is 0.5
    np.testing.assert_allclose(psy.p_crash(grid, grid.x50)[np.arange(25), np.arange(25)], 0.5, rtol=1e-12)
    # the expected entropy of LR50 for a candidate, by hand, from the two posteriors it can lead to
    # (lattice candidates take the table's product, an LR off the lattice the direct path: the same)
    cand = cands[4]
    e = psy.expected_entropy(grid, post, [cand, cand * 1.0001])
    p1 = psy.p_crash(grid, math.log(cand))
    by_hand = 0.0
    for lik in (p1, 1 - p1):
        joint = post * lik
        z = joint.sum()
        m = joint.reshape(25, -1).sum(axis=1) / z
        by_hand += z * -(m[m > 0] * np.log(m[m > 0])).sum()
    assert e[0] == pytest.approx(by_hand, rel=1e-12) and e[1] == pytest.approx(by_hand, rel=1e-3)
    # and the fit's quantiles: LR50's interval holds its median, lr10 < lr50 < lr90
    f = psy.summarize(grid, post, len(lrs))
    assert f.lr50_low < f.lr50 < f.lr50_high and f.lr10 < f.lr50 < f.lr90


def test_efficiency_benchmark_runs_at_a_tiny_size(tmp_path, benchmark_module):
    bench = benchmark_module("boundary_efficiency")
    out = tmp_path / "eff.md"
    summary = bench.main(["--quick", "--workers", "1", "--families", "logistic sharp,plateau,above range",
                          "--replay", "1", "--out", str(out)])
    assert summary["all"]["n"] == 9 and set(summary) >= {"logistic sharp", "plateau", "above range", "all"}
    for fam in ("logistic sharp", "plateau", "above range"):
        v = summary[fam]
        assert 0 <= v["coverage"] <= 1 and v["trials"] <= 30
    assert summary["above range"]["censored"] == 3 and summary["above range"]["median_abs_log_err"] is None
    text = out.read_text()
    assert "coverage, stopped on interval" in text and "By stop reason" in text and "ms with 3 pending" in text
    assert set(summary["_timing"]) == {0, 1, 3} and summary["_fine"]["stop_flips"] >= 0
    # the stopping rules replayed on cells run to the budget: every rule, every family inside the range
    assert [r["family"] for r in summary["_replay"]] == ["logistic sharp", "plateau"]
    assert all(len(r["rows"]) == 30 for r in summary["_replay"])
    assert all(name in text for name in bench.RULES) and "Stopping rules replayed" in text
    # the families' truths: LR50 is where P(crash) first reaches 0.5, and the shapes are the ones named
    for name, fam in bench.FAMILIES.items():
        assert fam.p(0.0) == pytest.approx(0.5) and fam.p(-1e-6) < 0.5 <= fam.p(1e-6), name
    assert bench.FAMILIES["plateau"].p(-0.5 * math.log(10)) == pytest.approx(0.3, abs=1e-3)
    assert bench.FAMILIES["island"].p(0.5 * math.log(10)) == 0.1
    assert bench.FAMILIES["bump"].p(-0.5 * math.log(10)) == pytest.approx(0.4, abs=1e-3)
    for band in (1.2, 5.0):
        s = bench.s_of_band(band)
        assert math.exp(2 * s * math.log(9)) == pytest.approx(band)


def test_expected_entropy_counts_a_pending_trial_and_thompson_beyond_the_exact_limit():
    import numpy as np

    from orchestrator import psychometric as psy

    grid = small_grid()
    cands = psy.candidates(grid)
    lrs, crashed = [0.01, 0.05, 0.2, 0.5], [False, False, True, True]
    post = psy.posterior(grid, lrs, crashed)
    cand, pend = cands[5], cands[4]
    e = psy.expected_entropy(grid, post, [cand], [pend])[0]
    pp, pc = psy.p_crash(grid, math.log(pend)), psy.p_crash(grid, math.log(cand))
    by_hand = 0.0
    for lp in (pp, 1 - pp):          # the pending trial's outcome, not known yet
        for lc in (pc, 1 - pc):      # the candidate's
            joint = post * lp * lc
            z = joint.sum()
            m = joint.reshape(len(grid.x50), -1).sum(axis=1) / z
            by_hand += z * -(m[m > 0] * np.log(m[m > 0])).sum()
    assert e == pytest.approx(by_hand, rel=1e-12)
    # more pending trials than the exact limit: a Thompson draw, repeatable with its RNG
    many = [0.1] * (psy.MAX_EXACT_PENDING + 1)
    a = psy.next_lr(grid, lrs, crashed, many, cands, np.random.default_rng(7))
    b = psy.next_lr(grid, lrs, crashed, many, cands, np.random.default_rng(7))
    assert a == b and a in cands


# ------------------------------------------------------------------- the cell's own reference (#31)
def gained(gain_of):
    """A synthetic trial with gains over a baseline of 3.0: ``gain_of(lr, seed)`` nats (None: diverged)."""
    def fake(c):
        g = gain_of(c.lr, c.seed)
        return {"final_loss": math.inf if g is None else 3.0 - g, "initial_loss": L0, "baseline_loss": 3.0,
                "eval_baseline": 3.0, "final_loss_se": 0.01, "stop_reason": "nonfinite" if g is None else None}
    return fake


def test_a_cell_runs_its_reference_first_and_is_judged_against_it_alone():
    """A cell whose runs learn 1 nat at low LRs and 0.3 nats from lr 0.05 up, beside a cell of the
    same workload and size that learns 5 nats: under #17's rule (a tenth of the best gain of the
    workload) the first cell's 0.3-nat runs collapsed beside the second and not alone (measured
    with this test's cells on the code before: LR50 0.486 alone, 0.049 after the second cell).
    Against its own reference they are the same alone, beside it, before or after it."""
    def weak(lr, seed):
        return None if lr > 0.5 else (1.0 if lr < 0.05 else 0.3 + 0.01 * (seed % 3))

    def strong(lr, seed):
        return None if lr > 0.5 else 5.0

    cfg = BoundaryConfig(lr_range=(1e-3, 1.0), max_trials_per_cell=16, max_in_flight_per_cell=2)
    # the same workload and size (#17's peers), two stabilizers
    a = Cell("a", {}, {"workload": "gpt", "steps": 1, "stabilizers": ()})
    b = Cell("b", {}, {"workload": "gpt", "steps": 1, "stabilizers": ("qk_norm",)})
    evaluate = lambda c: gained(strong if c.stabilizers else weak)(c)  # noqa: E731
    alone = search_local([a], cfg, None, "alone", evaluate)[0]
    after = search_local([b, a], cfg, None, "after", evaluate)[1]
    before = search_local([a, b], cfg, None, "before", evaluate)[0]
    assert alone["cell"] == after["cell"] == before["cell"] == "a"
    for rep in (after, before):
        for k in ("outcomes", "lr50", "lr50_low", "lr50_high", "n_trials", "stop_reason", "reference_gain"):
            assert rep[k] == alone[k], k
    assert alone["reference_lr"] == 1e-3 and alone["reference_runs"] == 3 and alone["reference_gain"] == pytest.approx(1.0)
    assert alone["reference_learned"] and "reference gain" in alone["criterion"]
    classes = [c for cs in alone["outcomes"].values() for c in cs]
    assert "degraded" in classes and "collapsed" not in classes  # 0.3 of 1.0: degraded, not collapsed


def test_reference_seeds_and_lr_are_set_by_the_spec_and_a_failed_reference_is_run_again():
    from orchestrator.boundary_config import boundary_config

    base = {"name": "b", "workload": "gpt", "steps": 5, "axes": {"stabilizers": ["none"]}, "fixed": {"seed": 10}}
    cfg = boundary_config(parse_spec({**base, "boundary": {"lr_range": [1e-3, 1.0], "reference_seeds": 2,
                                                           "reference_lr": 2e-3}}))
    assert (cfg.reference_seeds, cfg.ref_lr) == (2, 2e-3)
    assert boundary_config(parse_spec({**base, "boundary": {"lr_range": [1e-3, 1.0]}})).ref_lr == 1e-3
    with pytest.raises(SpecError, match=r"boundary.reference_lr: 5.0 must lie inside lr_range \[0.001, 1.0\]"):
        boundary_config(parse_spec({**base, "boundary": {"lr_range": [1e-3, 1.0], "reference_lr": 5.0}}))
    with pytest.raises(SpecError, match="boundary.max_trials_per_cell: 3 must exceed reference_seeds"):
        boundary_config(parse_spec({**base, "boundary": {"lr_range": [1e-3, 1.0], "max_trials_per_cell": 3}}))
    with pytest.raises(SpecError, match="boundary.reference_seeds: 0"):
        boundary_config(parse_spec({**base, "boundary": {"lr_range": [1e-3, 1.0], "reference_seeds": 0}}))
    s = CellSearch(Cell("c", {}, {"workload": "gpt", "steps": 1}), cfg, None, "r")
    t0, lr0, seed0 = s.ask()
    assert (lr0, seed0) == (2e-3, 10) and s.ask() is None  # one in flight at a time here
    s.tell(t0, None, failed=True)  # a real failure: counted, and the reference seed is run again
    t1, lr1, seed1 = s.ask()
    assert (lr1, seed1) == (2e-3, 10) and s.trials_used() == 2
    s.tell(t1, gained(lambda lr, seed: 1.0)(type("C", (), {"lr": lr1, "seed": seed1})))
    assert s.ask()[1:] == (2e-3, 11) and not s.reference_ready()


def test_interrupts_do_not_spend_the_budget_and_failures_do(tmp_path):
    """Issue 31: three interrupts with 4 trials in flight spent a 10-trial cell with 0 finished
    runs. Cut off by an interruption (a new driver finds them running): PRUNED, not counted."""
    storage = f"sqlite:///{tmp_path / 'o.db'}"
    cell = Cell("c", {}, {"workload": "gpt", "steps": 1})
    cfg = BoundaryConfig(lr_range=(1e-3, 1.0), max_in_flight_per_cell=4, max_trials_per_cell=10)
    for _ in range(3):  # a driver asks 3-4 trials and dies before any finishes
        s = CellSearch(cell, cfg, storage, "t")
        asked = [x for x in (s.ask() for _ in range(4)) if x is not None]
        assert asked and s.trials_used() == len(asked)
    rep = search_local([cell], cfg, storage, "t", logistic_cell(math.log(0.05), 0.2))[0]
    assert rep["interrupted_trials"] == 9 and rep["failed_trials"] == 0
    assert rep["n_trials"] >= cfg.min_trials_per_cell and rep["stop_reason"] in ("interval", "budget")
    # a failed trial (an exception) counts against the budget
    s = CellSearch(Cell("f", {}, {"workload": "gpt", "steps": 1}), cfg, storage, "t")
    for _ in range(cfg.max_trials_per_cell):
        trial, _, _ = s.ask()
        s.tell(trial, None, failed=True)
    assert s.ask() is None and s.done() and s.report()["failed_trials"] == 10 and s.report()["stop_reason"] == "budget"


def test_a_study_refuses_other_settings_and_names_each(tmp_path):
    from orchestrator.boundary import check_studies

    storage = f"sqlite:///{tmp_path / 'o.db'}"
    cell = Cell("stabilizers=none", {"stabilizers": "none"}, {"workload": "gpt", "steps": 5, "depth": 2})
    cfg = BoundaryConfig(lr_range=(3e-3, 3.0), max_trials_per_cell=10)
    check_studies([cell], cfg, storage, "t")  # no store yet: nothing to compare, nothing created
    assert not (tmp_path / "o.db").exists()
    s = CellSearch(cell, cfg, storage, "t")
    trial, lr, seed = s.ask()
    s.tell(trial, gained(lambda lr, seed: 1.0)(type("C", (), {"lr": lr, "seed": seed})))
    # the budget and the stopping settings may change; the meaning of the trials may not
    CellSearch(cell, cfg.model_copy(update={"max_trials_per_cell": 20, "resolution": 1.3}), storage, "t")
    CellSearch(Cell(cell.key, cell.values, {**cell.base, "threads": 2}), cfg, storage, "t")
    wider = cfg.model_copy(update={"lr_range": (1e-3, 3.0)})
    want = r"boundary.lr_range: \[0.003, 3.0\] in the study, \[0.001, 3.0\] in the spec"
    with pytest.raises(SpecError, match=want):
        check_studies([cell], wider, storage, "t")
    with pytest.raises(SpecError, match=want + ".*another name"):
        CellSearch(cell, wider, storage, "t")
    deeper = Cell(cell.key, cell.values, {**cell.base, "depth": 4})
    with pytest.raises(SpecError, match=r"^depth: 2 in the study, 4 in the spec \(boundary study 't::stabilizers=none'"):
        check_studies([deeper], cfg, storage, "t")
    both = cfg.model_copy(update={"seed_offset": 100, "reference_seeds": 2})
    with pytest.raises(SpecError, match="boundary.reference_seeds: 3 in the study, 2 in the spec; fixed.seed: 0 in the study, 100 in"):
        check_studies([cell], both, storage, "t")
    # a study an older ablate made (trials, no recorded settings) is refused too
    import optuna

    old = optuna.create_study(storage=storage, study_name="t::old")
    old.tell(old.ask({"lr": optuna.distributions.FloatDistribution(1e-3, 1.0, log=True)}), 3.0)
    with pytest.raises(SpecError, match="made by an older ablate that did not record its settings"):
        check_studies([Cell("old", {}, {"workload": "gpt", "steps": 5})], cfg, storage, "t")


TINY = dict(workload="gpt", depth=1, width=32, heads=2, seq_len=32, batch_size=8, steps=100, schedule="constant",
            eval_interval=0, eval_batches=4, probe_interval=50, device="cpu", threads=1)


@pytest.mark.slow
def test_real_trials_a_cell_alone_or_beside_another_has_the_same_classes_and_lr50():
    """Real (tiny) GPT trials, each run once and reused: `none` searched alone, after `qk_norm` and
    before it gives the same runs, classes, LR50 and interval; and the tells of each batch in reverse
    order (trials finishing in another order) give the same report."""
    from workloads.trial import run

    cache = {}

    def evaluate(c):
        key = (c.stabilizer_label, c.lr, c.seed)
        if key not in cache:
            cache[key] = run(c).to_dict()
        return cache[key]

    none = Cell("stabilizers=none", {"stabilizers": "none"}, {**TINY, "stabilizers": ()})
    qk = Cell("stabilizers=qk_norm", {"stabilizers": "qk_norm"}, {**TINY, "stabilizers": ("qk_norm",)})
    cfg = BoundaryConfig(lr_range=(1e-2, 1.0), max_trials_per_cell=12, min_trials_per_cell=8, max_in_flight_per_cell=2)
    alone = search_local([none], cfg, None, "alone", evaluate)[0]
    after = search_local([qk, none], cfg, None, "after", evaluate)[1]
    before = search_local([none, qk], cfg, None, "before", evaluate)[0]

    s = CellSearch(none, cfg, None, "reversed")
    while not s.done():
        batch = [x for x in iter(s.ask, None)]
        if not batch:
            break
        for trial, lr, seed in reversed(batch):
            s.tell(trial, evaluate(TrialConfig(**{**none.base, "lr": lr, "seed": seed})))
    rev = s.report()
    keys = ("outcomes", "lr50", "lr50_low", "lr50_high", "n_trials", "stop_reason", "reference_gain", "criterion")
    for rep in (after, before, rev):
        assert {k: rep[k] for k in keys} == {k: alone[k] for k in keys}
    assert alone["reference_runs"] == 3 and alone["reference_lr"] == 1e-2
