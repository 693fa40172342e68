"""Fault-injection worker: restore the newest checkpoint, check it is whole, then save
new ones back to back until killed (tests/test_reliability.py sends SIGKILL at random
moments). Every array of the checkpoint for step s holds s, so a partial or mixed
checkpoint cannot pass the check. Prints ``resumed STEP`` once restored and ``saved STEP``
each time a save has been handed to Orbax (the one before it is then committed)."""

import sys

import jax
import jax.numpy as jnp
import numpy as np

from jaxformer.train.checkpoint import Checkpointer

SIZE = 1 << 20  # 4 MiB per array: a save takes long enough to be killed halfway


def state_at(step: int) -> dict:
    return {"w": jnp.full((SIZE,), step, jnp.float32), "b": {"v": jnp.full((4, SIZE // 4), -step)}}


def main(directory: str) -> None:
    ckpt = Checkpointer(directory, keep=2, every=1, use_async=True)
    abstract = jax.eval_shape(lambda: state_at(0))
    restored = ckpt.restore_latest(abstract)
    start = 0
    if restored is not None:
        start = restored.step
        values = jax.tree.leaves(jax.tree.map(np.asarray, restored.state))
        whole = all(np.all(np.abs(v) == start) for v in values)
        if not whole or restored.data != {"step": start} or restored.meta.get("step") != start:
            print(f"PARTIAL checkpoint at step {start}", flush=True)
            sys.exit(1)
    print(f"resumed {start}", flush=True)
    for step in range(start + 1, start + 100_000):
        ckpt.save(step, state_at(step), {"step": step}, {"step": step})
        print(f"saved {step}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
