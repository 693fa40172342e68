"""Orbax checkpoints holding the train state, the data iterator and the run's metadata.

A checkpoint is one step directory with three items: ``state`` (parameters, optimizer
state, step, RNG and the bad-step guard, written shard by shard by every host), ``data``
(the grain iterator's state as JSON) and ``meta`` (the config, the jaxformer and jax
versions, the mesh and the goodput ledger at save time, as JSON).

Atomicity is Orbax's: every item is written into a temporary directory that is renamed
to the step's name only once all hosts have finished, so a step directory that exists
is a committed checkpoint; a save cut off by a crash leaves a temporary directory that
the next start deletes. A committed checkpoint damaged afterwards (a truncated or
deleted file) fails to restore: :meth:`Checkpointer.restore_latest` then moves it aside
to ``damaged_checkpoints/`` beside the checkpoints, says so, and falls back to the next
newest one.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from jaxformer.errors import CheckpointError

log = logging.getLogger("jaxformer")

DAMAGED_DIR = "damaged_checkpoints"


@dataclass
class Restored:
    """A restored checkpoint: its step, state, data-iterator state and metadata."""

    step: int
    state: Any
    data: dict
    meta: dict


class Checkpointer:
    """Saves every ``every`` steps (and when forced), keeps the last ``keep``."""

    def __init__(self, directory: str | Path, *, keep: int, every: int, use_async: bool):
        self.directory = Path(directory).absolute()
        self.every = every
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            create=True,
            enable_async_checkpointing=use_async,
            cleanup_tmp_directories=True,  # saves cut off by a crash or a kill
        )
        handlers = {
            "state": ocp.StandardCheckpointHandler(),
            "data": ocp.JsonCheckpointHandler(),
            "meta": ocp.JsonCheckpointHandler(),
        }
        self.manager = ocp.CheckpointManager(
            self.directory, options=options, item_handlers=handlers
        )

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps(read=True))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def due(self, step: int) -> bool:
        return self.every > 0 and step % self.every == 0

    def save(self, step: int, state: Any, data_state: dict, meta: dict) -> bool:
        """Starts saving ``step`` (in the background when async); False if it exists."""
        if step in self.manager.all_steps():
            return False
        saved = self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data=ocp.args.JsonSave(data_state),
                meta=ocp.args.JsonSave(meta),
            ),
            force=True,
        )
        if saved:
            log.info("checkpoint: saving step %d to %s", step, self.directory)
        return saved

    def restore(self, step: int, abstract_state: Any) -> Restored:
        """Restores ``step`` onto the shardings in ``abstract_state`` (any mesh works)."""
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state),
                data=ocp.args.JsonRestore(),
                meta=ocp.args.JsonRestore(),
            ),
        )
        return Restored(step, restored["state"], restored["data"] or {}, restored["meta"] or {})

    def restore_params(self, step: int, abstract_params: Any) -> Restored:
        """Only the parameters of ``step``'s state, onto the shardings in
        ``abstract_params``: the optimizer state is neither read nor allocated (eval,
        generate). ``Restored.state`` holds the parameters."""
        item = {"params": abstract_params}
        restored = ocp.PyTreeCheckpointer().restore(
            self.directory / str(step) / "state",
            args=ocp.args.PyTreeRestore(
                item=item,
                restore_args=ocp.checkpoint_utils.construct_restore_args(item),
                partial_restore=True,
            ),
        )
        return Restored(step, restored["params"], {}, {})

    def read_meta(self, step: int) -> dict:
        """The ``meta`` item of ``step`` (empty for a checkpoint written without one)."""
        path = self.directory / str(step) / "meta"
        if not path.exists():
            return {}
        return (
            self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
            or {}
        )

    def state_metadata(self, step: int) -> Any:
        """The stored state's tree of array metadata (shape, dtype), reading no values."""
        return self.manager.item_metadata(step)["state"].tree

    def restore_latest(
        self,
        abstract_state: Any,
        check: Callable[[int], None] | None = None,
        *,
        params_only: bool = False,
    ) -> Restored | None:
        """Restores the newest checkpoint that restores, moving damaged ones aside; with
        ``params_only``, ``abstract_state`` is the parameters alone (:meth:`restore_params`)
        and the run is only read: a damaged checkpoint is skipped and left where it is
        (eval and generate never modify a run).

        ``check(step)`` runs first for each candidate and may raise (a config that does
        not fit the checkpoint); its errors propagate, since an older checkpoint of the
        same run would not fit either. Returns None for a run without checkpoints.
        """
        steps = self.all_steps()
        for i, step in enumerate(reversed(steps)):
            if check is not None:
                check(step)
            error: Exception | None = None
            try:
                read = self.restore_params if params_only else self.restore
                restored = read(step, abstract_state)
            except Exception as err:  # noqa: BLE001 - any failure to read means damage
                error = err
            if _all_processes_agree(error is None):
                return restored
            if error is None:  # this process read its shards; another could not
                error = CheckpointError("another process could not read its shards")
            older = steps[-i - 2] if i + 1 < len(steps) else None
            fallback = f"falling back to step {older}" if older is not None else (
                "no older checkpoint is left"
            )  # fmt: skip
            if params_only:
                log.warning(
                    "checkpoint step %d in %s is damaged and cannot be read (%s: %s); left "
                    "in place; %s",
                    step, self.directory, type(error).__name__, _first_line(error), fallback,
                )  # fmt: skip
                if older is None:
                    raise CheckpointError(
                        f"no checkpoint in {self.directory} can be read (all damaged; left "
                        "in place)"
                    ) from error
                continue
            where = self.quarantine(step)
            log.warning(
                "checkpoint step %d in %s is damaged and cannot be restored (%s: %s); "
                "moved it to %s; %s",
                step, self.directory, type(error).__name__, _first_line(error), where, fallback,
            )  # fmt: skip
            if older is None:
                raise CheckpointError(
                    f"every checkpoint in {self.directory} was damaged and has been "
                    f"moved to {where.parent}; run again to train from scratch"
                ) from error
        return None

    def quarantine(self, step: int) -> Path:
        """Moves a damaged step directory out of Orbax's sight, keeping it for inspection."""
        target = self.directory.parent / DAMAGED_DIR / f"{step}-{int(time.time())}"
        if jax.process_index() == 0:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(self.directory / str(step)), target)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"jaxformer quarantine {step}")
        self.manager.reload()
        return target

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def run_meta(cfg: Any, mesh_shape: dict[str, int], **extra: Any) -> dict:
    """The ``meta`` item: what wrote a checkpoint, for resume checks and inspection."""
    import jaxformer

    return {
        "config": json.loads(cfg.to_json()),
        "jaxformer": jaxformer.__version__,
        "jax": jax.__version__,
        "mesh": dict(mesh_shape),
        "devices": jax.device_count(),
        "processes": jax.process_count(),
        "saved_at": time.time(),
        **extra,
    }


def _leaf_name(path: tuple) -> str:
    parts = []
    for key in path:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
    return "/".join(parts)


def array_shapes(tree: Any) -> dict[str, tuple[tuple[int, ...], str]]:
    """``{path: (shape, dtype)}`` of a state or of a checkpoint's metadata tree."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {_leaf_name(p): (tuple(x.shape), str(x.dtype)) for p, x in leaves}


def config_differences(old: dict, new: dict, prefix: str = "") -> dict[str, tuple[Any, Any]]:
    """``{"section.key": (old, new)}`` for every key whose value differs."""
    out: dict[str, tuple[Any, Any]] = {}
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        name = f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            out |= config_differences(a, b, f"{name}.")
        elif a != b:
            out[name] = (a, b)
    return out


def check_resume(cfg: Any, checkpointer: Checkpointer, abstract_state: Any, step: int) -> None:
    """Refuses to resume ``step`` with a config whose arrays have other shapes, naming the
    config keys that differ; logs the keys that differ but leave every shape alone."""
    from jaxformer.config import ConfigError

    try:
        meta = checkpointer.read_meta(step)
        stored = array_shapes(checkpointer.state_metadata(step))
    except Exception:  # noqa: BLE001 - unreadable: damage, which restoring reports
        return
    changed = config_differences(meta.get("config", {}), json.loads(cfg.to_json()))
    shown = "; ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in ((k, *v) for k, v in changed.items()))
    ours = array_shapes(abstract_state)
    if stored != ours:
        arrays = [
            f"{name}: {stored.get(name, ('absent',))[0]} -> {ours.get(name, ('absent',))[0]}"
            for name in sorted(set(stored) | set(ours))
            if stored.get(name) != ours.get(name)
        ]
        more = f" and {len(arrays) - 5} more" if len(arrays) > 5 else ""
        raise ConfigError(
            f"cannot resume from checkpoint step {step} in {checkpointer.directory}: this "
            f"config changes the shapes of the saved arrays ({', '.join(arrays[:5])}{more}). "
            f"Config keys that differ from the checkpoint's: {shown or 'none recorded'}. "
            "Restore those values, or start a new train.run_dir (train.init_from=<this run> "
            "reuses the weights that still fit)."
        )
    if changed:
        log.warning(
            "resuming from step %d with config keys changed (array shapes unchanged, "
            "allowed): %s", step, shown,
        )  # fmt: skip


def _all_processes_agree(ok: bool) -> bool:
    """True only if ``ok`` on every process: they fall back together or not at all."""
    if jax.process_count() == 1:
        return ok
    import numpy as np
    from jax.experimental import multihost_utils

    return bool(np.all(multihost_utils.process_allgather(np.int32(ok))))


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0][:300] if text else ""


def abstract_like(state: Any, shardings: Any) -> Any:
    """Shape/dtype/sharding stand-ins for restoring ``state``'s structure."""
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings
    )
