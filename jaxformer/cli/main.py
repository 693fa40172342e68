"""The ``jaxformer`` command: ``train`` and ``eval`` a config, with overrides.

jaxformer train --config=configs/default.py --config.optimizer.lr=1e-3
jaxformer eval --config=configs/default.py
jaxformer generate --config=configs/default.py --prompt="def " --temperature=0.8
jaxformer plan --config=configs/default.py --devices=8 --config.mesh.fsdp=8
jaxformer checkpoints list runs/default
jaxformer sweep plan --spec=configs/sweeps/NAME.py --out=sweeps/NAME

Exit codes: 0 done, 2 bad config/data/checkpoint, 3 too many bad steps in a row,
75 preempted (a checkpoint was saved at the last step: run the same command again).
User errors print one line and no traceback; JAXFORMER_TRACEBACK=1 prints the traceback too.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
from collections.abc import Sequence
from typing import Any

from jaxformer.cli import checkpoints, sweep
from jaxformer.config import ConfigError, load_config
from jaxformer.errors import (
    EXIT_BAD_STEPS,
    EXIT_PREEMPTED,
    EXIT_USER_ERROR,
    BadSteps,
    CheckpointError,
    DataError,
    Preempted,
)
from jaxformer.host import use_huge_pages

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
    gen = sub.add_parser(
        "generate", help="continue a prompt with the latest checkpoint of train.run_dir"
    )
    gen.add_argument("--config", required=True, help="configs/NAME.py[:ARG]")
    gen.add_argument("--prompt", default="", help="text to continue (after the bos token)")
    gen.add_argument("--max_new_tokens", type=int, default=200)
    gen.add_argument("--temperature", type=float, default=0.8, help="0: greedy (argmax)")
    gen.add_argument("--top_k", type=int, default=40, help="sample from the k likeliest (0: all)")
    gen.add_argument("--top_p", type=float, default=0.95, help="nucleus mass (1: all)")
    gen.add_argument(
        "--beam_size", type=int, default=0, help="beam search with this many beams (0: sample)"
    )
    gen.add_argument("--length_penalty", type=float, default=0.6, help="beam search GNMT alpha")
    gen.add_argument("--seed", type=int, default=0, help="sampling seed")
    plan = sub.add_parser(
        "plan",
        help="compile the train step for the mesh without running it; report memory, "
        "collectives and FLOPs per device",
    )
    plan.add_argument("--config", required=True, help="configs/NAME.py[:ARG]")
    plan.add_argument(
        "--devices", type=int, default=0,
        help="plan for N simulated CPU devices (default: the devices present)",
    )  # fmt: skip
    plan.add_argument("--json", action="store_true", help="print the plan as JSON")
    sweep.add_parser(sub)
    checkpoints.add_parser(sub)
    return parser


def _split_overrides(rest: Sequence[str]) -> list[str]:
    overrides, unknown = [], []
    for arg in rest:
        (overrides if arg.startswith("--config.") else unknown).append(arg)
    if unknown:
        raise ConfigError(f"unrecognised arguments: {' '.join(unknown)}")
    return overrides


def _generate(cfg: Any, args: argparse.Namespace) -> str:
    """Restores the latest checkpoint and returns the decoded continuation of the prompt
    (for an encoder-decoder: the target generated for the prompt as source)."""
    import jax
    import numpy as np

    from jaxformer import data as jdata
    from jaxformer import decode, parallel
    from jaxformer.tasks import task_for
    from jaxformer.train.setup import restore_params

    task = task_for(cfg)
    tokenizer = jdata.build_tokenizer(cfg.data)
    prompt, sources = task.generation_inputs(tokenizer, tokenizer.encode(args.prompt))
    model, step, mesh = restore_params(cfg)
    log.info("generating from the checkpoint at step %d", step)
    common: dict[str, Any] = dict(max_new_tokens=args.max_new_tokens, eos_id=tokenizer.eos_id)
    if sources is not None:
        common["sources"] = sources
    try:
        decode.check_fits(model, len(prompt), args.max_new_tokens)
    except ValueError as err:
        raise ConfigError(f"{err}: lower --max_new_tokens") from err
    with parallel.activate(mesh):
        if args.beam_size > 0:
            out = decode.beam_search(
                model, prompt[None], beam_size=args.beam_size,
                length_penalty_alpha=args.length_penalty, **common,
            )  # fmt: skip
            tokens = out.best_tokens_BxN[0]
        else:
            out = decode.generate(
                model, prompt[None], temperature=args.temperature, top_k=args.top_k,
                top_p=args.top_p, rng=jax.random.key(args.seed), **common,
            )  # fmt: skip
            tokens = out.tokens_BxN[0]
    return tokenizer.decode(np.asarray(tokens))


# What each user-facing error is called on stderr, and the exit code it gives.
_REPORTS: tuple[tuple[type[Exception], str, int], ...] = (
    (ConfigError, "config error: ", EXIT_USER_ERROR),
    (DataError, "data error: ", EXIT_USER_ERROR),
    (CheckpointError, "checkpoint error: ", EXIT_USER_ERROR),
    (Preempted, "", EXIT_PREEMPTED),
    (BadSteps, "training stopped: ", EXIT_BAD_STEPS),
)


def _report(err: Exception) -> int:
    """One line naming the problem, no traceback (JAXFORMER_TRACEBACK=1 adds it, for
    debugging a config file or jaxformer itself); returns the exit code."""
    if os.environ.get("JAXFORMER_TRACEBACK"):
        traceback.print_exception(err, file=sys.stderr)
    for kind, label, code in _REPORTS:
        if isinstance(err, kind):
            print(f"jaxformer: {label}{err}", file=sys.stderr)
            return code
    raise err


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
        force=True,  # absl (imported by tfds) installs its own root handler
    )
    for noisy in ("absl", "orbax", "jax._src"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    args, rest = _parser().parse_known_args(argv)
    if argv is None and args.command in ("train", "eval", "generate"):
        use_huge_pages()  # re-executes this command once, with huge-page malloc (host.py)
    try:
        if args.command in ("sweep", "checkpoints"):
            module = sweep if args.command == "sweep" else checkpoints
            return module.main(args, rest)
        if args.command == "plan" and args.devices:
            from jaxformer.step_plan import use_host_devices

            use_host_devices(args.devices)  # before anything starts the jax backend
        cfg = load_config(args.config, _split_overrides(rest))
        if args.command == "train":
            from jaxformer.train.loop import train

            train(cfg)
        elif args.command == "eval":
            from jaxformer.train.loop import evaluate_checkpoint

            step, metrics = evaluate_checkpoint(cfg, max_batches=args.batches)
            shown = "  ".join(f"{k} {v:.4f}" for k, v in metrics.items())
            print(f"step {step} eval: {shown}")
        elif args.command == "generate":
            print(_generate(cfg, args))
        elif args.command == "plan":
            from jaxformer.step_plan import report

            print(report(cfg, args.devices, as_json=args.json))
    except (ConfigError, DataError, CheckpointError, Preempted, BadSteps) as err:
        return _report(err)
    return 0
