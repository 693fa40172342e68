"""``jaxformer sweep collect``: one table row per finished run, from the run's own files.

Parameters, tokens and FLOPs are recounted from the config the run stored (config.json)
with the same accountant the plan used, and tokens from the last step the run logged, so
the table says what ran, not what was planned. Losses come from metrics.jsonl:

- ``eval_loss``: the held-out loss at the final step;
- ``eval_loss_smoothed``: the mean of the held-out losses logged in the last
  ``smooth_fraction`` of the steps (the final one included);
- ``train_loss_smoothed``: the same over the train-loss records (Hoffmann et al. fit a
  smoothed training loss; with less than one epoch of data it is a held-out loss too).
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

import ml_collections

from jaxformer.config import ConfigError
from jaxformer.scaling.runner import run_dir, status
from jaxformer.scaling.sweep_plan import load_sweep_plan
from jaxformer.tasks import count_flops

COLUMNS = (
    "name",
    "kind",
    "budget",
    "num_layers",
    "d_model",
    "params",
    "non_embedding_params",
    "train_flops_per_token",
    "steps",
    "tokens",
    "flops",
    "eval_loss",
    "eval_loss_smoothed",
    "train_loss_smoothed",
    "bits_per_byte",
    "lr",
    "wall_s",
)


def _records(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut short by a kill: the resumed run logs the step again
    return out


def _last_by_step(records: list[dict[str, Any]], split: str) -> dict[int, dict[str, Any]]:
    """One record per step, the latest written (a resumed run logs some steps twice)."""
    return {r["step"]: r for r in records if r.get("split") == split}


def summarize(directory: Path, smooth_fraction: float = 0.1) -> dict[str, Any] | None:
    """A finished run's row, or None when it has no final-step evaluation."""
    cfg_path = directory / "config.json"
    if not cfg_path.is_file():
        return None
    cfg = ml_collections.ConfigDict(json.loads(cfg_path.read_text()))
    steps = cfg.train.steps
    records = _records(directory / "metrics.jsonl")
    evals, trains = _last_by_step(records, "eval"), _last_by_step(records, "train")
    if steps not in evals:
        return None
    count = count_flops(cfg.model, cfg.data.seq_len)
    tokens = steps * cfg.train.global_batch * cfg.data.seq_len
    start = steps * (1 - smooth_fraction)

    def tail_mean(by_step: dict[int, dict[str, Any]]) -> float:
        values = [r["loss"] for s, r in by_step.items() if s >= start and s > 0]
        return sum(values) / len(values) if values else math.nan

    times = [r["time"] for r in records]
    final = evals[steps]
    return {
        "num_layers": cfg.model.num_layers,
        "d_model": cfg.model.d_model,
        "params": count.params,
        "non_embedding_params": count.non_embedding_params,
        "train_flops_per_token": count.train_flops_per_token,
        "steps": steps,
        "tokens": tokens,
        "flops": count.train_flops(tokens),
        "eval_loss": final["loss"],
        "eval_loss_smoothed": tail_mean(evals),
        "train_loss_smoothed": tail_mean(trains),
        "bits_per_byte": final.get("bits_per_byte", math.nan),
        "lr": cfg.optimizer.lr,
        "wall_s": max(times) - min(times) if times else math.nan,
    }


def collect(plan_dir: str | Path, smooth_fraction: float = 0.1) -> tuple[list[dict], list[str]]:
    """Rows of the finished runs and the names of the others."""
    if not 0 < smooth_fraction <= 1:
        raise ConfigError(f"--smooth_fraction must be in (0, 1], got {smooth_fraction}")
    plan = load_sweep_plan(plan_dir)
    rows, missing = [], []
    for run in plan.runs:
        row = summarize(run_dir(plan_dir, run), smooth_fraction)
        if row is None or status(plan_dir, run) != "done":
            missing.append(run.name)
            continue
        rows.append({"name": run.name, "kind": run.kind, "budget": run.budget, **row})
    return rows, missing


def write_csv(rows: list[dict[str, Any]], path: str | Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: row[k] for k in COLUMNS})


def read_csv(path: str | Path) -> list[dict[str, Any]]:
    """A collected table with numbers parsed; other columns stay strings."""
    if not Path(path).is_file():
        raise ConfigError(f"table '{path}' does not exist: run `jaxformer sweep collect` first")
    rows = []
    with open(path, newline="") as f:
        for raw in csv.DictReader(f):
            row: dict[str, Any] = {}
            for k, v in raw.items():
                try:
                    row[k] = float(v)
                except (TypeError, ValueError):
                    row[k] = v
            rows.append(row)
    return rows
