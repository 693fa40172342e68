"""Sweep specs: one ml-collections file per sweep under configs/sweeps/, like configs/*.py.

A spec names a base experiment config, the overrides every run shares, the shape rule
(:mod:`jaxformer.scaling.shapes`), the runs (IsoFLOP profiles and/or an N x D grid) and
the rules that give each run its learning rate, warmup and batch. :func:`spec_schema`
holds every key with its default; anything else is an error naming the key, as for
experiment configs.
"""

from __future__ import annotations

import dataclasses
import difflib
from pathlib import Path
from typing import Any

import ml_collections

from jaxformer.config import ConfigError, run_get_config
from jaxformer.scaling.shapes import ShapeRule

REPO_ROOT = Path(__file__).resolve().parents[2]


def spec_schema() -> ml_collections.ConfigDict:
    """Every sweep spec key with its default."""
    c = ml_collections.ConfigDict()
    c.name = ""  # '' = the spec file's name
    c.base_config = "configs/default.py"  # experiment config every run starts from
    c.overrides = ()  # '--config.KEY=VALUE' strings every run gets (before the sweep's own)

    c.shape = ml_collections.ConfigDict(dataclasses.asdict(ShapeRule()))

    # IsoFLOP profiles: for each budget C (train FLOPs, flops.py's count), `sizes` model
    # sizes N with D = C / (FLOPs per token) tokens. The sizes are log-spaced between the
    # N at which D / N is tokens_per_param[1] and the N at which it is tokens_per_param[0]
    # (so the profile brackets the compute-optimal ratio), or `params` when given.
    c.isoflop = ml_collections.ConfigDict()
    c.isoflop.budgets = ()
    c.isoflop.sizes = 4
    c.isoflop.tokens_per_param = (4.0, 100.0)
    c.isoflop.params = ()
    # N x D grid: every size in params trained for every token count in tokens.
    c.grid = ml_collections.ConfigDict()
    c.grid.params = ()
    c.grid.tokens = ()

    c.rules = ml_collections.ConfigDict()
    r = c.rules
    r.lr = 3e-3  # peak learning rate at lr_ref_params non-embedding parameters
    r.lr_ref_params = 1e6
    r.lr_exponent = 0.0  # lr = lr x (N / lr_ref_params) ** -lr_exponent
    r.warmup_fraction = 0.05  # warmup steps = max(min_warmup_steps, fraction x steps)
    r.min_warmup_steps = 0
    r.global_batch = 16  # sequences per step at batch_ref_flops
    r.batch_ref_flops = 1e15
    r.batch_exponent = 0.0  # batch = global_batch x (C / batch_ref_flops) ** batch_exponent
    r.batch_multiple = 1  # batch rounded to a multiple of this (the data-parallel devices)
    r.min_steps = 20  # a run with fewer steps is an error: too short to mean anything
    r.evals = 4  # evaluations per run, the last at the final step
    r.eval_batches = 8  # batches per evaluation
    r.checkpoints = 4  # checkpoints per run, the last at the final step (resume points)
    r.logs = 20  # train-loss records per run
    r.budget_tolerance = 0.1  # an IsoFLOP run's FLOPs must be within this of its budget
    return c


def _check_keys(
    given: ml_collections.ConfigDict, schema: ml_collections.ConfigDict, where: str
) -> None:
    for key, value in given.items():
        name = f"{where}{key}"
        if key not in schema:
            close = difflib.get_close_matches(key, list(schema.keys()), n=1)
            hint = f" (did you mean '{where}{close[0]}'?)" if close else ""
            raise ConfigError(f"unknown sweep spec key '{name}'{hint}")
        default = schema[key]
        if isinstance(default, ml_collections.ConfigDict):
            if not isinstance(value, ml_collections.ConfigDict | dict):
                raise ConfigError(f"sweep spec key '{name}' must be a section")
            _check_keys(ml_collections.ConfigDict(value), default, name + ".")
        elif isinstance(default, tuple):
            if not isinstance(value, tuple | list):
                raise ConfigError(f"sweep spec key '{name}' must be a tuple, got {value!r}")
        elif isinstance(default, float):
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ConfigError(f"sweep spec key '{name}' must be a number, got {value!r}")
        elif type(value) is not type(default):
            raise ConfigError(
                f"sweep spec key '{name}' must be {type(default).__name__}, got {value!r}"
            )


def check_spec(spec: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Checks keys, types and values; returns the spec merged over the schema's defaults."""
    schema = spec_schema()
    _check_keys(spec, schema, "")
    out = spec_schema()
    out.update(spec.to_dict() if isinstance(spec, ml_collections.ConfigDict) else spec)
    ShapeRule.from_config(out.shape)
    iso, grid, r = out.isoflop, out.grid, out.rules
    if not iso.budgets and not (grid.params and grid.tokens):
        raise ConfigError(
            "sweep spec has no runs: set 'isoflop.budgets', or both 'grid.params' and 'grid.tokens'"
        )
    if bool(grid.params) != bool(grid.tokens):
        raise ConfigError("sweep spec keys 'grid.params' and 'grid.tokens' go together")
    for key in ("isoflop.budgets", "isoflop.params", "grid.params", "grid.tokens"):
        section, leaf = key.split(".")
        for value in out[section][leaf]:
            if not value > 0:
                raise ConfigError(f"sweep spec key '{key}' must hold positive numbers, got {value}")
    lo, hi = (tuple(iso.tokens_per_param) + (0, 0))[:2]
    if len(iso.tokens_per_param) != 2 or not 0 < lo < hi:
        raise ConfigError(
            f"sweep spec key 'isoflop.tokens_per_param' must be (low, high) with "
            f"0 < low < high, got {tuple(iso.tokens_per_param)}"
        )
    if iso.budgets and not iso.params and iso.sizes < 3:
        raise ConfigError(
            f"sweep spec key 'isoflop.sizes' ({iso.sizes}) must be at least 3: a parabola "
            "through each IsoFLOP profile needs three points"
        )
    for key in ("lr", "lr_ref_params", "batch_ref_flops", "budget_tolerance"):
        if not r[key] > 0:
            raise ConfigError(f"sweep spec key 'rules.{key}' must be positive, got {r[key]}")
    for key in ("global_batch", "batch_multiple", "min_steps", "evals", "checkpoints", "logs"):
        if r[key] < 1:
            raise ConfigError(f"sweep spec key 'rules.{key}' must be >= 1, got {r[key]}")
    if not 0 <= r.warmup_fraction < 1:
        raise ConfigError(
            f"sweep spec key 'rules.warmup_fraction' must be in [0, 1), got {r.warmup_fraction}"
        )
    for item in out.overrides:
        if not isinstance(item, str) or "=" not in item:
            raise ConfigError(
                f"sweep spec key 'overrides' holds {item!r}; each must be '--config.KEY=VALUE'"
            )
    return out


def resolve_config_path(path: str) -> Path:
    """A base config path as given: relative to the working directory, else to the
    repository jaxformer is installed from (so plans run from any directory)."""
    file, _, _ = path.partition(":")
    for root in (Path.cwd(), REPO_ROOT):
        if (root / file).is_file():
            return root / file
    raise ConfigError(f"sweep spec key 'base_config': config file '{file}' does not exist")


def load_spec(path: str | Path) -> ml_collections.ConfigDict:
    """Runs the spec file's ``get_config()`` and checks it; ``name`` defaults to the file's."""
    file = Path(path)
    raw: Any = run_get_config(str(file), what="sweep spec")
    spec = check_spec(ml_collections.ConfigDict(raw))
    if not spec.name:
        spec.name = file.stem
    return spec
