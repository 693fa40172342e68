"""Scaling-law plots (PNG and SVG): IsoFLOP profiles with their parabolas, the
compute-optimal frontier, and the parametric law's predictions against the losses."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from jaxformer.scaling.fit import FitResult  # noqa: E402

# Same bytes for the same figure: no timestamp, fixed SVG ids.
_SAVE = {"png": {"metadata": {"Software": None}}, "svg": {"metadata": {"Date": None}}}


def _save(fig: plt.Figure, out: Path, stem: str) -> list[Path]:
    paths = []
    with plt.rc_context({"svg.hashsalt": "jaxformer"}):
        for ext, kwargs in _SAVE.items():
            path = out / f"{stem}.{ext}"
            fig.savefig(path, dpi=120, bbox_inches="tight", **kwargs)
            paths.append(path)
    plt.close(fig)
    return paths


def _colors(n: int) -> list:
    return [plt.get_cmap("viridis")(x) for x in np.linspace(0.1, 0.85, max(n, 1))]


def isoflop(result: FitResult, out: Path) -> list[Path]:
    """Loss against N per IsoFLOP budget, the parabola in log N and its minimum."""
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for p, color in zip(result.profiles, _colors(len(result.profiles)), strict=True):
        label = f"C = {p.budget:.2g}" + ("" if p.used else f" (not used: {p.note})")
        ax.scatter(p.n, p.loss, color=color, zorder=3, label=label)
        if p.parabola_n:
            x = np.linspace(math.log(min(p.n)) - 0.2, math.log(max(p.n)) + 0.2, 100)
            style = "-" if p.used else ":"
            ax.plot(np.exp(x), np.polyval(p.parabola_n, x), style, color=color, lw=1.2)
        if p.used:
            ax.scatter([p.n_opt], [p.loss_opt], color=color, marker="*", s=160, edgecolor="k",
                       zorder=4)  # fmt: skip
    ax.set_xscale("log")
    ax.set_xlabel(f"parameters N ({result.columns.get('N', 'params')})")
    ax.set_ylabel(f"loss ({result.columns.get('loss', 'eval_loss')}, nats/token)")
    ax.set_title("IsoFLOP profiles (approach 2); stars: parabola minima")
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2)
    ax.grid(alpha=0.3, which="both")
    return _save(fig, out, "isoflop")


def frontier(result: FitResult, out: Path) -> list[Path]:
    """Compute-optimal N and D against C: approach 2's minima and power laws, approach 3."""
    used = [p for p in result.profiles if p.used]
    budgets = [p.budget for p in used]
    span = [*result.flops, *([result.budget] if result.budget else [])]
    c = np.logspace(math.log10(min(span)) - 0.3, math.log10(max(span)) + 0.3, 50)
    fig, axes = plt.subplots(1, 2, figsize=(10.5, 4.2), gridspec_kw={"wspace": 0.35})
    for ax, key, label in ((axes[0], "n", "N_opt"), (axes[1], "d", "D_opt (tokens)")):
        ax.scatter(budgets, [getattr(p, f"{key}_opt") for p in used], color="C0",
                   zorder=3, label="IsoFLOP minima")  # fmt: skip
        a2 = result.approach2
        if a2:
            coef, exp = (a2["a"], a2["alpha"]) if key == "n" else (a2["b"], a2["beta"])
            ax.plot(c, coef * c**exp, color="C0", label=f"approach 2: C^{exp:.2f}")
        if result.law is not None:
            opt = np.array([result.law.optimal(x, result.k) for x in c])
            exp3 = result.law.n_exponent if key == "n" else 1 - result.law.n_exponent
            ax.plot(c, opt[:, 0 if key == "n" else 1], "--", color="C3",
                    label=f"approach 3: C^{exp3:.2f}")  # fmt: skip
        if result.budget:
            ax.axvline(result.budget, color="gray", lw=0.8, ls=":")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("train FLOPs C")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.suptitle("Compute-optimal frontier")
    return _save(fig, out, "frontier")


def predicted(result: FitResult, out: Path) -> list[Path]:
    """Approach 3's L(N, D) against each run's loss; the diagonal is a perfect fit."""
    if result.law is None:
        return []
    observed = np.array(result.loss)
    pred = result.law(np.array(result.n), np.array(result.d))
    fig, ax = plt.subplots(figsize=(4.8, 4.6))
    budgets = sorted({b for b in result.budget_of if math.isfinite(b)})
    colors = dict(zip(budgets, _colors(len(budgets)), strict=True))
    for b in [*budgets, math.nan]:
        idx = [i for i, x in enumerate(result.budget_of) if (x == b or (x != x and b != b))]
        if idx:
            label = f"C = {b:.2g}" if math.isfinite(b) else "grid"
            ax.scatter(observed[idx], pred[idx], color=colors.get(b, "C1"), label=label, zorder=3)
    lims = [min(observed.min(), pred.min()), max(observed.max(), pred.max())]
    pad = 0.05 * (lims[1] - lims[0] or 1.0)
    lims = [lims[0] - pad, lims[1] + pad]
    ax.plot(lims, lims, color="gray", lw=0.8)
    ax.set_xlim(lims)
    ax.set_ylim(lims)
    rms = float(np.sqrt(np.mean((np.log(pred) - np.log(observed)) ** 2)))
    ax.set_xlabel("observed loss")
    ax.set_ylabel("predicted loss, E + A/N^α + B/D^β")
    ax.set_title(f"Approach 3 fit (rms log error {rms:.3f})")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, out, "predicted")


def plot_all(result: FitResult, out_dir: str | Path) -> list[Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return [*isoflop(result, out), *frontier(result, out), *predicted(result, out)]
