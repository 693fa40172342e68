"""The ``jaxformer`` command: ``train`` and ``eval`` a config, with overrides.

jaxformer train --config=configs/default.py --config.optimizer.lr=1e-3
jaxformer eval --config=configs/default.py
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from jaxformer.config import ConfigError, load_config

log = logging.getLogger("jaxformer")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jaxformer",
        description="Train and evaluate Transformer models from ml-collections configs.",
        epilog="Override any config key with --config.SECTION.KEY=VALUE.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train (or resume) the run in train.run_dir")
    train.add_argument("--config", required=True, help="configs/NAME.py[:ARG]")
    evaluate = sub.add_parser("eval", help="evaluate the latest checkpoint of train.run_dir")
    evaluate.add_argument("--config", required=True, help="configs/NAME.py[:ARG]")
    evaluate.add_argument(
        "--batches", type=int, default=0, help="eval batches (0: the whole eval split)"
    )
    return parser


def _split_overrides(rest: Sequence[str]) -> list[str]:
    overrides, unknown = [], []
    for arg in rest:
        (overrides if arg.startswith("--config.") else unknown).append(arg)
    if unknown:
        raise ConfigError(f"unrecognised arguments: {' '.join(unknown)}")
    return overrides


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S"
    )
    for noisy in ("absl", "orbax", "jax._src"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    args, rest = _parser().parse_known_args(argv)
    try:
        cfg = load_config(args.config, _split_overrides(rest))
        if args.command == "train":
            from jaxformer.train.loop import train

            train(cfg)
        elif args.command == "eval":
            from jaxformer.train.loop import evaluate, setup

            run = setup(cfg)
            if run.restored_step is None:
                raise ConfigError(f"no checkpoint in '{cfg.train.run_dir}' (train.run_dir)")
            metrics = evaluate(run, max_batches=args.batches)
            shown = "  ".join(f"{k} {v:.4f}" for k, v in metrics.items())
            print(f"step {run.restored_step} eval: {shown}")
    except ConfigError as err:
        print(f"jaxformer: config error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
