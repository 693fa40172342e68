"""``jaxformer sweep fit``: Chinchilla's approaches 2 and 3 (Hoffmann et al. 2022, section 3).

Approach 2 fits a parabola to each IsoFLOP profile, loss against log N (and against log D),
takes its minimum as the compute-optimal N_opt(C) (and D_opt(C)), and fits the power laws
N_opt = a C^alpha and D_opt = b C^beta by least squares in log-log. A profile whose
minimum falls outside the sizes it sampled (its losses only fall towards one end) says
nothing reliable about where the minimum is and is left out, with the reason printed.

Approach 3 fits the parametric law L(N, D) = E + A / N^alpha + B / D^beta to every run,
as Hoffmann et al. did: minimise the Huber loss (delta 1e-3) between
LSE(a - alpha log N, b - beta log D, e) and log L, with A = exp(a), B = exp(b),
E = exp(e), by L-BFGS from a grid of initialisations (alpha, beta in 0..2, e in -1..1,
a, b in 0..25). The objective is evaluated on the whole grid first and L-BFGS starts
from the best ``starts`` points of it, which finds the same optimum for far less work.
With C = k N D (k = 6 for the 6ND rule; for a sweep, the table's own FLOPs per parameter
per token), the law's compute-optimal allocation is N_opt = G (C/k)^(beta/(alpha+beta)),
D_opt = (C/k)^(alpha/(alpha+beta)) / G with G = (alpha A / (beta B))^(1/(alpha+beta)).

Confidence intervals are bootstrap percentiles: approach 3 resamples runs, approach 2
resamples runs within each profile.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy import optimize
from scipy.special import logsumexp
from threadpoolctl import threadpool_limits

from jaxformer.config import ConfigError

HUBER_DELTA = 1e-3
# Hoffmann et al.'s initialisation grid (appendix D.2).
GRID = {
    "alpha": np.arange(0.0, 2.01, 0.5),
    "beta": np.arange(0.0, 2.01, 0.5),
    "e": np.arange(-1.0, 1.01, 0.5),
    "a": np.arange(0.0, 25.1, 5.0),
    "b": np.arange(0.0, 25.1, 5.0),
}
CI = (2.5, 97.5)  # a 95% interval


# ---------------------------------------------------------------- approach 3


def _huber(r: np.ndarray, delta: float) -> tuple[np.ndarray, np.ndarray]:
    """Huber loss of residuals and its derivative."""
    small = np.abs(r) <= delta
    value = np.where(small, 0.5 * r * r, delta * (np.abs(r) - 0.5 * delta))
    return value, np.clip(r, -delta, delta)


def _objective(
    theta: np.ndarray, log_n: np.ndarray, log_d: np.ndarray, log_l: np.ndarray, delta: float
) -> tuple[float, np.ndarray]:
    """Huber loss of LSE(a - alpha log N, b - beta log D, e) - log L, and its gradient in
    theta = (a, b, e, alpha, beta)."""
    a, b, e, alpha, beta = theta
    t0, t1 = a - alpha * log_n, b - beta * log_d
    top = np.maximum(np.maximum(t0, t1), e)
    w0, w1, w2 = np.exp(t0 - top), np.exp(t1 - top), np.exp(e - top)
    total = w0 + w1 + w2
    pred = top + np.log(total)
    value, slope = _huber(pred - log_l, delta)
    # d pred / d term is the softmax of the terms.
    s0, s1, s2 = slope * w0 / total, slope * w1 / total, slope * w2 / total
    grad = np.array([s0.sum(), s1.sum(), s2.sum(), -(s0 @ log_n), -(s1 @ log_d)])
    return float(np.sum(value)), grad


def _grid_objective(
    thetas: np.ndarray, log_n: np.ndarray, log_d: np.ndarray, log_l: np.ndarray, delta: float
) -> np.ndarray:
    """The objective at many theta rows at once (no gradient): ranks the grid."""
    a, b, e, alpha, beta = (thetas[:, i : i + 1] for i in range(5))
    terms = np.stack(
        [a - alpha * log_n, b - beta * log_d, np.broadcast_to(e, (len(thetas), len(log_n)))]
    )
    pred = logsumexp(terms, axis=0)
    return _huber(pred - log_l, delta)[0].sum(axis=1)


def _grid() -> np.ndarray:
    rows = itertools.product(GRID["a"], GRID["b"], GRID["e"], GRID["alpha"], GRID["beta"])
    return np.array(list(rows))


# Box for L-BFGS-B, wide enough never to bind on a law that fits (the grid lies well
# inside): it only stops a degenerate fit (a resample with too few sizes or budgets) from
# running A, B or the exponents off to infinity. E = exp(e) >= exp(-30) ~ 1e-13 is 0.
BOUNDS = [(-30.0, 80.0), (-30.0, 80.0), (-30.0, 5.0), (0.0, 5.0), (0.0, 5.0)]


def _lbfgs(theta0: np.ndarray, data: tuple[np.ndarray, ...], delta: float) -> Any:
    return optimize.minimize(
        _objective,
        theta0,
        args=(*data, delta),
        jac=True,
        method="L-BFGS-B",
        bounds=BOUNDS,
        options={"maxiter": 2000, "ftol": 1e-15, "gtol": 1e-12},
    )


def fit_law(
    n: Sequence[float],
    d: Sequence[float],
    loss: Sequence[float],
    *,
    starts: int = 32,
    init: Sequence[np.ndarray] = (),
    delta: float = HUBER_DELTA,
) -> np.ndarray:
    """Fits L(N, D) = E + A/N^alpha + B/D^beta; returns theta = (a, b, e, alpha, beta).

    ``starts`` best points of Hoffmann et al.'s grid (0: none) and the ``init`` thetas
    start L-BFGS; the best result wins.
    """
    log_n, log_d, log_l = (np.log(np.asarray(x, float)) for x in (n, d, loss))
    if len(log_n) < 5:
        raise ConfigError(
            f"approach 3 fits 5 parameters and needs at least 5 runs, got {len(log_n)}"
        )
    data = (log_n, log_d, log_l)
    candidates = [np.asarray(t, float) for t in init]
    if starts:
        grid = _grid()
        ranked = np.argsort(_grid_objective(grid, *data, delta))
        candidates += list(grid[ranked[:starts]])
    best = None
    for theta0 in candidates:
        result = _lbfgs(theta0, data, delta)
        if best is None or result.fun < best.fun:
            best = result
    assert best is not None
    return best.x


@dataclasses.dataclass(frozen=True)
class Law:
    """L(N, D) = E + A / N^alpha + B / D^beta."""

    E: float
    A: float
    B: float
    alpha: float
    beta: float

    @classmethod
    def from_theta(cls, theta: np.ndarray) -> Law:
        a, b, e, alpha, beta = (float(x) for x in theta)
        return cls(math.exp(e), math.exp(a), math.exp(b), alpha, beta)

    def __call__(self, n: Any, d: Any) -> Any:
        return self.E + self.A / np.power(n, self.alpha) + self.B / np.power(d, self.beta)

    def optimal(self, flops: float, k: float = 6.0) -> tuple[float, float]:
        """Compute-optimal (N, D) for C = k N D."""
        s = self.alpha + self.beta
        g = (self.alpha * self.A / (self.beta * self.B)) ** (1 / s)
        return g * (flops / k) ** (self.beta / s), (flops / k) ** (self.alpha / s) / g

    @property
    def n_exponent(self) -> float:
        """N_opt ~ C^(beta / (alpha + beta))."""
        return self.beta / (self.alpha + self.beta)


# ---------------------------------------------------------------- approach 2


@dataclasses.dataclass(frozen=True)
class Profile:
    """One IsoFLOP profile and the parabolas through it."""

    budget: float
    n: list[float]
    d: list[float]
    loss: list[float]
    parabola_n: list[float]  # loss = p[0] x^2 + p[1] x + p[2], x = ln N; [] if < 3 sizes
    parabola_d: list[float]  # the same in ln D
    n_opt: float  # nan when the profile is not used
    d_opt: float
    loss_opt: float
    note: str = ""  # why the profile is not used; '' when it is

    @property
    def used(self) -> bool:
        return not self.note


def _parabola(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, float, float, str]:
    """A least-squares parabola, its argmin and min, and why its minimum is unusable ('' if
    it is usable): it must open upward and have its minimum inside the sampled range (a
    profile whose losses only fall towards one end has its minimum beyond it)."""
    if len(np.unique(x)) < 3:
        return np.array([]), math.nan, math.nan, "fewer than 3 sizes"
    p = np.polyfit(x, y, 2)
    if p[0] <= 0:
        return p, math.nan, math.nan, "no minimum: opens downward"
    x0 = -p[1] / (2 * p[0])
    if not x.min() <= x0 <= x.max():
        where = "below the smallest" if x0 < x.min() else "above the largest"
        return p, x0, float(np.polyval(p, x0)), f"minimum {where} size"
    return p, float(x0), float(np.polyval(p, x0)), ""


def fit_profile(
    budget: float, n: Sequence[float], d: Sequence[float], loss: Sequence[float]
) -> Profile:
    """The parabolas of one profile in ln N and ln D; ``note`` says if it is unusable."""
    n_arr, d_arr, l_arr = (np.asarray(x, float) for x in (n, d, loss))
    p_n, x_n, l_n, note_n = _parabola(np.log(n_arr), l_arr)
    p_d, x_d, _, note_d = _parabola(np.log(d_arr), l_arr)
    note = note_n or note_d
    return Profile(
        float(budget),
        list(map(float, n_arr)),
        list(map(float, d_arr)),
        list(map(float, l_arr)),
        list(map(float, p_n)),
        list(map(float, p_d)),
        math.nan if note else math.exp(x_n),
        math.nan if note else math.exp(x_d),
        math.nan if note else l_n,
        note,
    )


def power_law(c: Sequence[float], y: Sequence[float]) -> tuple[float, float]:
    """(coefficient, exponent) of y = coefficient x C^exponent, least squares in log-log."""
    exponent, intercept = np.polyfit(np.log(c), np.log(y), 1)
    return math.exp(intercept), float(exponent)


# ---------------------------------------------------------------- both, with bootstrap


@dataclasses.dataclass
class FitResult:
    """Both approaches' estimates, their bootstrap intervals and the data behind them."""

    n: list[float]
    d: list[float]
    flops: list[float]
    loss: list[float]
    budget_of: list[float]  # each run's IsoFLOP budget (nan: not on a profile)
    k: float  # FLOPs per parameter per token: C = k N D
    law: Law | None
    law_ci: dict[str, tuple[float, float]]
    profiles: list[Profile]
    approach2: dict[str, float]  # a, alpha (N_opt), b, beta (D_opt)
    approach2_ci: dict[str, tuple[float, float]]
    budget: float | None
    optimal: dict[str, dict[str, float]]  # approach -> N, D, tokens_per_param, loss
    optimal_ci: dict[str, dict[str, tuple[float, float]]]
    columns: dict[str, str]

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["law"] = dataclasses.asdict(self.law) if self.law else None
        return out


def _ci(samples: list[float]) -> tuple[float, float]:
    if not samples:
        return (math.nan, math.nan)
    lo, hi = np.percentile(samples, CI)
    return float(lo), float(hi)


def _approach2(
    groups: dict[float, list[int]], n: np.ndarray, d: np.ndarray, loss: np.ndarray
) -> tuple[list[Profile], dict[str, float]]:
    profiles = [fit_profile(c, n[idx], d[idx], loss[idx]) for c, idx in sorted(groups.items())]
    used = [p for p in profiles if p.used]
    if len(used) < 2:
        return profiles, {}
    budgets = [p.budget for p in used]
    a, alpha = power_law(budgets, [p.n_opt for p in used])
    b, beta = power_law(budgets, [p.d_opt for p in used])
    return profiles, {"a": a, "alpha": alpha, "b": b, "beta": beta}


def fit(
    n: Sequence[float],
    d: Sequence[float],
    flops: Sequence[float],
    loss: Sequence[float],
    budget_of: Sequence[float] | None = None,
    *,
    budget: float | None = None,
    bootstrap: int = 200,
    starts: int = 32,
    seed: int = 0,
    columns: dict[str, str] | None = None,
) -> FitResult:
    """Approaches 2 (runs grouped by ``budget_of``) and 3 on arrays of runs."""
    # L-BFGS-B makes thousands of tiny LAPACK calls; on OpenBLAS's thread pool each costs
    # milliseconds when the cores are busy (a fit took 12x longer on a loaded 2-core machine).
    with threadpool_limits(limits=1, user_api="blas"):
        return _fit(n, d, flops, loss, budget_of, budget, bootstrap, starts, seed, columns)


def _fit(
    n: Sequence[float],
    d: Sequence[float],
    flops: Sequence[float],
    loss: Sequence[float],
    budget_of: Sequence[float] | None,
    budget: float | None,
    bootstrap: int,
    starts: int,
    seed: int,
    columns: dict[str, str] | None,
) -> FitResult:
    n_arr, d_arr, c_arr, l_arr = (np.asarray(x, float) for x in (n, d, flops, loss))
    if not (len(n_arr) == len(d_arr) == len(c_arr) == len(l_arr)):
        raise ConfigError("N, D, FLOPs and loss columns differ in length")
    bad = ~(np.isfinite(l_arr) & (l_arr > 0) & (n_arr > 0) & (d_arr > 0))
    if bad.any():
        raise ConfigError(f"{int(bad.sum())} run(s) have a missing or non-positive N, D or loss")
    groups_of = np.full(len(n_arr), np.nan) if budget_of is None else np.asarray(budget_of, float)
    groups: dict[float, list[int]] = {}
    for i, c in enumerate(groups_of):
        if np.isfinite(c):
            groups.setdefault(float(c), []).append(i)
    k = float(np.exp(np.mean(np.log(c_arr / (n_arr * d_arr)))))
    rng = np.random.default_rng(seed)

    theta = fit_law(n_arr, d_arr, l_arr, starts=starts) if len(n_arr) >= 5 else None
    law = None if theta is None else Law.from_theta(theta)
    # Each resample starts from the full-data optimum and from the grid's 4 best points,
    # so a resample whose optimum lies in another basin can still reach it.
    boot_init: list[np.ndarray] = []
    if theta is not None:
        data = tuple(np.log(x) for x in (n_arr, d_arr, l_arr))
        grid = _grid()
        boot_init = [theta, *grid[np.argsort(_grid_objective(grid, *data, HUBER_DELTA))[:4]]]
    law_samples: dict[str, list[float]] = {}
    opt3_samples: dict[str, list[float]] = {}
    if law is not None:
        for _ in range(bootstrap):
            idx = rng.integers(0, len(n_arr), len(n_arr))
            if len(np.unique(idx)) < 5:
                continue
            boot = Law.from_theta(
                fit_law(n_arr[idx], d_arr[idx], l_arr[idx], starts=0, init=boot_init)
            )
            for key, value in dataclasses.asdict(boot).items():
                law_samples.setdefault(key, []).append(value)
            law_samples.setdefault("n_exponent", []).append(boot.n_exponent)
            if budget:
                bn, bd = boot.optimal(budget, k)
                opt3_samples.setdefault("N", []).append(bn)
                opt3_samples.setdefault("D", []).append(bd)
                opt3_samples.setdefault("tokens_per_param", []).append(bd / bn)

    profiles, approach2 = _approach2(groups, n_arr, d_arr, l_arr)
    a2_samples: dict[str, list[float]] = {}
    opt2_samples: dict[str, list[float]] = {}
    if approach2:
        for _ in range(bootstrap):
            resampled = {
                c: list(rng.choice(idx, len(idx), replace=True)) for c, idx in groups.items()
            }
            _, boot2 = _approach2(resampled, n_arr, d_arr, l_arr)
            if not boot2:
                continue
            for key, value in boot2.items():
                a2_samples.setdefault(key, []).append(value)
            if budget:
                bn = boot2["a"] * budget ** boot2["alpha"]
                bd = boot2["b"] * budget ** boot2["beta"]
                opt2_samples.setdefault("N", []).append(bn)
                opt2_samples.setdefault("D", []).append(bd)
                opt2_samples.setdefault("tokens_per_param", []).append(bd / bn)

    optimal: dict[str, dict[str, float]] = {}
    if budget and law is not None:
        on, od = law.optimal(budget, k)
        optimal["approach3"] = {
            "N": on, "D": od, "tokens_per_param": od / on, "loss": float(law(on, od))
        }  # fmt: skip
    if budget and approach2:
        on = approach2["a"] * budget ** approach2["alpha"]
        od = approach2["b"] * budget ** approach2["beta"]
        optimal["approach2"] = {"N": on, "D": od, "tokens_per_param": od / on}
    return FitResult(
        n=list(map(float, n_arr)),
        d=list(map(float, d_arr)),
        flops=list(map(float, c_arr)),
        loss=list(map(float, l_arr)),
        budget_of=list(map(float, groups_of)),
        k=k,
        law=law,
        law_ci={key: _ci(v) for key, v in law_samples.items()},
        profiles=profiles,
        approach2=approach2,
        approach2_ci={key: _ci(v) for key, v in a2_samples.items()},
        budget=budget,
        optimal=optimal,
        optimal_ci={
            "approach3": {key: _ci(v) for key, v in opt3_samples.items()},
            "approach2": {key: _ci(v) for key, v in opt2_samples.items()},
        },
        columns=columns or {},
    )


def fit_table(
    path: str | Path,
    *,
    loss: str = "eval_loss",
    params: str = "params",
    budget: float | None = None,
    bootstrap: int = 200,
    starts: int = 32,
    seed: int = 0,
) -> FitResult:
    """:func:`fit` on a ``sweep collect`` CSV: N from ``params``, D from ``tokens``, FLOPs
    from ``flops``, profiles from the ``budget`` of the isoflop runs."""
    from jaxformer.scaling.collect import read_csv

    rows = read_csv(path)
    if not rows:
        raise ConfigError(f"table '{path}' has no runs")
    for column in (loss, params, "tokens", "flops", "budget", "kind"):
        if column not in rows[0]:
            raise ConfigError(f"table '{path}' has no column '{column}' (have {list(rows[0])})")
    budget_of = [r["budget"] if r["kind"] == "isoflop" else math.nan for r in rows]
    return fit(
        [r[params] for r in rows],
        [r["tokens"] for r in rows],
        [r["flops"] for r in rows],
        [r[loss] for r in rows],
        budget_of,
        budget=budget,
        bootstrap=bootstrap,
        starts=starts,
        seed=seed,
        columns={"N": params, "loss": loss, "table": str(path)},
    )


def _with_ci(value: float, ci: tuple[float, float] | None, fmt: str = ".3g") -> str:
    if not ci or not all(map(math.isfinite, ci)):
        return f"{value:{fmt}}"
    return f"{value:{fmt}} [{ci[0]:{fmt}}, {ci[1]:{fmt}}]"


def report(r: FitResult) -> str:
    """The fitted constants and the compute-optimal allocation, as printed by the CLI."""
    where = f" ({r.columns['N']} as N, {r.columns['loss']} as loss)" if r.columns else ""
    lines = [f"{len(r.n)} runs{where}; C = {r.k:.3g} N D on average; [95% bootstrap interval]"]
    lines.append("approach 2 (a parabola per IsoFLOP profile, minima fitted to power laws):")
    for p in r.profiles:
        if p.used:
            lines.append(
                f"  C {p.budget:.3g}: N_opt {p.n_opt:.3g}  D_opt {p.d_opt:.3g}  "
                f"D/N {p.d_opt / p.n_opt:.3g}  loss {p.loss_opt:.4f}  ({len(p.n)} runs)"
            )
        else:
            lines.append(f"  C {p.budget:.3g}: not used: {p.note} ({len(p.n)} runs)")
    if r.approach2:
        ci = r.approach2_ci
        lines.append(
            f"  N_opt = {r.approach2['a']:.3g} C^{_with_ci(r.approach2['alpha'], ci.get('alpha'))}"
        )
        lines.append(
            f"  D_opt = {r.approach2['b']:.3g} C^{_with_ci(r.approach2['beta'], ci.get('beta'))}"
        )
    else:
        lines.append("  fewer than two profiles with a usable minimum: no power law")
    lines.append("approach 3 (L = E + A/N^alpha + B/D^beta, Huber on log loss, L-BFGS):")
    if r.law is not None:
        ci = r.law_ci
        for key in ("E", "A", "B", "alpha", "beta"):
            lines.append(f"  {key:<5} = {_with_ci(getattr(r.law, key), ci.get(key))}")
        if r.law.E / min(r.loss) < 1e-3:
            lines.append("  (E ~ 0: these losses are too far above the floor to resolve it)")
        lines.append(
            f"  N_opt ~ C^{_with_ci(r.law.n_exponent, ci.get('n_exponent'))}, "
            f"D_opt ~ C^{1 - r.law.n_exponent:.3g}"
        )
    else:
        lines.append("  fewer than 5 runs: not fitted")
    if r.budget:
        lines.append(f"compute-optimal at C = {r.budget:.3g} FLOPs:")
        for name, opt in r.optimal.items():
            ci = r.optimal_ci.get(name, {})
            lines.append(
                f"  {name}: N {_with_ci(opt['N'], ci.get('N'))}"
                f"  D {_with_ci(opt['D'], ci.get('D'))}"
                f"  D/N {_with_ci(opt['tokens_per_param'], ci.get('tokens_per_param'))}"
                + (f"  loss {opt['loss']:.4f}" if "loss" in opt else "")
            )
    return "\n".join(lines)
