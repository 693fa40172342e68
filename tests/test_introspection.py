"""Introspection: per-layer attention probabilities and hidden states for every family,
checked against the model's own masks and logits, against Hugging Face's
``output_attentions`` / ``output_hidden_states``, and rendered by tools/attention_maps.py.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TINY_CLI
from flax import nnx

from jaxformer.model import capture_intermediates
from jaxformer.tasks import model_config, task_for

ROOT = Path(__file__).resolve().parent.parent
V = 64
T5_KEYS = {
    "model.position": "none",
    "model.norm": "rmsnorm",
    "model.norm_position": "pre",
    "model.scale_attention": False,
    "model.relative_buckets": 8,
    "model.relative_max_distance": 16,
}
FAMILY_OVERRIDES = {
    "decoder-scan": {"model.family": "decoder"},
    "decoder-loop-gqa": {
        "model.family": "decoder",
        "model.scan_layers": False,
        "model.num_kv_heads": 2,
    },
    "decoder-dot-product": {"model.family": "decoder", "model.attention_impl": "dot_product"},
    "encoder_decoder": {"model.family": "encoder_decoder", "model.position": "sinusoidal"},
    "t5": {"model.family": "t5", **T5_KEYS},
    "bert": {"model.family": "bert", "model.position": "learned", "model.norm_position": "post"},
}


def _model(make_config: Any, name: str) -> Any:
    cfg = make_config(
        {"model.vocab_size": V, "model.num_encoder_layers": 3, **FAMILY_OVERRIDES[name]}
    )
    m = model_config(cfg.model)
    return task_for(cfg).model_class(m, nnx.Rngs(params=0))


def _side(prefix: str = "") -> dict[str, jax.Array]:
    """Row 0 packs two documents (5 + 4 tokens, then 1 padding slot); row 1 holds one."""
    return {
        f"{prefix}inputs": jax.random.randint(jax.random.key(len(prefix)), (2, 10), 3, V),
        f"{prefix}segment_ids": jnp.asarray([[1] * 5 + [2] * 4 + [0], [1] * 10]),
        f"{prefix}positions": jnp.asarray([[*range(5), *range(4), 0], list(range(10))]),
    }


def _batch(family: str) -> dict[str, jax.Array]:
    batch = _side()
    if family in ("encoder_decoder", "t5"):
        batch |= _side("encoder_")
    if family == "bert":
        batch["token_type_ids"] = jnp.zeros((2, 10), jnp.int32)
    return batch


@pytest.mark.parametrize("name", FAMILY_OVERRIDES)
def test_captured_values_are_consistent(make_config, name):
    """Capturing changes no logit; shapes are [N(+1), B, ...]; attention rows are
    distributions over exactly the keys the mask allows (causal where it should be)."""
    model = _model(make_config, name)
    cfg = model.cfg
    batch = _batch(cfg.family)
    plain, _ = nnx.jit(lambda m, b: m.apply_batch(b))(model, batch)
    out = capture_intermediates(model, batch)
    np.testing.assert_allclose(out["logits"], plain, rtol=1e-6, atol=1e-6)
    seq2seq = cfg.family in ("encoder_decoder", "t5")
    stacks = (
        {"encoder_": (cfg.num_encoder_layers, False), "decoder_": (cfg.num_layers, True)}
        if seq2seq
        else {"": (cfg.num_layers, cfg.family == "decoder")}
    )
    seg = np.asarray(batch["segment_ids"])
    for prefix, (layers, causal) in stacks.items():
        hidden, att = out[f"{prefix}hidden_states"], np.asarray(out[f"{prefix}attention"])
        assert hidden.shape == (layers + 1, 2, 10, cfg.d_model)
        assert att.shape == (layers, 2, cfg.num_heads, 10, 10)
        allowed = (seg[:, :, None] == seg[:, None, :]) & (seg[:, :, None] > 0)
        if causal:
            allowed &= np.tril(np.ones((10, 10), bool))
        # Padding queries (segment 0) see nothing and spread evenly: only real rows count.
        real_BxHxL = np.broadcast_to((seg > 0)[:, None], att.shape[1:4])
        allowed_BxHxLxS = np.broadcast_to(allowed[:, None], att.shape[1:])
        for layer in att:
            masked = layer[~allowed_BxHxLxS & real_BxHxL[..., None]]
            assert (masked < 1e-6).all(), "no weight on masked keys"
            np.testing.assert_allclose(layer.sum(-1)[real_BxHxL], 1, atol=1e-5)
    if seq2seq:
        cross = np.asarray(out["decoder_cross_attention"])
        assert cross.shape == (cfg.num_layers, 2, cfg.num_heads, 10, 10)
        enc_seg = np.asarray(batch["encoder_segment_ids"])
        other = (seg[:, :, None] != enc_seg[:, None, :]) & (seg[:, :, None] > 0)
        assert (cross[:, np.broadcast_to(other[:, None], cross.shape[1:])] < 1e-6).all()


def test_hidden_states_chain_through_the_layers(make_config):
    """hidden_states[0] is the embedding output, the last one feeds the logits head."""
    model = _model(make_config, "decoder-scan")
    batch = _batch("decoder")
    out = capture_intermediates(model, batch)
    embedded = model._embed(batch["inputs"], batch["positions"], None)
    np.testing.assert_allclose(out["hidden_states"][0], embedded, atol=1e-6)
    np.testing.assert_allclose(
        model.output_logits(out["hidden_states"][-1]), out["logits"], rtol=1e-5, atol=1e-5
    )


# -- against Hugging Face -------------------------------------------------------------------

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def _perturbed(model: Any) -> Any:
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return model.eval()


def _rel(a: Any, b: Any) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def _assert_matches(ours: Any, theirs: tuple, what: str) -> None:
    theirs = np.stack([t.float().numpy() for t in theirs])
    assert ours.shape == theirs.shape, (what, ours.shape, theirs.shape)
    assert _rel(ours, theirs) < 1e-4, what


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_decoder_matches_transformers(arch):
    from jaxformer import hf

    torch.manual_seed(0)
    if arch == "gpt2":
        config = transformers.GPT2Config(
            n_layer=2, n_embd=64, n_head=4, vocab_size=V, n_positions=32,
            attn_implementation="eager",
        )  # fmt: skip
        hf_model = _perturbed(transformers.GPT2LMHeadModel(config))
    else:
        config = transformers.LlamaConfig(
            num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=128, vocab_size=V, max_position_embeddings=32,
            attn_implementation="eager",
        )  # fmt: skip
        hf_model = _perturbed(transformers.LlamaForCausalLM(config))
    model = hf.import_hf(hf_model)
    ids = np.random.default_rng(0).integers(0, V, (2, 12)).astype(np.int32)
    with torch.no_grad():
        ref = hf_model(
            torch.from_numpy(ids.astype(np.int64)), output_attentions=True,
            output_hidden_states=True,
        )  # fmt: skip
    out = capture_intermediates(model, _unpacked(ids))
    _assert_matches(out["attention"], ref.attentions, "attention")
    _assert_matches(out["hidden_states"], ref.hidden_states, "hidden_states")


def _unpacked(ids: np.ndarray, prefix: str = "") -> dict[str, jax.Array]:
    b, n = ids.shape
    return {
        f"{prefix}inputs": jnp.asarray(ids),
        f"{prefix}segment_ids": jnp.ones((b, n), jnp.int32),
        f"{prefix}positions": jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (b, n)),
    }


def test_t5_matches_transformers():
    from jaxformer.hf import t5 as hf_t5

    config = transformers.T5Config(
        vocab_size=V, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_decoder_layers=2,
        num_heads=4, relative_attention_num_buckets=8, relative_attention_max_distance=16,
        dropout_rate=0.0, attn_implementation="eager",
    )  # fmt: skip
    torch.manual_seed(0)
    hf_model = _perturbed(transformers.T5ForConditionalGeneration(config))
    model = hf_t5.import_hf_t5(hf_model)
    rng = np.random.default_rng(0)
    src, tgt = rng.integers(0, V, (2, 9)), rng.integers(0, V, (2, 7))
    with torch.no_grad():
        ref = hf_model(
            input_ids=torch.from_numpy(src), decoder_input_ids=torch.from_numpy(tgt),
            output_attentions=True, output_hidden_states=True,
        )  # fmt: skip
    batch = _unpacked(src.astype(np.int32), "encoder_") | _unpacked(tgt.astype(np.int32))
    out = capture_intermediates(model, batch)
    _assert_matches(out["encoder_attention"], ref.encoder_attentions, "encoder attention")
    _assert_matches(out["decoder_attention"], ref.decoder_attentions, "decoder attention")
    _assert_matches(out["decoder_cross_attention"], ref.cross_attentions, "cross attention")
    _assert_matches(out["encoder_hidden_states"], ref.encoder_hidden_states, "encoder hidden")
    _assert_matches(out["decoder_hidden_states"], ref.decoder_hidden_states, "decoder hidden")


def test_bert_matches_transformers():
    from jaxformer.hf import bert as hf_bert

    config = transformers.BertConfig(
        num_hidden_layers=2, hidden_size=64, num_attention_heads=4, intermediate_size=128,
        vocab_size=V, max_position_embeddings=32, attn_implementation="eager",
    )  # fmt: skip
    torch.manual_seed(0)
    hf_model = _perturbed(transformers.BertModel(config, add_pooling_layer=False))
    model = hf_bert.import_hf_bert(hf_model.state_dict(), hf_bert.config_from_hf_bert(config))
    ids = np.random.default_rng(0).integers(0, V, (2, 12))
    with torch.no_grad():
        ref = hf_model(torch.from_numpy(ids), output_attentions=True, output_hidden_states=True)
    batch = _unpacked(ids.astype(np.int32)) | {"token_type_ids": jnp.zeros((2, 12), jnp.int32)}
    out = capture_intermediates(model, batch)
    _assert_matches(out["attention"], ref.attentions, "attention")
    _assert_matches(out["hidden_states"], ref.hidden_states, "hidden_states")


# -- the heatmap tool -----------------------------------------------------------------------

TINY = [
    *TINY_CLI,
    "--config.train.eval_every=0",
    "--config.train.tensorboard=False",
]


def test_attention_maps_tool(tmp_path: Path) -> None:
    """Two training steps, then the tool: a PNG with a heatmap per (layer, head) and the
    captured arrays for the prompt."""
    import matplotlib.image

    from jaxformer.config import load_config
    from jaxformer.train.loop import train

    sys.path.insert(0, str(ROOT / "tools"))
    import attention_maps

    config = str(ROOT / "configs/default.py")
    overrides = [*TINY, f"--config.train.run_dir={tmp_path / 'run'}"]
    train(load_config(config, [*overrides, "--config.train.steps=2"]))
    png, npz = tmp_path / "att.png", tmp_path / "hidden.npz"
    argv = [f"--config={config}", *overrides, "--prompt=def f(x):", f"--out={png}"]
    assert attention_maps.main([*argv, f"--hidden_out={npz}", "--layers=-1"]) == 0
    image = matplotlib.image.imread(png)
    assert image.shape[0] > 100 and image.shape[1] > image.shape[0]  # 1 row x 2 heads
    saved = np.load(npz)
    prompt_len = 1 + len("def f(x):")
    assert saved["attention"].shape == (2, 2, prompt_len, prompt_len)
    assert saved["hidden_states"].shape == (3, prompt_len, 32)
    assert attention_maps.main([*argv, "--layers=5"]) == 2  # out of range: a clear error
