"""The data section's own checks of a config, before any file is opened: each source's
required keys, and keys the chosen source or tokenizer would ignore."""

from __future__ import annotations

import ml_collections

from jaxformer.errors import ConfigError

# data.name -> the key it cannot do without.
REQUIRED = {"text_files": "paths", "tfds": "tfds_name"}
# Keys only a TFDS source reads (text_key has a default every source understands).
TFDS_ONLY = ("tfds_name", "source_key", "target_key", "label_key", "text_pair_key")


def validate_data(cfg: ml_collections.ConfigDict) -> None:
    """Raises a ConfigError naming the data key that cannot work or would do nothing."""
    d = cfg.data
    if d.name in REQUIRED and not d[REQUIRED[d.name]]:
        key = REQUIRED[d.name]
        raise ConfigError(f"config key 'data.{key}' must be set for data.name={d.name!r}")
    ignored = [f"data.{k}" for k in TFDS_ONLY if d.name != "tfds" and d[k]]
    if d.name != "text_files" and d.paths:
        ignored.append("data.paths")
    if d.tokenizer != "sentencepiece" and d.spm_model:
        ignored.append("data.spm_model")
    if ignored:
        raise ConfigError(
            f"config key(s) {', '.join(repr(k) for k in ignored)} do nothing with "
            f"data.name={d.name!r} and data.tokenizer={d.tokenizer!r}; set them to '' "
            "(e.g. --config.data.spm_model=)"
        )
    if d.tokenizer == "sentencepiece" and not d.spm_model:
        raise ConfigError(
            "config key 'data.spm_model' must name a SentencePiece model for "
            "data.tokenizer='sentencepiece' (tools/train_tokenizer.py trains one)"
        )
    if d.seq_len < 1 or d.source_seq_len < 0:
        raise ConfigError(
            f"config keys 'data.seq_len' ({d.seq_len}) and 'data.source_seq_len' "
            f"({d.source_seq_len}) must be positive (source_seq_len 0: seq_len)"
        )
