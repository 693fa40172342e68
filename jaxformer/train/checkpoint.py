"""Orbax checkpoints holding the train state and the data iterator together.

A checkpoint is one step directory with two items: ``state`` (parameters, optimizer
state, step and RNG, written shard by shard by every host) and ``data`` (the grain
iterator's state as JSON). Orbax writes into a temporary directory and renames it when
every item is complete, so a step directory that exists is a whole checkpoint.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


class Checkpointer:
    """Saves every ``every`` steps (and when forced), keeps the last ``keep``."""

    def __init__(self, directory: str | Path, *, keep: int, every: int, use_async: bool):
        self.directory = Path(directory).absolute()
        self.every = every
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            create=True,
            enable_async_checkpointing=use_async,
        )
        self.manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=("state", "data")
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def maybe_save(self, step: int, state: Any, data_state: dict, *, force: bool = False) -> bool:
        """Saves when ``step`` is on the interval or ``force``; returns whether it saved."""
        if not force and (self.every <= 0 or step % self.every):
            return False
        if step in self.manager.all_steps():
            return False
        saved = self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)
            ),
            force=True,
        )
        if saved:
            log.info("checkpoint: saving step %d to %s", step, self.directory)
        return saved

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
        """Restores ``step`` onto the shardings in ``abstract_state`` (any mesh works)."""
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()
            ),
        )
        return restored["state"], restored["data"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def abstract_like(state: Any, shardings: Any) -> Any:
    """Shape/dtype/sharding stand-ins for restoring ``state``'s structure."""
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings
    )
