"""Attention heatmaps (PNG) and hidden states (NPZ) of a checkpoint for one prompt.

    python tools/attention_maps.py --config=configs/default.py --prompt="def add(a, b):" \\
        --out=attention.png [--layers=0,-1] [--hidden_out=hidden.npz] [--config.KEY=VALUE ...]

Restores the latest checkpoint of ``train.run_dir`` (any family), runs the prompt through
:func:`jaxformer.model.capture_intermediates` and draws one heatmap per (layer, head): a
row per layer, a column per head, queries down, keys across, each labelled with its
token. For an encoder-decoder the prompt is the source and ``--target`` the decoder's
text (default: the greedy translation), and every attention kind gets its own rows
(encoder, decoder self, cross). ``--hidden_out`` saves every captured array (hidden
states ``[N + 1, L, D]`` for probes, attention ``[N, H, L, S]``) for the prompt.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

import numpy as np

from jaxformer.config import ConfigError, load_config

log = logging.getLogger("jaxformer")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="configs/NAME.py[:ARG]")
    parser.add_argument("--prompt", required=True, help="text (the source, for seq2seq)")
    parser.add_argument("--target", default=None, help="seq2seq: decoder text (default: greedy)")
    parser.add_argument("--out", default="attention.png", help="PNG file to write")
    parser.add_argument(
        "--layers", default="", help="comma-separated layer indices (negative ok; default all)"
    )
    parser.add_argument("--heads", default="", help="comma-separated head indices (default all)")
    parser.add_argument("--hidden_out", default="", help="also save the captured arrays (.npz)")
    parser.add_argument("--max_new_tokens", type=int, default=64, help="seq2seq greedy target cap")
    return parser


def build_batch(cfg: Any, model: Any, tokenizer: Any, args: argparse.Namespace) -> tuple:
    """(batch, labels per attention key) for the prompt; labels are token strings."""
    from jaxformer import decode
    from jaxformer.tasks import task_for
    from jaxformer.tasks.base import unpacked_row

    task = task_for(cfg)
    text = tokenizer.encode(args.prompt)
    row = task.text_row(tokenizer, text)  # BERT: [CLS] text [SEP] with token types
    if not task.seq2seq:
        labels = _labels(tokenizer, row["inputs"][0])
        return row, {"": (labels, labels)}
    source = row["encoder_inputs"][0]  # the text, ended by eos as in training
    if args.target is None:
        target = np.asarray(
            decode.translate(
                model,
                source[None],
                max_new_tokens=args.max_new_tokens,
                start_id=tokenizer.bos_id,
                eos_id=tokenizer.eos_id,
            )  # fmt: skip
        )[0]
        end = np.flatnonzero(target == tokenizer.eos_id)
        target = target[: end[0] if end.size else len(target)]
    else:
        target = tokenizer.encode(args.target)
    decoder_ids = np.concatenate([[tokenizer.bos_id], target]).astype(np.int32)
    batch = row | unpacked_row(decoder_ids)
    src, tgt = _labels(tokenizer, source), _labels(tokenizer, decoder_ids)
    return batch, {"encoder_": (src, src), "decoder_": (tgt, tgt), "decoder_cross_": (tgt, src)}


def _labels(tokenizer: Any, ids: np.ndarray) -> list[str]:
    special = {tokenizer.bos_id: "<s>", tokenizer.eos_id: "</s>", tokenizer.pad_id: "<pad>"}
    return [special.get(int(i)) or tokenizer.decode(np.asarray([i])) or f"#{i}" for i in ids]


def _pick(spec: str, count: int) -> list[int]:
    if not spec:
        return list(range(count))
    picked = [int(s) for s in spec.split(",")]
    for i in picked:
        if not -count <= i < count:
            raise ConfigError(f"index {i} out of range for {count}")
    return [i % count for i in picked]


def draw(
    maps: list[tuple[str, np.ndarray, list[str], list[str]]],
    layers: str,
    heads: str,
    out: Path,
) -> tuple[int, int]:
    """One heatmap per (stack, layer, head); returns the grid's (rows, columns)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = []
    for name, att_NxHxLxS, q_labels, k_labels in maps:
        for layer in _pick(layers, att_NxHxLxS.shape[0]):
            rows.append((f"{name}layer {layer}", att_NxHxLxS[layer], q_labels, k_labels))
    cols = _pick(heads, rows[0][1].shape[0])
    cell = max(2.0, 0.18 * max(len(rows[0][3]), len(rows[0][2])))
    fig, axes = plt.subplots(
        len(rows), len(cols), figsize=(cell * len(cols), cell * len(rows)), squeeze=False
    )
    for r, (title, att_HxLxS, q_labels, k_labels) in enumerate(rows):
        for c, head in enumerate(cols):
            ax = axes[r][c]
            ax.imshow(att_HxLxS[head], vmin=0.0, vmax=1.0, cmap="viridis")
            ax.set_title(f"{title}, head {head}", fontsize=8)
            ax.set_xticks(range(len(k_labels)), k_labels, fontsize=6, rotation=90)
            ax.set_yticks(range(len(q_labels)), q_labels, fontsize=6)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return len(rows), len(cols)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s", force=True)
    args, rest = _parser().parse_known_args(argv)
    try:
        unknown = [a for a in rest if not a.startswith("--config.")]
        if unknown:
            raise ConfigError(f"unrecognised arguments: {' '.join(unknown)}")
        cfg = load_config(args.config, rest)
        from jaxformer import data, parallel
        from jaxformer.model import capture_intermediates
        from jaxformer.train.setup import restore_params

        tokenizer = data.build_tokenizer(cfg.data)
        model, step, mesh = restore_params(cfg)
        with parallel.activate(mesh):
            batch, labels = build_batch(cfg, model, tokenizer, args)
            captured = {k: np.asarray(v)[:, 0] if k != "logits" else np.asarray(v)[0]
                        for k, v in capture_intermediates(model, batch).items()}  # fmt: skip
        maps = [(prefix, captured[f"{prefix}attention"], *labels[prefix]) for prefix in labels]
        rows, cols = draw(maps, args.layers, args.heads, Path(args.out))
        log.info("step %d: wrote %s (%d x %d heatmaps)", step, args.out, rows, cols)
        if args.hidden_out:
            np.savez(args.hidden_out, **captured)
            log.info("wrote %s: %s", args.hidden_out, ", ".join(sorted(captured)))
    except ConfigError as err:
        print(f"attention_maps: config error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
