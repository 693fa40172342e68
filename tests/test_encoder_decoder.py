"""The encoder-decoder Transformer: sizes, masking between packed pairs, causality."""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxformer.config import base_config, load_config
from jaxformer.model import count_params
from jaxformer.model.encoder_decoder import EncoderDecoder
from jaxformer.tasks import model_config
from jaxformer.train.setup import restore_params
from jaxformer.train.validation import validate

ROOT = Path(__file__).resolve().parent.parent
V = 64


@pytest.mark.parametrize(
    ("config", "expected", "paper"),
    [("transformer_base.py", 63_082_496, 65e6), ("transformer_big.py", 214_245_376, 213e6)],
)
def test_paper_sizes(config: str, expected: int, paper: float) -> None:
    cfg = load_config(str(ROOT / "configs" / config))
    model = nnx.eval_shape(lambda: EncoderDecoder(model_config(cfg.model), nnx.Rngs(0)))
    count = count_params(nnx.state(model))
    assert count == expected  # papers.md: 63.1M and 214.3M with a 37k vocabulary and biases
    assert abs(count - paper) / paper < 0.04


def tiny(**overrides: object) -> EncoderDecoder:
    c = base_config().model
    c.update(
        dict(
            family="encoder_decoder",
            vocab_size=V,
            d_model=32,
            d_ff=64,
            num_heads=4,
            num_layers=2,
            num_encoder_layers=3,
            position="sinusoidal",
            norm="layernorm",
            norm_position="post",
            mlp="relu",
            use_bias=True,
            scale_embeddings=True,
        )
    )
    c.update(overrides)
    return EncoderDecoder(model_config(c), nnx.Rngs(params=0))


def batch() -> dict[str, jax.Array]:
    """Row 0 packs two pairs (source 6 + 4 tokens, target 4 + 4); row 1 holds one pair."""
    return {
        "encoder_inputs": jax.random.randint(jax.random.key(0), (2, 10), 3, V),
        "encoder_segment_ids": jnp.asarray([[1] * 6 + [2] * 4, [1] * 10]),
        "encoder_positions": jnp.asarray([list(range(6)) + list(range(4)), list(range(10))]),
        "inputs": jax.random.randint(jax.random.key(1), (2, 8), 3, V),
        "segment_ids": jnp.asarray([[1] * 4 + [2] * 4, [1] * 7 + [0]]),
        "positions": jnp.asarray([list(range(4)) * 2, list(range(7)) + [0]]),
    }


def test_layer_counts_and_shapes() -> None:
    model = tiny()
    assert jax.tree.leaves(nnx.state(model.encoder))[0].shape[0] == 3
    assert jax.tree.leaves(nnx.state(model.decoder))[0].shape[0] == 2
    logits, aux = model.apply_batch(batch())
    assert logits.shape == (2, 8, V) and aux == {}


@pytest.mark.parametrize("norm_position", ["post", "pre"])
def test_packed_pairs_do_not_see_each_other(norm_position: str) -> None:
    model = tiny(norm_position=norm_position)
    b = batch()
    logits = model.apply_batch(b)[0]
    # Changing the first pair's source changes only the first pair's target logits.
    changed = dict(b, encoder_inputs=b["encoder_inputs"].at[0, 0].add(1))
    after = model.apply_batch(changed)[0]
    np.testing.assert_array_equal(np.asarray(after[0, 4:]), np.asarray(logits[0, 4:]))
    assert not np.allclose(np.asarray(after[0, :4]), np.asarray(logits[0, :4]))
    # Changing the second pair's source changes only the second pair's target logits.
    changed = dict(b, encoder_inputs=b["encoder_inputs"].at[0, 7].add(1))
    after = model.apply_batch(changed)[0]
    np.testing.assert_array_equal(np.asarray(after[0, :4]), np.asarray(logits[0, :4]))


def test_decoder_is_causal() -> None:
    model = tiny()
    b = batch()
    logits = model.apply_batch(b)[0]
    changed = dict(b, inputs=b["inputs"].at[1, 5].add(1))
    after = model.apply_batch(changed)[0]
    np.testing.assert_array_equal(np.asarray(after[1, :5]), np.asarray(logits[1, :5]))
    assert not np.allclose(np.asarray(after[1, 5]), np.asarray(logits[1, 5]))


def test_dropout_only_with_a_key() -> None:
    model = tiny(dropout=0.1)
    b = batch()
    np.testing.assert_array_equal(model.apply_batch(b)[0], model.apply_batch(b)[0])
    assert not np.allclose(model.apply_batch(b, jax.random.key(0))[0], model.apply_batch(b)[0])


def test_trains_on_the_built_in_task(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A few steps of configs/reverse_words.py at a tiny size: the loss falls, and
    ``jaxformer generate`` translates a prompt with the checkpoint, greedy and by beam."""
    from jaxformer.train.logs import read_metrics
    from jaxformer.train.loop import train

    overrides = [
        "--config.model.d_model=32", "--config.model.d_ff=64", "--config.model.num_layers=1",
        "--config.model.num_encoder_layers=1", "--config.data.seq_len=64",
        "--config.data.source_seq_len=64", "--config.model.max_len=64",
        "--config.train.global_batch=8", "--config.train.steps=30", "--config.train.log_every=1",
        "--config.train.eval_every=30", "--config.train.eval_batches=2",
        "--config.optimizer.schedule=constant", "--config.optimizer.lr=3e-3",
        "--config.optimizer.warmup_steps=0", f"--config.train.run_dir={tmp_path}",
    ]  # fmt: skip
    train(load_config(str(ROOT / "configs/reverse_words.py"), overrides))
    losses = [r["loss"] for r in read_metrics(tmp_path, "train")]
    evals = [r["loss"] for r in read_metrics(tmp_path, "eval")]
    assert len(losses) == 30 and np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.5
    assert evals[-1] < evals[0]

    from jaxformer import cli, data, decode

    cfg = load_config(str(ROOT / "configs/reverse_words.py"), overrides)
    model, step, _ = restore_params(cfg)
    tokenizer = data.build_tokenizer(cfg.data)
    source = np.append(tokenizer.encode("hello world"), tokenizer.eos_id)[None].astype(np.int32)
    config = f"--config={ROOT / 'configs/reverse_words.py'}"
    for how, beam in (("--temperature=0", 1), ("--beam_size=3", 3)):
        tokens = decode.translate(
            model, source, max_new_tokens=8, start_id=tokenizer.bos_id,
            eos_id=tokenizer.eos_id, beam_size=beam,
        )  # fmt: skip
        capsys.readouterr()
        argv = ["generate", config, *overrides, "--prompt=hello world", "--max_new_tokens=8", how]
        assert cli.main(argv) == 0
        assert capsys.readouterr().out == tokenizer.decode(np.asarray(tokens[0])) + "\n"


def test_family_and_data_must_match() -> None:
    from jaxformer.config import ConfigError

    cfg = load_config(str(ROOT / "configs/reverse_words.py"), ["--config.model.family=decoder"])
    with pytest.raises(ConfigError, match="model.family"):
        validate(cfg, 8)
