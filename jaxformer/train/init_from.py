"""Starting a run from another run's weights (``train.init_from``): fine-tuning.

Only parameters are taken, from the latest checkpoint of the other run directory; the
step, optimizer moments and RNG stay those of a fresh run. A parameter the new model
has and the checkpoint lacks (a new classifier head) keeps its fresh initialisation; a
parameter only the checkpoint has (an unused pre-training head) is ignored. Arrays are
read by Orbax straight onto the new run's shardings, so any mesh works.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from jaxformer.config import ConfigError
from jaxformer.train.checkpoint import Checkpointer

log = logging.getLogger("jaxformer")
KEY = "train.init_from"


def _name(path: tuple[Any, ...]) -> str:
    """``params`` leaf path -> 'encoder/attn/q/kernel' (the Variable's ``value`` dropped)."""
    parts = [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path]
    return "/".join(parts[:-1] if parts and parts[-1] == "value" else parts)


def _latest_state_dir(run_dir: str) -> tuple[int, Path]:
    directory = Path(run_dir).expanduser() / "checkpoints"
    missing = ConfigError(
        f"config key '{KEY}': no checkpoint in '{run_dir}' (looked in {directory})"
    )
    if not directory.is_dir():  # checked first: the checkpointer would create it
        raise missing
    checkpointer = Checkpointer(directory, keep=1, every=0, use_async=False)
    try:
        step = checkpointer.latest_step()
    finally:
        checkpointer.close()
    if step is None or not (directory / str(step) / "state").is_dir():
        raise missing
    return step, directory / str(step) / "state"


def load_params(run_dir: str, state: Any, shardings: Any) -> Any:
    """``state`` with every parameter the latest checkpoint of ``run_dir`` also holds
    replaced by the saved value; raises ConfigError naming ``train.init_from`` when there is
    no checkpoint, a shared parameter's shape differs, or nothing is shared."""
    step, state_dir = _latest_state_dir(run_dir)
    checkpointer = ocp.PyTreeCheckpointer()
    saved_tree = checkpointer.metadata(state_dir).item_metadata.tree.get("params", {})
    saved = {_name(p): m for p, m in jax.tree_util.tree_flatten_with_path(saved_tree)[0]}

    ours, treedef = jax.tree_util.tree_flatten_with_path(state.params)
    our_shardings = jax.tree.leaves(shardings.params)
    names = [_name(p) for p, _ in ours]
    shared = [i for i, n in enumerate(names) if n in saved]
    wrong = [
        f"{names[i]} {tuple(saved[names[i]].shape)} in the checkpoint, {ours[i][1].shape} here"
        for i in shared
        if tuple(saved[names[i]].shape) != tuple(ours[i][1].shape)
    ]
    if wrong:
        raise ConfigError(
            f"config key '{KEY}': the model of '{run_dir}' (step {step}) does not match this "
            f"config's: {'; '.join(wrong[:5])}"
            + (f" (and {len(wrong) - 5} more)" if len(wrong) > 5 else "")
        )
    if not shared:
        raise ConfigError(
            f"config key '{KEY}': the checkpoint of '{run_dir}' (step {step}) shares no "
            "parameter with this config's model"
        )

    # Restore exactly the shared leaves, as nested dicts shaped like the saved tree.
    target: dict[str, Any] = {}
    for i in shared:
        node = target
        *parents, leaf = names[i].split("/")
        for part in parents:
            node = node.setdefault(part, {})
        value = ours[i][1]
        node[leaf] = {
            "value": jax.ShapeDtypeStruct(value.shape, value.dtype, sharding=our_shardings[i])
        }
    item = {"params": target}
    restored = checkpointer.restore(
        state_dir,
        args=ocp.args.PyTreeRestore(
            item=item,
            restore_args=ocp.checkpoint_utils.construct_restore_args(item),
            partial_restore=True,
        ),
    )["params"]
    leaves = [value for _, value in ours]
    for i in shared:
        node = restored
        for part in names[i].split("/"):
            node = node[part]
        leaves[i] = node["value"]
    fresh = [n for n in names if n not in saved]
    unused = sorted(set(saved) - set(names))
    log.info(
        "%s: %d parameters from %s (step %d); freshly initialised: %s; not used: %s",
        KEY, len(shared), state_dir.parent, step, fresh or "none", unused or "none",
    )  # fmt: skip
    return state.replace(params=jax.tree_util.tree_unflatten(treedef, leaves))
