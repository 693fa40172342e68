"""BERT: exact preset sizes, and parity with a tiny random ``transformers`` BERT in both
directions (import, export), with padding and token types."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from jaxformer.config import load_config  # noqa: E402
from jaxformer.hf import bert as hf_bert  # noqa: E402
from jaxformer.model.bert import Bert  # noqa: E402
from jaxformer.tasks import model_config  # noqa: E402

BATCH, SEQ, VOCAB = 3, 20, 128
RTOL = 1e-4  # max |jaxformer - transformers| / max |transformers|, float32
LENGTHS = (SEQ, 13, 5)  # the rest of each row is padding


def _count(tree: Any) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


@pytest.mark.parametrize("size, encoder_pooler", [("base", 109_482_240), ("large", 335_141_888)])
def test_preset_counts(repo_root, size, encoder_pooler):
    cfg = load_config(str(repo_root / "configs" / f"bert_{size}.py"))
    assert cfg.model.family == "bert"
    m = model_config(cfg.model)
    model = nnx.eval_shape(lambda: Bert(m, nnx.Rngs(0)))
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    heads = ("mlm_dense", "mlm_norm", "mlm_bias", "nsp")
    assert _count({k: v for k, v in params.items() if k not in heads}) == encoder_pooler
    # With the heads: Hugging Face's BertForPreTraining (decoder tied to the word table).
    with torch.device("meta"):
        hf = transformers.BertForPreTraining(hf_bert.hf_bert_config(cfg))
    assert _count(params) == sum(p.numel() for p in hf.parameters())


def _perturb(model: Any) -> Any:
    """Noise on every parameter: zero biases and unit norm scales would hide mistakes."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return model.eval()


def _hf_config(**kwargs: Any) -> Any:
    return transformers.BertConfig(
        num_hidden_layers=2, hidden_size=64, num_attention_heads=4, intermediate_size=128,
        vocab_size=VOCAB, max_position_embeddings=64, attn_implementation="eager", **kwargs,
    )  # fmt: skip


@pytest.fixture(scope="module")
def hf_model() -> Any:
    torch.manual_seed(0)
    return _perturb(transformers.BertForPreTraining(_hf_config()))


@pytest.fixture(scope="module")
def batch() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    mask = (np.arange(SEQ)[None, :] < np.asarray(LENGTHS)[:, None]).astype(np.int32)
    types = (np.arange(SEQ)[None, :] >= np.asarray(LENGTHS)[:, None] // 2).astype(np.int32)
    return {
        "inputs": rng.integers(0, VOCAB, (BATCH, SEQ)).astype(np.int32),
        "segment_ids": mask,
        "positions": np.broadcast_to(np.arange(SEQ, dtype=np.int32), (BATCH, SEQ)).copy(),
        "token_type_ids": types * mask,
    }


@nnx.jit
def _forward(model: Bert, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
    return model(batch["inputs"], batch["segment_ids"], batch["positions"], batch["token_type_ids"])


def _jax_out(model: Bert, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    out = _forward(model, jax.tree.map(jnp.asarray, batch))
    return {k: np.asarray(v) for k, v in out.items()}


def _hf_out(model: Any, batch: dict[str, np.ndarray]) -> Any:
    with torch.no_grad():
        return model(
            input_ids=torch.from_numpy(batch["inputs"]).long(),
            attention_mask=torch.from_numpy(batch["segment_ids"]).long(),
            token_type_ids=torch.from_numpy(batch["token_type_ids"]).long(),
            output_hidden_states=True,
        )


def _rel_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


def _valid(batch: dict[str, np.ndarray]) -> np.ndarray:
    """Non-padding positions: padded queries differ (HF still attends from them)."""
    return batch["segment_ids"].astype(bool)


def test_import_matches_transformers(hf_model, batch):
    model = hf_bert.import_hf_bert(hf_model)
    ours, theirs = _jax_out(model, batch), _hf_out(hf_model, batch)
    valid = _valid(batch)
    assert (
        ours["mlm_logits"].shape == (BATCH, SEQ, VOCAB) and ours["mlm_logits"].dtype == np.float32
    )
    mlm = theirs.prediction_logits.numpy()
    assert _rel_diff(ours["mlm_logits"][valid], mlm[valid]) < RTOL
    pooled = _hf_out(hf_model.bert, batch).pooler_output.numpy()
    assert _rel_diff(ours["pooled"], pooled) < RTOL
    assert _rel_diff(ours["nsp_logits"], theirs.seq_relationship_logits.numpy()) < RTOL


def test_export_round_trip(hf_model, batch, tmp_path):
    model = hf_bert.import_hf_bert(hf_model)
    exported = hf_bert.export_hf_bert(model, as_model=False)
    original = hf_model.state_dict()
    assert set(exported) == set(original)
    for name, tensor in original.items():
        assert torch.equal(exported[name], tensor), name
    hf_bert.export_hf_bert(model, attn_implementation="eager").save_pretrained(tmp_path)
    reloaded = transformers.BertForPreTraining.from_pretrained(
        tmp_path, attn_implementation="eager"
    ).eval()
    ours, theirs = _jax_out(model, batch), _hf_out(reloaded, batch)
    valid = _valid(batch)
    assert _rel_diff(ours["mlm_logits"][valid], theirs.prediction_logits.numpy()[valid]) < RTOL
    assert _rel_diff(ours["nsp_logits"], theirs.seq_relationship_logits.numpy()) < RTOL


def test_jaxformer_model_exports_as_masked_lm(batch):
    """A model made by jaxformer (random everywhere), scanned layers, as BertForMaskedLM."""
    cfg = hf_bert.config_from_hf_bert(_hf_config())
    abstract = nnx.eval_shape(lambda: Bert(model_config(cfg.model), nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    rng = np.random.default_rng(3)
    state = jax.tree.map(lambda x: jnp.asarray(0.1 * rng.standard_normal(x.shape), x.dtype), state)
    model = nnx.merge(graphdef, state)
    exported = hf_bert.export_hf_bert(model, head="masked_lm", attn_implementation="eager")
    assert isinstance(exported, transformers.BertForMaskedLM)
    valid = _valid(batch)
    ours = _jax_out(model, batch)["mlm_logits"][valid]
    assert _rel_diff(ours, _hf_out(exported, batch).logits.numpy()[valid]) < RTOL
    # BertForMaskedLM has no pooler/NSP: those are initialised, the rest round-trips.
    again = hf_bert.import_hf_bert(exported)
    np.testing.assert_array_equal(_jax_out(again, batch)["mlm_logits"][valid], ours)


def test_padding_is_not_attended(hf_model, batch):
    """Changing padded tokens (and their types) changes nothing at real positions."""
    model = hf_bert.import_hf_bert(hf_model)
    changed = dict(batch)
    pad = ~_valid(batch)
    changed["inputs"] = np.where(pad, (batch["inputs"] + 7) % VOCAB, batch["inputs"])
    changed["token_type_ids"] = np.where(pad, 1, batch["token_type_ids"])
    a, b = _jax_out(model, batch), _jax_out(model, changed)
    np.testing.assert_allclose(a["mlm_logits"][~pad], b["mlm_logits"][~pad], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(a["pooled"], b["pooled"], rtol=1e-5, atol=1e-5)


def test_classifier_head_and_apply_batch(batch):
    torch.manual_seed(1)
    source = _perturb(transformers.BertForSequenceClassification(_hf_config(num_labels=3)))
    model = hf_bert.import_hf_bert(source)
    assert model.num_labels == 3
    out = _jax_out(model, batch)
    assert out["class_logits"].shape == (BATCH, 3) and out["pooled"].shape == (BATCH, 64)
    assert _rel_diff(out["class_logits"], _hf_out(source, batch).logits.numpy()) < RTOL
    # A classifier's train-step entry point: class logits aligned with [B, 1] label targets.
    logits, aux = model.apply_batch(jax.tree.map(jnp.asarray, batch))
    assert aux == {} and logits.shape == (BATCH, 1, 3)
    np.testing.assert_allclose(np.asarray(logits)[:, 0], out["class_logits"], rtol=1e-5, atol=1e-5)
    # Training mode (dropout on) runs and differs from evaluation.
    train, _ = model.apply_batch(jax.tree.map(jnp.asarray, batch), jax.random.key(0))
    assert not np.allclose(np.asarray(train)[:, 0], out["class_logits"])


def test_pretraining_apply_batch(hf_model, batch):
    """Masked-LM logits, plus the NSP head when the batch carries NSP targets."""
    model = hf_bert.import_hf_bert(hf_model)
    out = _jax_out(model, batch)
    inputs = jax.tree.map(jnp.asarray, batch)
    logits, aux = model.apply_batch(inputs)
    assert aux == {} and logits.shape == (BATCH, SEQ, VOCAB)
    np.testing.assert_allclose(np.asarray(logits), out["mlm_logits"], rtol=1e-5, atol=1e-5)
    inputs["nsp_targets"] = jnp.zeros((BATCH, 1), jnp.int32)
    logits, aux = model.apply_batch(inputs)
    assert set(aux) == {"heads"} and aux["heads"]["nsp"].shape == (BATCH, 1, 2)
    np.testing.assert_allclose(
        np.asarray(aux["heads"]["nsp"])[:, 0], out["nsp_logits"], rtol=1e-5, atol=1e-5
    )


def test_unsupported_configs_raise():
    with pytest.raises(ValueError, match="hidden_act"):
        hf_bert.config_from_hf_bert({"hidden_act": "relu"})
    with pytest.raises(ValueError, match="position_embedding_type"):
        hf_bert.config_from_hf_bert({"position_embedding_type": "relative_key"})
    cfg = hf_bert.config_from_hf_bert(_hf_config())
    cfg.model.norm_eps = 1e-5
    with pytest.raises(ValueError, match="model.norm_eps"):
        hf_bert.import_hf_bert(transformers.BertForPreTraining(_hf_config()), cfg)


def test_masked_lm_trains_through_jaxformer_train(repo_root, tmp_path) -> None:
    """configs/bert.py at a tiny size on the built-in corpus: held-out MLM loss falls."""
    from jaxformer.train.logs import read_metrics
    from jaxformer.train.loop import train

    overrides = [
        "--config.model.d_model=32", "--config.model.num_layers=1", "--config.model.num_heads=2",
        "--config.model.d_ff=64", "--config.model.vocab_size=384", "--config.model.max_len=64",
        "--config.data.seq_len=64", "--config.train.global_batch=8", "--config.train.steps=40",
        "--config.train.microbatches=1", "--config.train.log_every=10",
        "--config.train.eval_every=40", "--config.train.eval_batches=4",
        "--config.optimizer.warmup_steps=5", "--config.optimizer.lr=3e-3",
        "--config.mesh.data=-1", "--config.mesh.fsdp=1", f"--config.train.run_dir={tmp_path}",
    ]  # fmt: skip
    train(load_config(str(repo_root / "configs/bert.py"), overrides))
    evals = [r["loss"] for r in read_metrics(tmp_path, "eval")]
    assert evals[-1] < evals[0] - 1.0
