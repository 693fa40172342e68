"""Convert between Hugging Face checkpoint directories and jaxformer runs, without torch
or transformers (GPT-2, LLaMA, BERT, T5).

    # what the config needs to hold the directory's model (prints --config overrides):
    python tools/hf_convert.py import --hf_dir DIR --config configs/default.py --derive
    # DIR -> a step-0 checkpoint in train.run_dir (fresh optimizer state):
    python tools/hf_convert.py import --hf_dir DIR --config configs/default.py \\
        --config.KEY=VALUE ... --config.train.run_dir=runs/imported
    jaxformer generate --config configs/default.py --config.KEY=VALUE ... \\
        --config.train.run_dir=runs/imported --prompt "def "
    # the latest checkpoint of train.run_dir -> an HF directory (from_pretrained loads it):
    python tools/hf_convert.py export --config configs/default.py ... --out DIR

The imported checkpoint is an ordinary jaxformer checkpoint at step 0, written by the
same Checkpointer as training, so ``jaxformer eval``, ``generate`` and ``train``
(fine-tuning from step 0, in that run directory or as another run's
``train.init_from``) use it as they would any other. The import refuses a config whose
model differs from the directory's config.json, naming the keys (``--derive`` prints the
overrides that match), and a run directory that already holds checkpoints.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

from jaxformer import hf
from jaxformer.config import ConfigError, load_config
from jaxformer.train.validation import validate

log = logging.getLogger("jaxformer")


def derive(cfg: Any, hf_dir: str) -> list[str]:
    """The ``--config.model.KEY=VALUE`` overrides that make ``cfg``'s model the one of
    ``hf_dir`` (empty when it already is)."""
    hf_config = hf.read_hf_config(hf_dir)
    model_type = hf.model_type_of_hf_config(hf_config, str(Path(hf_dir) / hf.CONFIG_FILE))
    derived = model_type.config_from_hf(hf_config, hf.tensor_shapes(hf_dir))
    overrides = hf.derived_overrides(cfg, derived, model_type)
    if cfg.data.seq_len > derived.model.max_len:  # else the config would not validate
        overrides.append(f"--config.data.seq_len={derived.model.max_len}")
    return overrides


def check_matches(cfg: Any, hf_dir: str) -> None:
    """Raises ConfigError naming every model key of ``cfg`` that differs from
    ``hf_dir``'s config.json (the weights alone cannot reveal eps, RoPE base ...)."""
    hf_config = hf.read_hf_config(hf_dir)
    model_type = hf.model_type_of_hf_config(hf_config, str(Path(hf_dir) / hf.CONFIG_FILE))
    derived = model_type.config_from_hf(hf_config, hf.tensor_shapes(hf_dir))
    wrong = hf.config_differences(cfg, derived, model_type)
    if wrong:
        detail = ", ".join(f"model.{k}={a!r} (config.json: {b!r})" for k, (a, b) in wrong.items())
        raise ConfigError(
            f"the config's model is not the {model_type.name} model of '{hf_dir}': {detail}; "
            "rerun with --derive to print the --config overrides that match"
        )


def import_dir(cfg: Any, hf_dir: str) -> Path:
    """Writes ``hf_dir``'s weights as the step-0 checkpoint of ``cfg.train.run_dir``:
    the state ``init_state`` makes (fresh optimizer state and RNG) with the imported
    parameters in place of the random ones. Returns the checkpoint directory."""
    from jaxformer.train.checkpoint import Checkpointer, run_meta
    from jaxformer.train.setup import build

    check_matches(cfg, hf_dir)
    validate(cfg, jax.device_count(), jax.process_count())  # before reading any weights
    directory = Path(cfg.train.run_dir) / "checkpoints"
    if directory.is_dir() and any(p.name.isdigit() for p in directory.iterdir()):
        raise ConfigError(
            f"'{cfg.train.run_dir}' (train.run_dir) already holds checkpoints: import into "
            "a new run directory"
        )
    model = hf.load_hf_dir(hf_dir, cfg, seed=cfg.train.seed)
    imported = hf.flatten(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    del model

    built = build(cfg)
    state, mesh_shape = built.state, built.mesh_shape
    current = hf.flatten(nnx.to_pure_dict(state.params))
    for path, value in imported.items():
        old = current[path]
        value = np.asarray(value)
        if value.shape != old.shape or value.dtype != old.dtype:  # same config: a bug
            raise AssertionError(f"{hf.path_name(path)}: {value.shape} {value.dtype} != {old}")
        current[path] = jax.device_put(value, old.sharding)  # each device gets its shard
    nnx.replace_by_pure_dict(state.params, hf.nest(current))

    checkpointer = Checkpointer(
        directory, keep=cfg.train.keep_checkpoints, every=0, use_async=False
    )
    try:
        # No batch has been drawn: an empty data state tells `jaxformer train` to start
        # the data from the beginning.
        checkpointer.save(0, state, {}, run_meta(cfg, mesh_shape))
    finally:
        checkpointer.close()
    if jax.process_index() == 0:
        run_dir = Path(cfg.train.run_dir)
        (run_dir / "config.json").write_text(cfg.to_json(indent=2, sort_keys=True) + "\n")
        source = {"hf_dir": str(Path(hf_dir).absolute()), "step": 0}
        (run_dir / "imported_from.json").write_text(json.dumps(source, indent=2) + "\n")
    return directory / "0"


def export_dir(
    cfg: Any, out: str, *, model_type: str | None = None, max_shard_size: int = hf.MAX_SHARD_SIZE
) -> tuple[int, list[str]]:
    """Writes the latest checkpoint of ``cfg.train.run_dir`` as a Hugging Face directory
    (of ``model_type``, config.json's, if given: it must be the one that holds the
    model); returns its step and the weight files written."""
    from jaxformer.train.setup import restore_params

    model, step, _ = restore_params(cfg)
    return step, hf.save_hf_dir(model, out, model_type, max_shard_size=max_shard_size)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hf_convert.py",
        description=__doc__.split("\n\n")[0],
        epilog="Override any config key with --config.SECTION.KEY=VALUE.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    imp = sub.add_parser("import", help="a Hugging Face directory -> a step-0 checkpoint")
    imp.add_argument("--hf_dir", required=True, help="config.json + safetensors")
    imp.add_argument("--config", required=True, help="configs/NAME.py[:ARG]")
    imp.add_argument(
        "--derive", action="store_true",
        help="print the --config overrides that match the directory's model; write nothing",
    )  # fmt: skip
    exp = sub.add_parser("export", help="the latest checkpoint -> a Hugging Face directory")
    exp.add_argument("--config", required=True, help="configs/NAME.py[:ARG]")
    exp.add_argument("--out", required=True, help="the directory to write")
    exp.add_argument(
        "--model_type", default=None, choices=sorted(hf.MODEL_TYPES),
        help="config.json's model_type to write; refused unless it is the one that holds "
        "the model (by default, that one)",
    )  # fmt: skip
    exp.add_argument(
        "--max_shard_size", type=int, default=hf.MAX_SHARD_SIZE,
        help="bytes per safetensors file; more are written as shards with an index",
    )  # fmt: skip
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("absl", "orbax", "jax._src"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    parser = _parser()
    args, rest = parser.parse_known_args(argv)
    unknown = [a for a in rest if not a.startswith("--config.")]
    if unknown:
        parser.error(f"unrecognised arguments: {' '.join(unknown)}")
    try:
        cfg = load_config(args.config, rest)
        if args.command == "import" and args.derive:
            overrides = derive(cfg, args.hf_dir)
            print("\n".join(overrides) if overrides else "# the config already matches")
        elif args.command == "import":
            written = import_dir(cfg, args.hf_dir)
            print(f"imported '{args.hf_dir}' as {written} (step 0)")
        else:
            step, files = export_dir(
                cfg, args.out, model_type=args.model_type, max_shard_size=args.max_shard_size
            )
            print(f"exported step {step} of '{cfg.train.run_dir}' to '{args.out}': {files}")
    except (ConfigError, FileNotFoundError, KeyError, ValueError) as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"hf_convert: error: {message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
