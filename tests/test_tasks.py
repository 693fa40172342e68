"""Model families as task objects: the registry, the keys a family refuses to ignore,
and a toy family added as docs/architecture.md says (tests/toy_family.py + one line)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from jaxformer.config import ConfigError, load_config
from jaxformer.tasks import TASKS, registry, task_for
from jaxformer.train.validation import validate

ROOT = Path(__file__).resolve().parents[1]
DEFAULT, BERT, T5 = "configs/default.py", "configs/bert.py:tiny", "configs/t5.py"
REVERSE_WORDS = "configs/reverse_words.py"


def _cfg(path: str, *overrides: str):
    return load_config(str(ROOT / path), list(overrides))


def test_the_registry_holds_every_shipped_family() -> None:
    assert sorted(TASKS) == ["bert", "decoder", "encoder_decoder", "t5"]
    for path, name in ((DEFAULT, "decoder"), (REVERSE_WORDS, "encoder_decoder"), (T5, "t5")):
        assert task_for(_cfg(path)).name == name


def test_an_unknown_family_names_the_registered_ones() -> None:
    cfg = _cfg(DEFAULT, "--config.model.family=gpt")
    with pytest.raises(ConfigError, match=r"'model.family' is 'gpt'; choose one of \['decoder'"):
        validate(cfg, 1)


@pytest.mark.parametrize(
    "path, override, key",
    [
        (DEFAULT, "--config.model.relative_buckets=64", "model.relative_buckets"),
        (DEFAULT, "--config.model.num_encoder_layers=2", "model.num_encoder_layers"),
        (DEFAULT, "--config.train.bleu_samples=16", "train.bleu_samples"),
        (DEFAULT, "--config.data.source_seq_len=64", "data.source_seq_len"),
        (REVERSE_WORDS, "--config.model.moe_experts=4", "model.moe_experts"),
        (REVERSE_WORDS, "--config.model.sliding_window=8", "model.sliding_window"),
        (T5, "--config.model.type_vocab_size=3", "model.type_vocab_size"),
        (T5, "--config.train.bleu_samples=16", "train.bleu_samples"),
    ],
)
def test_a_key_the_family_ignores_is_refused(path: str, override: str, key: str) -> None:
    with pytest.raises(ConfigError, match=rf"'{key}' .* does nothing for model.family"):
        validate(_cfg(path, override), 1)


@pytest.mark.parametrize("path", [REVERSE_WORDS, T5])
def test_unrolled_layers_are_refused_where_layers_are_always_scanned(path: str) -> None:
    """model.scan_layers=False used to be ignored by the encoder-decoders and BERT."""
    with pytest.raises(ConfigError, match="'model.scan_layers' .* always scanned"):
        validate(_cfg(path, "--config.model.scan_layers=False"), 1)


def test_bert_does_not_generate() -> None:
    from jaxformer.data import ByteTokenizer

    with pytest.raises(ConfigError, match="'bert' does not generate"):
        TASKS["bert"].generation_inputs(ByteTokenizer(), [1, 2])


@pytest.fixture
def bigram():
    """The toy family, registered the way a new one is: one line."""
    from toy_family import BIGRAM

    registry.register(BIGRAM)
    yield BIGRAM
    TASKS.pop(BIGRAM.name)


@pytest.mark.slow
def test_a_toy_family_trains_plans_and_evaluates_from_one_file(bigram, tmp_path: Path) -> None:
    """tests/toy_family.py and one register() line: the family trains through the same
    loop (its loss falls), compiles in ``jaxformer plan`` and evaluates its checkpoint."""
    from jaxformer.step_plan import plan
    from jaxformer.train.loop import evaluate_checkpoint, train

    run_dir = tmp_path / "run"
    cfg = _cfg(
        DEFAULT, "--config.model.family=bigram", "--config.train.steps=40",
        "--config.train.eval_every=40", "--config.train.log_every=20",
        "--config.train.checkpoint_every=40", f"--config.train.run_dir={run_dir}",
        "--config.optimizer.warmup_steps=5", "--config.train.tensorboard=False",
    )  # fmt: skip
    last = train(cfg)
    evals = [
        r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
        if r["split"] == "eval"
    ]  # fmt: skip
    assert evals[0]["step"] == 0 and evals[-1]["step"] == 40
    assert evals[-1]["loss"] < evals[0]["loss"] - 0.5  # bigrams of Python source are learnt
    assert last["eval"]["loss"] == pytest.approx(evals[-1]["loss"])

    step, metrics = evaluate_checkpoint(cfg)
    assert step == 40 and metrics["loss"] == pytest.approx(evals[-1]["loss"], rel=1e-6)
    assert plan(cfg).params == bigram.count_flops(cfg.model, cfg.data.seq_len).params
    with pytest.raises(ConfigError, match="'model.num_layers' .* does nothing for model.family"):
        validate(_cfg(DEFAULT, "--config.model.family=bigram", "--config.model.num_layers=2"), 1)
