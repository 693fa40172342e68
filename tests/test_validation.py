"""``validate`` runs each feature's own checks (jaxformer/train/validation.py); here the
data section's, which need no file: required keys, and keys the source would ignore."""

from __future__ import annotations

from pathlib import Path

import pytest

from jaxformer.config import ConfigError, load_config
from jaxformer.train.validation import validate

CONFIG = str(Path(__file__).resolve().parents[1] / "configs/default.py")


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["--config.data.name=text_files"], "'data.paths' must be set for data.name='text_files'"),
        (["--config.data.name=tfds"], "'data.tfds_name' must be set for data.name='tfds'"),
        (["--config.data.paths=corpus/*.txt"], "'data.paths' do nothing with data.name='stdlib'"),
        (["--config.data.tfds_name=lm1b"], "'data.tfds_name' do nothing with data.name='stdlib'"),
        (["--config.data.label_key=label"], "'data.label_key' do nothing"),
        (["--config.data.spm_model=m.model"], "'data.spm_model' do nothing .*tokenizer='byte'"),
        (["--config.data.tokenizer=sentencepiece"], "'data.spm_model' must name a SentencePiece"),
        (["--config.data.seq_len=0"], "'data.seq_len' \\(0\\)"),
    ],
)
def test_the_data_section_is_checked_before_any_file_is_opened(overrides, message) -> None:
    with pytest.raises(ConfigError, match=message):
        validate(load_config(CONFIG, overrides), 1)


def test_the_shipped_default_validates() -> None:
    assert validate(load_config(CONFIG), 1)["data"] == 1
