"""Count a config's parameters and training FLOPs per token without allocating weights.

    python tools/count_params.py --config=configs/gpt2_124m.py
    python tools/count_params.py --config=configs/llama2_7b.py --config.model.num_kv_heads=8

The model constructor runs under ``jax.eval_shape``, so only shapes exist (a 7B model
counts in seconds on a laptop). The count from the shapes is printed beside the analytic
one of ``jaxformer.flops.count``, which the training logs and MFU use; the command exits
with status 1 if they disagree, since then one of them is wrong.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from typing import Any

import jax
from flax import nnx

from jaxformer.config import ConfigError, load_config
from jaxformer.tasks import build_model, count_flops

# Parameters that are lookup tables rather than matmul weights (flops.count's convention).
EMBEDDING_NAMES = ("embed", "pos_embed", "type_embed")


def abstract_params(model_cfg: Any) -> dict[str, jax.ShapeDtypeStruct]:
    """Every parameter's shape and dtype, by dotted path, from ``jax.eval_shape``."""

    def build() -> nnx.State:
        return nnx.state(build_model(model_cfg, 0), nnx.Param)

    state = jax.eval_shape(build)
    leaves = jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(state))[0]
    return {".".join(str(getattr(k, "key", k)) for k in path): leaf for path, leaf in leaves}


def counts(model_cfg: Any) -> dict[str, int]:
    """Total, embedding and non-embedding parameter counts from the abstract model."""
    shapes = abstract_params(model_cfg)
    total = sum(math.prod(s.shape) for s in shapes.values())
    embedding = sum(math.prod(s.shape) for k, s in shapes.items() if k in EMBEDDING_NAMES)
    return {"total": total, "embedding": embedding, "non_embedding": total - embedding}


def report(cfg: Any, seq_len: int | None = None) -> tuple[str, bool]:
    """The printed report and whether the two counts agree."""
    seq_len = seq_len or cfg.data.seq_len
    got = counts(cfg.model)
    ref = count_flops(cfg.model, seq_len)
    agree = (got["total"], got["embedding"]) == (ref.params, ref.embedding_params)
    rows = [
        ("parameters", got["total"], ref.params),
        ("  embedding", got["embedding"], ref.embedding_params),
        ("  non-embedding", got["non_embedding"], ref.non_embedding_params),
    ]
    lines = [f"{'':18}{'eval_shape':>16}{'flops.count':>16}"]
    lines += [f"{name:18}{a:>16,}{b:>16,}" for name, a, b in rows]
    lines += [
        f"counts agree: {'yes' if agree else 'NO'}",
        f"training FLOPs per token at seq_len {seq_len}: {ref.train_flops_per_token:,} "
        f"({ref.train_flops_per_token:.3e}; 6N = {ref.six_n:.3e})",
    ]
    return "\n".join(lines), agree


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Override any config key with --config.SECTION.KEY=VALUE.",
    )
    parser.add_argument("--config", required=True, help="configs/NAME.py[:ARG]")
    parser.add_argument("--seq-len", type=int, default=0, help="default: data.seq_len")
    args, rest = parser.parse_known_args(argv)
    unknown = [a for a in rest if not a.startswith("--config.")]
    if unknown:
        parser.error(f"unrecognised arguments: {' '.join(unknown)}")
    try:
        cfg = load_config(args.config, rest)
    except ConfigError as err:
        print(f"count_params: config error: {err}", file=sys.stderr)
        return 2
    text, agree = report(cfg, args.seq_len or None)
    print(f"config {args.config}{''.join(' ' + r for r in rest)}")
    print(text)
    return 0 if agree else 1


if __name__ == "__main__":
    sys.exit(main())
