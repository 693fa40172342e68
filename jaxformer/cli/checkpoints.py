"""``jaxformer checkpoints``: list, inspect and export a run's checkpoints.

    jaxformer checkpoints list RUN_DIR [--verify]      step, time, size, validity
    jaxformer checkpoints inspect RUN_DIR [--step N]   arrays (shape, dtype) and config
    jaxformer checkpoints export RUN_DIR OUT [--step N]  parameters only, as safetensors

The arguments and the printing; the reading is ``jaxformer.train.checkpoint_inspect``.
``--verify`` reads every array of every checkpoint, which is what finds a truncated or
deleted file; without it a checkpoint is listed as ``committed`` from its metadata.
"""

from __future__ import annotations

import argparse
from typing import Any

from jaxformer.errors import ConfigError
from jaxformer.train.checkpoint_inspect import (
    META_FILE,
    PARAMS_FILE,
    export_params,
    inspect_checkpoint,
    list_checkpoints,
)


def add_parser(sub: Any) -> None:
    """Adds the ``checkpoints`` command and its subcommands to the top-level parser."""
    ckpt = sub.add_parser("checkpoints", help="list, inspect or export a run's checkpoints")
    commands = ckpt.add_subparsers(dest="checkpoints_command", required=True)
    listing = commands.add_parser("list", help="step, save time, size and validity of each")
    listing.add_argument("run_dir", help="a run directory (train.run_dir)")
    listing.add_argument(
        "--verify", action="store_true", help="read every array (finds damaged files)"
    )
    inspect = commands.add_parser("inspect", help="arrays and config of one checkpoint")
    inspect.add_argument("run_dir")
    inspect.add_argument("--step", type=int, default=None, help="default: the latest")
    export = commands.add_parser("export", help="write the parameters alone (safetensors)")
    export.add_argument("run_dir")
    export.add_argument("out", help="directory to create: params.safetensors + meta.json")
    export.add_argument("--step", type=int, default=None, help="default: the latest")


def main(args: argparse.Namespace, rest: list[str]) -> int:
    """Runs ``jaxformer checkpoints ...``; returns the process exit code."""
    if rest:
        raise ConfigError(f"unrecognised arguments: {' '.join(rest)}")
    command = args.checkpoints_command
    if command == "list":
        rows, ok = list_checkpoints(args.run_dir, args.verify)
        print(f"{'step':>8}  {'saved':19}  {'size MiB':>9}  status")
        for r in rows:
            print(f"{r['step']:>8}  {r['saved']:19}  {r['size_mb']:9.2f}  {r['status']}")
        if not rows:
            print("(no checkpoints)")
        return 0 if ok else 2
    if command == "inspect":
        print(inspect_checkpoint(args.run_dir, args.step))
        return 0
    target = export_params(args.run_dir, args.out, args.step)
    print(f"wrote {target / PARAMS_FILE} and {target / META_FILE}")
    return 0
