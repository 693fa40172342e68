"""Train a SentencePiece model on the corpus the jaxformer pipeline reads.

Examples::

    python tools/train_tokenizer.py --output-prefix ~/.cache/jaxformer/spm/stdlib1k
    python tools/train_tokenizer.py --paths 'corpus/**/*.txt' --vocab-size 8192 \\
        --model-type bpe --output-prefix spm/mine

then set ``data.tokenizer='sentencepiece'`` and ``data.spm_model=PREFIX.model``.

It reads the *train* split through ``jaxformer.data.load_documents`` (so the eval
split never leaks into the vocabulary) and samples a fixed, seeded set of documents.
The model keeps text byte-exact (identity normalization, no whitespace collapsing,
no dummy prefix, byte fallback), which code corpora such as the stdlib need.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Iterator, Sequence

import numpy as np
import sentencepiece as spm
from ml_collections import ConfigDict

from jaxformer.data import SentencePieceTokenizer, load_documents


def _split_text(text: str, max_chars: int) -> Iterator[str]:
    """Cuts a document into pieces of at most ``max_chars``, preferably at line ends.

    SentencePiece skips over-long sentences, and whole files often are.
    """
    buf: list[str] = []
    size = 0
    for line in text.splitlines(keepends=True):
        while len(line) > max_chars:  # a single very long line
            if buf:
                yield "".join(buf)
                buf, size = [], 0
            yield line[:max_chars]
            line = line[max_chars:]
        if size + len(line) > max_chars and buf:
            yield "".join(buf)
            buf, size = [], 0
        buf.append(line)
        size += len(line)
    if buf:
        yield "".join(buf)


def sentences(
    data_cfg: ConfigDict, *, split: str, max_sentences: int, max_chars: int, seed: int
) -> Iterator[str]:
    """Up to ``max_sentences`` text pieces from documents in a seeded random order."""
    docs = load_documents(data_cfg, split)
    order = np.random.default_rng(seed).permutation(len(docs))
    count = 0
    for index in order:
        for piece in _split_text(docs[int(index)], max_chars):
            if not piece.strip():
                continue
            yield piece
            count += 1
            if count >= max_sentences:
                return


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output-prefix", required=True, help="writes PREFIX.model and PREFIX.vocab")
    p.add_argument("--vocab-size", type=int, default=1024)
    p.add_argument("--model-type", choices=("unigram", "bpe"), default="unigram")
    src = p.add_argument_group("corpus (default: the built-in stdlib corpus)")
    src.add_argument("--paths", default="", help="comma-separated globs of text files")
    src.add_argument("--tfds-name", default="", help="a prepared TFDS dataset instead")
    src.add_argument("--text-key", default="text")
    src.add_argument("--split", default="train")
    src.add_argument("--data-dir", default="", help="dataset cache ('' = jaxformer default)")
    src.add_argument("--eval-fraction", type=float, default=0.02, help="must match data config")
    p.add_argument("--max-sentences", type=int, default=2000, help="input sentences to sample")
    p.add_argument("--max-sentence-chars", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--verbose", action="store_true", help="show SentencePiece's log")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Trains the model and prints a one-line summary; returns the exit code."""
    args = parse_args(argv)
    if args.vocab_size <= 260:
        raise SystemExit("--vocab-size must exceed 260 (4 specials + 256 byte-fallback pieces).")
    if args.tfds_name:
        name = "tfds"
    elif args.paths:
        name = "text_files"
    else:
        name = "stdlib"
    data_cfg = ConfigDict(
        {
            "name": name,
            "paths": args.paths,
            "tfds_name": args.tfds_name,
            "text_key": args.text_key,
            "data_dir": args.data_dir,
            "eval_fraction": args.eval_fraction,
        }
    )
    prefix = os.path.expanduser(args.output_prefix)
    os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
    start = time.time()
    spm.SentencePieceTrainer.train(
        sentence_iterator=sentences(
            data_cfg,
            split=args.split,
            max_sentences=args.max_sentences,
            max_chars=args.max_sentence_chars,
            seed=args.seed,
        ),
        model_prefix=prefix,
        vocab_size=args.vocab_size,
        model_type=args.model_type,
        pad_id=0,
        bos_id=1,
        eos_id=2,
        unk_id=3,
        byte_fallback=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=False,
        allow_whitespace_only_pieces=True,
        split_digits=True,
        input_sentence_size=args.max_sentences,
        shuffle_input_sentence=False,  # already a seeded sample
        max_sentence_length=4 * args.max_sentence_chars + 16,  # bytes
        hard_vocab_limit=False,  # tiny corpora may not support the full vocab
        num_threads=os.cpu_count() or 1,
        minloglevel=0 if args.verbose else 2,
    )
    tok = SentencePieceTokenizer(prefix + ".model")
    print(
        f"wrote {prefix}.model ({tok.vocab_size} pieces, {args.model_type}) "
        f"from data.name={name!r} in {time.time() - start:.1f}s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
