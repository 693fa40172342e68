"""Approaches 2 and 3 recover Hoffmann et al.'s published law from synthetic losses."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from jaxformer.scaling import fit, plots

# Hoffmann et al. (2022), equation 10.
E, A, B, ALPHA, BETA = 1.69, 406.4, 410.7, 0.34, 0.28


@pytest.fixture(scope="module")
def result() -> fit.FitResult:
    """IsoFLOP profiles at 7 budgets from 1e16 to 1e19 FLOPs, 9 sizes each spanning 40x
    around 20 tokens per parameter, D = C / 6N, losses with 1% multiplicative noise."""
    rng = np.random.default_rng(0)
    n, d, c = [], [], []
    for budget in np.logspace(16, 19, 7):
        for size in math.sqrt(budget / 120) * np.logspace(-0.8, 0.8, 9):
            n.append(size)
            d.append(budget / (6 * size))
            c.append(budget)
    n_arr, d_arr = np.array(n), np.array(d)
    loss = (E + A / n_arr**ALPHA + B / d_arr**BETA) * np.exp(0.01 * rng.standard_normal(len(n)))
    return fit.fit(n_arr, d_arr, c, loss, c, budget=1e17, bootstrap=20, starts=8)


def test_approach3_recovers_the_exponents_and_20_tokens_per_parameter(result) -> None:
    law = result.law
    assert law is not None and result.k == pytest.approx(6.0)
    assert abs(law.alpha - ALPHA) < 0.03 and abs(law.beta - BETA) < 0.03, law
    assert abs(law.E - E) < 0.2
    # The published law's own optimum at 1e17 FLOPs is 20.5 tokens per parameter (it
    # grows with C: 32 at 1e19, 50 at 1e21).
    true_n, true_d = fit.Law(E, A, B, ALPHA, BETA).optimal(1e17)
    assert true_d / true_n == pytest.approx(20.5, abs=0.1)
    opt = result.optimal["approach3"]
    assert opt["tokens_per_param"] == pytest.approx(true_d / true_n, rel=0.1)
    assert opt["N"] == pytest.approx(true_n, rel=0.1)
    lo, hi = result.law_ci["alpha"]
    assert lo < law.alpha < hi


def test_approach2_gives_exponents_near_one_half(result) -> None:
    a2 = result.approach2
    assert len(result.profiles) == 7
    # The law's exact exponents: beta / (alpha + beta) = 0.452 and 0.548.
    assert abs(a2["alpha"] - BETA / (ALPHA + BETA)) < 0.03
    assert abs(a2["beta"] - ALPHA / (ALPHA + BETA)) < 0.03
    assert a2["alpha"] + a2["beta"] == pytest.approx(1.0, abs=0.02)  # C = 6 N D
    assert result.optimal["approach2"]["tokens_per_param"] == pytest.approx(20.5, rel=0.1)
    lo, hi = result.approach2_ci["alpha"]
    assert lo <= a2["alpha"] <= hi


def test_report_and_plots(result, tmp_path: Path) -> None:
    text = fit.report(result)
    assert "alpha" in text and "compute-optimal at C = 1e+17" in text
    paths = plots.plot_all(result, tmp_path)
    names = sorted(p.name for p in paths)
    assert names == sorted(
        f"{s}.{e}" for s in ("isoflop", "frontier", "predicted") for e in ("png", "svg")
    )
    assert all(p.stat().st_size > 1000 for p in paths)


def test_a_profile_whose_minimum_is_off_its_range_is_left_out() -> None:
    """Losses that only rise with N put the parabola's vertex below the smallest model:
    approach 2 must not extrapolate it."""
    profile = fit.fit_profile(
        1e18, [1e6, 2e6, 4e6, 8e6], [8e6, 4e6, 2e6, 1e6], [3.0, 3.1, 3.3, 3.6]
    )
    assert not profile.used and "below the smallest" in profile.note
    assert math.isnan(profile.n_opt)
