"""A run's checkpoints read from their files alone: listed, inspected, and their parameters
exported as safetensors (what ``jaxformer checkpoints list|inspect|export`` prints).

Everything is read on the CPU: no mesh, no model code, so a run can be examined on any
machine. Verifying reads every array of every checkpoint, which is what finds a truncated
or deleted file; without it a checkpoint is listed as ``committed`` from its metadata.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from jaxformer.errors import ConfigError

PARAMS_FILE = "params.safetensors"
META_FILE = "meta.json"


def _checkpointer(run_dir: str) -> Any:
    from jaxformer.train.checkpoint import Checkpointer

    directory = Path(run_dir) / "checkpoints"
    if not directory.is_dir():
        raise ConfigError(f"no checkpoints in '{run_dir}' (looked for {directory})")
    return Checkpointer(directory, keep=1_000_000, every=0, use_async=False)


def _step(ckpt: Any, step: int | None) -> int:
    steps = ckpt.all_steps()
    if not steps:
        raise ConfigError(f"no checkpoints in {ckpt.directory}")
    if step is None:
        return steps[-1]
    if step not in steps:
        raise ConfigError(f"no checkpoint at step {step} in {ckpt.directory}; steps: {steps}")
    return step


def _read_state(ckpt: Any, step: int) -> Any:
    """Every array of ``step``'s state as numpy, on the host."""
    import jax
    import numpy as np
    import orbax.checkpoint as ocp

    shapes = ckpt.state_metadata(step)
    target = jax.tree.map(lambda m: np.zeros(m.shape, m.dtype), shapes)
    return ckpt.manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target))
    )["state"]


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def list_checkpoints(run_dir: str, verify: bool) -> tuple[list[dict], bool]:
    """One row per checkpoint; the flag says whether all are valid."""
    ckpt = _checkpointer(run_dir)
    rows, all_ok = [], True
    try:
        for step in ckpt.all_steps():
            meta: dict = {}
            try:
                meta = ckpt.read_meta(step)
                ckpt.state_metadata(step)
                if verify:
                    _read_state(ckpt, step)
                status = "ok" if verify else "committed"
            except Exception as err:  # noqa: BLE001 - any failure to read is damage
                status = f"damaged ({type(err).__name__}: {str(err).splitlines()[0][:120]})"
                all_ok = False
            saved = meta.get("saved_at")
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(saved)) if saved else "?"
            rows.append({
                "step": step,
                "saved": when,
                "size_mb": _size(ckpt.directory / str(step)) / 2**20,
                "status": status,
            })  # fmt: skip
    finally:
        ckpt.close()
    damaged = Path(run_dir) / "damaged_checkpoints"
    if damaged.is_dir():
        for path in sorted(damaged.iterdir()):
            rows.append({
                "step": path.name, "saved": "?", "size_mb": _size(path) / 2**20,
                "status": f"moved aside as damaged ({path})",
            })  # fmt: skip
    return rows, all_ok


def inspect_checkpoint(run_dir: str, step: int | None) -> str:
    """The arrays (path, shape, dtype) and the stored config of one checkpoint."""
    from jaxformer.train.checkpoint import array_shapes

    ckpt = _checkpointer(run_dir)
    try:
        step = _step(ckpt, step)
        shapes = array_shapes(ckpt.state_metadata(step))
        meta = ckpt.read_meta(step)
    finally:
        ckpt.close()
    lines = [f"checkpoint step {step} in {ckpt.directory}"]
    for key in ("jaxformer", "jax", "mesh", "devices", "processes"):
        if key in meta:
            lines.append(f"  {key}: {meta[key]}")
    total = 0
    lines.append("arrays:")
    for name, (shape, dtype) in shapes.items():
        count = 1
        for n in shape:
            count *= n
        total += count if name.startswith("params/") else 0
        lines.append(f"  {name:60s} {str(shape):20s} {dtype}")
    lines.append(f"parameters: {total:,}")
    config = meta.get("config", {})
    lines.append("config:" if config else "config: (not recorded)")
    for section, values in sorted(config.items()):
        if isinstance(values, dict):
            lines += [f"  {section}.{k} = {v!r}" for k, v in sorted(values.items())]
        else:
            lines.append(f"  {section} = {values!r}")
    return "\n".join(lines)


def export_params(run_dir: str, out: str, step: int | None) -> Path:
    """Writes ``step``'s parameters to OUT/params.safetensors (names joined by '/') and
    its metadata (step, config, versions) to OUT/meta.json."""
    import numpy as np
    from safetensors.numpy import save_file

    from jaxformer.train.checkpoint import array_shapes

    target = Path(out)
    if target.exists() and any(target.iterdir()):
        raise ConfigError(f"'{out}' exists and is not empty: export into a new directory")
    ckpt = _checkpointer(run_dir)
    try:
        step = _step(ckpt, step)
        state = _read_state(ckpt, step)
        meta = ckpt.read_meta(step)
    finally:
        ckpt.close()
    import jax

    # NNX variables are stored as {"value": array}: the suffix names nothing.
    names = [n.removesuffix("/value") for n in array_shapes(state["params"])]
    leaves = jax.tree.leaves(state["params"])
    arrays = {n: np.ascontiguousarray(x) for n, x in zip(names, leaves, strict=True)}
    target.mkdir(parents=True, exist_ok=True)
    save_file(arrays, str(target / PARAMS_FILE))
    info = {"step": step, "source": str(Path(run_dir).absolute()), **meta}
    (target / META_FILE).write_text(json.dumps(info, indent=2) + "\n")
    return target


def load_exported(directory: str | Path) -> tuple[dict[str, Any], dict]:
    """The ``{name: array}`` parameters and the metadata of an export."""
    from safetensors.numpy import load_file

    directory = Path(directory)
    return load_file(str(directory / PARAMS_FILE)), json.loads((directory / META_FILE).read_text())
