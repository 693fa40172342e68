"""Resume-anywhere worker: restores a run on this process's devices and mesh (given as
config overrides) and writes the restored parameters, optimizer state and the next
batch to an .npz, for tests/test_reliability.py to compare across device counts.

    python topology.py OUT.npz [--train] CONFIG --config.KEY=VALUE ...
"""

import sys

import jax
import numpy as np

from jaxformer.config import load_config
from jaxformer.train.checkpoint import array_shapes
from jaxformer.train.loop import setup, train


def main(out: str, args: list[str]) -> None:
    if args[0] == "--train":
        args = args[1:]
        train(load_config(args[0], args[1:]))
    run = setup(load_config(args[0], args[1:]))
    run.checkpointer.close()
    batches = iter(run.train_data)
    batches.set_state(run.data_state)
    batch = next(batches)
    names = list(array_shapes(run.state))
    leaves = jax.tree.leaves(run.state)
    host = jax.device_get(leaves)
    arrays = {f"state/{n}": np.asarray(x) for n, x in zip(names, host, strict=True)}
    arrays |= {f"batch/{k}": v for k, v in batch.items()}
    arrays["restored_step"] = np.asarray(run.restored_step)
    arrays["devices"] = np.asarray(jax.device_count())
    np.savez(out, **arrays)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
