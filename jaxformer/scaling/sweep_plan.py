"""``jaxformer sweep plan``: a sweep spec turned into complete, reproducible runs.

Each run is the spec's base config plus a list of ``--config.KEY=VALUE`` overrides that
fixes everything that varies (shape, steps, batch, learning rate, warmup, eval and
checkpoint cadence), so ``jaxformer train --config=BASE $(cat configs/NAME.args)``
reproduces it anywhere. A run's compute is the accountant's (``flops.count``):
train FLOPs per token x tokens, with the integer step count rounded to land nearest the
budget; a run that cannot come within ``rules.budget_tolerance`` of it is refused.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import ml_collections

from jaxformer.config import ConfigError, load_config
from jaxformer.scaling.shapes import Shape, ShapeRule, shape_for_params
from jaxformer.scaling.spec import load_spec, resolve_config_path

PLAN_FILE = "plan.json"


@dataclasses.dataclass
class PlannedRun:
    """One training run of a sweep and the figures it is planned to reach."""

    name: str
    kind: str  # isoflop | grid
    budget: float  # the IsoFLOP budget C; for grid runs, the run's own FLOPs
    num_layers: int
    d_model: int
    num_heads: int
    d_ff: int
    params: int
    non_embedding_params: int
    train_flops_per_token: int
    steps: int
    global_batch: int
    seq_len: int
    tokens: int
    flops: float  # train_flops_per_token x tokens
    lr: float
    warmup_steps: int
    overrides: list[str]

    @property
    def budget_error(self) -> float:
        return self.flops / self.budget - 1.0


@dataclasses.dataclass
class SweepPlan:
    """A sweep's runs, with the spec and base config they came from."""

    name: str
    base_config: str
    spec: dict[str, Any]
    runs: list[PlannedRun]

    def to_json(self) -> str:
        return json.dumps(
            {
                "name": self.name,
                "base_config": self.base_config,
                "spec": self.spec,
                "runs": [dataclasses.asdict(r) for r in self.runs],
            },
            indent=2,
        )

    @classmethod
    def from_json(cls, text: str) -> SweepPlan:
        data = json.loads(text)
        runs = [PlannedRun(**r) for r in data["runs"]]
        return cls(data["name"], data["base_config"], data["spec"], runs)

    def run(self, name: str) -> PlannedRun:
        for r in self.runs:
            if r.name == name:
                return r
        raise ConfigError(f"plan '{self.name}' has no run named '{name}'")


def load_sweep_plan(plan_dir: str | Path) -> SweepPlan:
    path = Path(plan_dir) / PLAN_FILE
    if not path.is_file():
        raise ConfigError(f"no {PLAN_FILE} in '{plan_dir}': run `jaxformer sweep plan` first")
    return SweepPlan.from_json(path.read_text())


def _si(x: float) -> str:
    """12_300 -> '12.3k': compact figures for run names and tables."""
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{unit}"
    return f"{x:.3g}"


def _budget_name(c: float) -> str:
    mantissa, exponent = f"{c:.2e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}".replace(".", "p")


def _schedule(rules: ml_collections.ConfigDict, steps: int) -> dict[str, int]:
    """Eval, checkpoint and log cadence, each landing on the final step."""
    return {
        "train.eval_every": math.ceil(steps / rules.evals),
        "train.checkpoint_every": math.ceil(steps / rules.checkpoints),
        "train.log_every": max(1, math.ceil(steps / rules.logs)),
    }


def _batch(rules: ml_collections.ConfigDict, flops: float) -> int:
    raw = rules.global_batch * (flops / rules.batch_ref_flops) ** rules.batch_exponent
    return max(rules.batch_multiple, rules.batch_multiple * round(raw / rules.batch_multiple))


def _make_run(
    name: str,
    kind: str,
    budget: float | None,
    shape: Shape,
    steps: int,
    batch: int,
    seq_len: int,
    rules: ml_collections.ConfigDict,
    shared: list[str],
) -> PlannedRun:
    tokens = steps * batch * seq_len
    flops = float(shape.train_flops_per_token) * tokens
    lr = rules.lr * (shape.non_embedding_params / rules.lr_ref_params) ** -rules.lr_exponent
    warmup = max(rules.min_warmup_steps, round(rules.warmup_fraction * steps))
    warmup = min(warmup, steps - 1)
    keys: dict[str, Any] = {
        **shape.overrides(),
        "model.head_dim": 0,
        "train.steps": steps,
        "train.global_batch": batch,
        "optimizer.lr": float(f"{lr:.4g}"),
        "optimizer.warmup_steps": warmup,
        "train.eval_batches": rules.eval_batches,
        **_schedule(rules, steps),
    }
    overrides = [*shared, *(f"--config.{k}={v}" for k, v in keys.items())]
    return PlannedRun(
        name=name,
        kind=kind,
        budget=flops if budget is None else float(budget),
        num_layers=shape.num_layers,
        d_model=shape.d_model,
        num_heads=shape.num_heads,
        d_ff=shape.d_ff,
        params=shape.params,
        non_embedding_params=shape.non_embedding_params,
        train_flops_per_token=shape.train_flops_per_token,
        steps=steps,
        global_batch=batch,
        seq_len=seq_len,
        tokens=tokens,
        flops=flops,
        lr=float(f"{lr:.4g}"),
        warmup_steps=warmup,
        overrides=overrides,
    )


def _isoflop_sizes(budget: float, iso: ml_collections.ConfigDict) -> list[float]:
    """Target N for one budget: log-spaced over the tokens-per-parameter range (6N FLOPs
    per token), or the spec's fixed sizes."""
    if iso.params:
        return [float(n) for n in iso.params]
    lo, hi = iso.tokens_per_param
    n_small, n_large = math.sqrt(budget / (6 * hi)), math.sqrt(budget / (6 * lo))
    k = iso.sizes
    return [n_small * (n_large / n_small) ** (i / (k - 1)) for i in range(k)]


def make_sweep_plan(spec: ml_collections.ConfigDict) -> SweepPlan:
    """Every run of a checked spec (:func:`jaxformer.scaling.spec.load_spec`)."""
    base_path = resolve_config_path(spec.base_config)
    shared = list(spec.overrides)
    try:
        base = load_config(str(base_path), shared)
    except ConfigError as err:
        raise ConfigError(f"sweep spec 'overrides': {err}") from err
    rule = ShapeRule.from_config(spec.shape)
    seq_len, rules = base.data.seq_len, spec.rules
    runs: list[PlannedRun] = []

    for budget in spec.isoflop.budgets:
        batch = _batch(rules, budget)
        seen: set[tuple[int, int]] = set()
        for target in _isoflop_sizes(budget, spec.isoflop):
            shape = shape_for_params(target, base.model, rule, seq_len)
            if (shape.num_layers, shape.d_model) in seen:
                continue  # two targets snapped to one shape: train it once
            seen.add((shape.num_layers, shape.d_model))
            steps = round(budget / (shape.train_flops_per_token * batch * seq_len))
            name = f"c{_budget_name(budget)}_n{_si(shape.counted(rule.count))}"
            if steps < rules.min_steps:
                raise ConfigError(
                    f"run {name}: budget {budget:.3g} FLOPs buys {steps} steps of "
                    f"{batch} x {seq_len} tokens for {shape.params:,} parameters, under "
                    f"rules.min_steps ({rules.min_steps}); raise the budget, lower "
                    "rules.global_batch or narrow isoflop.tokens_per_param"
                )
            run = _make_run(name, "isoflop", budget, shape, steps, batch, seq_len, rules, shared)
            if abs(run.budget_error) > rules.budget_tolerance:
                raise ConfigError(
                    f"run {name}: {steps} steps give {run.flops:.3g} FLOPs, "
                    f"{run.budget_error:+.1%} off the budget {budget:.3g} (more than "
                    f"rules.budget_tolerance = {rules.budget_tolerance:.0%})"
                )
            runs.append(run)
        sizes = sum(r.budget == float(budget) for r in runs)
        if not spec.isoflop.params and sizes < 3:
            raise ConfigError(
                f"budget {budget:.3g}: the sizes snapped to only {sizes} distinct shapes; "
                "widen isoflop.tokens_per_param or lower shape.tolerance"
            )

    for target in spec.grid.params:
        shape = shape_for_params(float(target), base.model, rule, seq_len)
        for tokens in spec.grid.tokens:
            batch = _batch(rules, shape.train_flops_per_token * float(tokens))
            steps = round(float(tokens) / (batch * seq_len))
            name = f"grid_n{_si(shape.counted(rule.count))}_d{_si(float(tokens))}"
            if steps < rules.min_steps:
                raise ConfigError(
                    f"run {name}: {tokens:.3g} tokens are {steps} steps of {batch} x "
                    f"{seq_len}, under rules.min_steps ({rules.min_steps})"
                )
            runs.append(_make_run(name, "grid", None, shape, steps, batch, seq_len, rules, shared))

    names = [r.name for r in runs]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ConfigError(f"sweep spec plans runs with the same name twice: {duplicates}")
    for run in runs:  # every run must be a config the trainer accepts
        try:
            load_config(str(base_path), run.overrides)
        except ConfigError as err:
            raise ConfigError(f"run {run.name}: {err}") from err
    return SweepPlan(spec.name, spec.base_config, spec.to_dict(), runs)


def write_sweep_plan(plan: SweepPlan, out_dir: str | Path) -> Path:
    """Writes plan.json, plan.txt (the table) and, per run, configs/NAME.args (one override a
    line) and configs/NAME.json (the complete resolved config)."""
    out = Path(out_dir)
    existing = out / PLAN_FILE
    if existing.is_file():
        old = load_sweep_plan(out)
        started = [r.name for r in old.runs if (out / "runs" / r.name).exists()]
        changed = [n for n in started if n not in {r.name for r in plan.runs}] or [
            r.name for r in plan.runs if r.name in started and _differs(old.run(r.name), r)
        ]
        if changed:
            raise ConfigError(
                f"'{out}' holds a different plan whose runs {changed} have started; "
                "plan into a new directory (or delete those runs)"
            )
    (out / "configs").mkdir(parents=True, exist_ok=True)
    existing.write_text(plan.to_json() + "\n")
    (out / "plan.txt").write_text(table(plan) + "\n")
    base_path = resolve_config_path(plan.base_config)
    for run in plan.runs:
        (out / "configs" / f"{run.name}.args").write_text("\n".join(run.overrides) + "\n")
        cfg = load_config(str(base_path), run.overrides)
        (out / "configs" / f"{run.name}.json").write_text(cfg.to_json(indent=2, sort_keys=True))
    return existing


def _differs(a: PlannedRun, b: PlannedRun) -> bool:
    return a.overrides != b.overrides


def table(plan: SweepPlan) -> str:
    """The plan as a fixed-width table, one run a line."""
    head = (
        f"{'run':<22} {'budget':>9} {'L':>3} {'d':>5} {'H':>3} {'d_ff':>5} {'params':>8} "
        f"{'non-emb':>8} {'tokens':>8} {'D/N':>6} {'steps':>6} {'batch':>5} {'lr':>8} "
        f"{'warmup':>6} {'FLOPs':>9} {'vs C':>6}"
    )
    count = plan.spec.get("shape", {}).get("count", "non_embedding")
    lines = [
        f"sweep {plan.name}: {len(plan.runs)} runs of {plan.base_config} "
        f"(N in names and D/N: {count} parameters)",
        head,
    ]
    for r in plan.runs:
        n = r.params if count == "total" else r.non_embedding_params
        lines.append(
            f"{r.name:<22} {r.budget:>9.3g} {r.num_layers:>3} {r.d_model:>5} {r.num_heads:>3} "
            f"{r.d_ff:>5} {_si(r.params):>8} {_si(r.non_embedding_params):>8} "
            f"{_si(r.tokens):>8} {r.tokens / n:>6.1f} {r.steps:>6} "
            f"{r.global_batch:>5} {r.lr:>8.3g} {r.warmup_steps:>6} {r.flops:>9.3g} "
            f"{r.budget_error:>+6.1%}"
        )
    total = sum(r.flops for r in plan.runs)
    lines.append(f"total {total:.3g} train FLOPs ({sum(r.tokens for r in plan.runs):,} tokens)")
    return "\n".join(lines)


def sweep_plan_from_spec(spec_path: str | Path) -> SweepPlan:
    return make_sweep_plan(load_spec(spec_path))
