"""Hugging Face checkpoint directories (config.json + safetensors) in and out of jaxformer
without torch or transformers: tiny random models that ``transformers`` saves load into
jaxformer with the same float32 logits, and what jaxformer saves ``from_pretrained``
loads with the same logits again. Also ``tools/hf_convert.py``: import a directory as a
run, ``jaxformer generate`` from it, export the run back.

Skipped when torch or transformers (the ``test`` extra) is not installed.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import re
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from jaxformer import hf  # noqa: E402
from jaxformer.attention.dot_product import DotProduct  # noqa: E402
from jaxformer.config import check_schema  # noqa: E402
from jaxformer.train.setup import restore_params  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
from hf_logits import SRC, VOCAB  # noqa: E402
from hf_logits import bert_logits as _bert_logits  # noqa: E402
from hf_logits import decoder_logits as _decoder_logits  # noqa: E402
from hf_logits import positions as _positions  # noqa: E402
from hf_logits import t5_logits as _t5_logits  # noqa: E402
from hf_logits import tokens as _tokens  # noqa: E402

RTOL = 1e-4  # max |jaxformer - transformers| / max |transformers|, float32


def _perturbed(model: Any, seed: int) -> Any:
    """Noise on every parameter: zero biases and unit norm scales would hide a mistake."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return model.eval()


def _gpt2(vocab: int = VOCAB) -> Any:
    config = transformers.GPT2Config(
        n_layer=2, n_embd=64, n_head=4, vocab_size=vocab, n_positions=64,
        bos_token_id=None, eos_token_id=None, attn_implementation="eager",
    )  # fmt: skip
    torch.manual_seed(0)
    return _perturbed(transformers.GPT2LMHeadModel(config), 0)


def _llama() -> Any:
    config = transformers.LlamaConfig(
        num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=128, vocab_size=VOCAB, rms_norm_eps=1e-5, rope_theta=500.0,
        max_position_embeddings=64, attn_implementation="eager",
    )  # fmt: skip
    torch.manual_seed(1)
    return _perturbed(transformers.LlamaForCausalLM(config), 1)


def _bert() -> Any:
    config = transformers.BertConfig(
        num_hidden_layers=2, hidden_size=64, num_attention_heads=4, intermediate_size=128,
        vocab_size=VOCAB, max_position_embeddings=64, attn_implementation="eager",
    )  # fmt: skip
    torch.manual_seed(2)
    return _perturbed(transformers.BertForPreTraining(config), 2)


def _t5() -> Any:
    """T5.1.1: gated GELU and an untied head, the harder of the two T5 styles."""
    config = transformers.T5Config(
        vocab_size=VOCAB, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_decoder_layers=2,
        num_heads=4, feed_forward_proj="gated-gelu", tie_word_embeddings=False,
        dropout_rate=0.0, attn_implementation="eager",
    )  # fmt: skip
    torch.manual_seed(3)
    model = transformers.T5ForConditionalGeneration(config)
    model.lm_head.weight = torch.nn.Parameter(model.shared.weight.detach().clone())
    return _perturbed(model, 3)


def _jax_logits(model_type: str, model: Any) -> np.ndarray:
    tokens = jnp.asarray(_tokens(0))
    if model_type == "t5":
        return np.asarray(_t5_logits(model, jnp.asarray(_tokens(1, SRC)), tokens))
    return np.asarray((_bert_logits if model_type == "bert" else _decoder_logits)(model, tokens))


def _hf_logits(model_type: str, model: Any) -> np.ndarray:
    tokens = torch.from_numpy(_tokens(0)).long()
    with torch.no_grad():
        if model_type == "t5":
            src = torch.from_numpy(_tokens(1, SRC)).long()
            return model(input_ids=src, decoder_input_ids=tokens).logits.numpy()
        if model_type == "bert":
            return model(input_ids=tokens).prediction_logits.numpy()
        return model(tokens).logits.numpy()


def _rel_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


MAKERS: dict[str, Callable[[], Any]] = {"gpt2": _gpt2, "llama": _llama, "bert": _bert, "t5": _t5}
AUTO = {
    "gpt2": "AutoModelForCausalLM",
    "llama": "AutoModelForCausalLM",
    "bert": "AutoModelForPreTraining",
    "t5": "AutoModelForSeq2SeqLM",
}


@pytest.fixture(scope="module", params=sorted(MAKERS))
def saved(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple:
    """``(model_type, transformers model, its save_pretrained directory)``."""
    model_type = request.param
    model = MAKERS[model_type]()
    path = tmp_path_factory.mktemp(f"hf_{model_type}")
    model.save_pretrained(path, safe_serialization=True)
    return model_type, model, path


@contextlib.contextmanager
def _without_torch() -> Iterator[None]:
    """``import torch`` / ``import transformers`` fail inside: the code under test must
    not touch them."""
    with pytest.MonkeyPatch.context() as patch:
        for name in ("torch", "transformers", "safetensors.torch"):
            patch.setitem(sys.modules, name, None)
        yield


def _from_pretrained(model_type: str, path: Path) -> Any:
    auto = getattr(transformers, AUTO[model_type])
    return auto.from_pretrained(path, attn_implementation="eager").eval()


# -- load ---------------------------------------------------------------------------------


@pytest.mark.parametrize("scan_layers", [True, False], ids=["scan", "loop"])
def test_load_hf_dir_matches_transformers(saved, scan_layers):
    model_type, hf_model, path = saved
    with _without_torch():
        cfg = hf.config_from_hf_dir(path)
        cfg.model.scan_layers = scan_layers
        model = hf.load_hf_dir(path, check_schema(cfg), model_type=model_type)
        ours = _jax_logits(model_type, model)
    assert type(model).__name__ == {"bert": "Bert", "t5": "T5"}.get(model_type, "DecoderLM")
    assert ours.dtype == np.float32
    assert _rel_diff(ours, _hf_logits(model_type, hf_model)) < RTOL


def test_load_hf_dir_runs_the_configs_attention_backend(saved):
    """``model.attention_impl="dot_product"``: the loaded model calls that backend (ring
    attention in front of it on meshes that split sequences) and computes the same logits;
    ``ModelConfig.from_config`` alone would refuse the config rather than drop it."""
    model_type, hf_model, path = saved
    cfg = hf.config_from_hf_dir(path)
    cfg.model.attention_impl = "dot_product"
    model = hf.load_hf_dir(path, check_schema(cfg), model_type=model_type)
    backend = model.cfg.attention
    assert isinstance(getattr(backend, "local", backend), DotProduct), backend
    assert _rel_diff(_jax_logits(model_type, model), _hf_logits(model_type, hf_model)) < RTOL


def test_save_hf_dir_loads_in_transformers(saved, tmp_path):
    model_type, hf_model, path = saved
    model = hf.load_hf_dir(path)
    out = tmp_path / "out"
    with _without_torch():  # saving needs no torch either
        assert hf.save_hf_dir(model, out, model_type=model_type) == ["model.safetensors"]
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == model_type and config["architectures"]
    reloaded = _from_pretrained(model_type, out)
    assert type(reloaded) is type(hf_model)
    want = _jax_logits(model_type, model)
    assert _rel_diff(_hf_logits(model_type, reloaded), want) < RTOL
    np.testing.assert_array_equal(
        _hf_logits(model_type, reloaded), _hf_logits(model_type, hf_model)
    )


def test_sharded_directories(tmp_path):
    """transformers' shards (and index) load; jaxformer's shards load in transformers."""
    hf_model = _llama()
    hf_model.save_pretrained(tmp_path / "hf", safe_serialization=True, max_shard_size="100KB")
    assert (tmp_path / "hf" / hf.INDEX_FILE).is_file()
    assert len(list((tmp_path / "hf").glob("model-*-of-*.safetensors"))) > 1
    model = hf.load_hf_dir(tmp_path / "hf")
    assert _rel_diff(_jax_logits("llama", model), _hf_logits("llama", hf_model)) < RTOL

    files = hf.save_hf_dir(model, tmp_path / "ours", max_shard_size=40_000)
    assert len(files) > 1 and all(
        re.fullmatch(r"model-\d{5}-of-\d{5}\.safetensors", f) for f in files
    )
    index = json.loads((tmp_path / "ours" / hf.INDEX_FILE).read_text())
    assert sorted(set(index["weight_map"].values())) == files
    assert not (tmp_path / "ours" / hf.WEIGHTS_FILE).exists()
    reloaded = _from_pretrained("llama", tmp_path / "ours")
    np.testing.assert_array_equal(_hf_logits("llama", reloaded), _hf_logits("llama", hf_model))
    again = hf.load_hf_dir(tmp_path / "ours")
    np.testing.assert_array_equal(_jax_logits("llama", again), _jax_logits("llama", model))
    # Saving again unsharded removes the shards and the index, so none shadows the file.
    assert hf.save_hf_dir(model, tmp_path / "ours") == [hf.WEIGHTS_FILE]
    assert sorted(p.name for p in (tmp_path / "ours").iterdir()) == [
        "config.json",
        hf.WEIGHTS_FILE,
    ]


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_loads_as_float32(tmp_path, dtype):
    hf_model = _gpt2().to(getattr(torch, dtype))
    hf_model.save_pretrained(tmp_path, safe_serialization=True)
    model = hf.load_hf_dir(tmp_path)
    embed = np.asarray(model.embed[...])
    assert embed.dtype == np.float32
    want = hf_model.transformer.wte.weight.detach().float().numpy()
    np.testing.assert_array_equal(embed, want)  # the bf16/fp16 values, exactly


def test_bert_classifier_directory(tmp_path):
    """A BertForSequenceClassification directory: its labels come from the classifier in
    the files (config.json lists labels whatever the head) and go back out with it."""
    config = _bert().config
    config.num_labels = 3
    torch.manual_seed(4)
    source = _perturbed(transformers.BertForSequenceClassification(config), 4)
    source.save_pretrained(tmp_path / "hf", safe_serialization=True)
    cfg = hf.config_from_hf_dir(tmp_path / "hf")
    assert cfg.model.num_labels == 3
    cfg.model.num_labels = 0
    with pytest.raises(ValueError, match=r"model.num_labels=0 \(config.json: 3\)"):
        hf.load_hf_dir(tmp_path / "hf", cfg)
    model = hf.load_hf_dir(tmp_path / "hf")
    tokens = _tokens(0)

    @nnx.jit
    def classify(model: Any, tokens: jax.Array) -> jax.Array:
        ones = jnp.ones_like(tokens)
        out = model(tokens, ones, _positions(tokens.shape[1]), jnp.zeros_like(tokens))
        return out["class_logits"]

    with torch.no_grad():
        want = source(input_ids=torch.from_numpy(tokens).long()).logits.numpy()
    assert _rel_diff(np.asarray(classify(model, jnp.asarray(tokens))), want) < RTOL
    hf.save_hf_dir(model, tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["architectures"] == ["BertForSequenceClassification"]
    reloaded = transformers.AutoModelForSequenceClassification.from_pretrained(
        tmp_path / "out", attn_implementation="eager"
    ).eval()
    with torch.no_grad():
        got = reloaded(input_ids=torch.from_numpy(tokens).long()).logits.numpy()
    np.testing.assert_array_equal(got, want)


# -- errors -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("gpt2_dir")
    _gpt2().save_pretrained(path, safe_serialization=True)
    return path


def _copy(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_missing_files_are_named(gpt2_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        hf.load_hf_dir(tmp_path / "nowhere")
    no_config = _copy(gpt2_dir, tmp_path / "a")
    (no_config / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(f"'{no_config / 'config.json'}'")):
        hf.load_hf_dir(no_config)
    no_weights = _copy(gpt2_dir, tmp_path / "b")
    (no_weights / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="neither 'model.safetensors' nor"):
        hf.load_hf_dir(no_weights)
    (no_weights / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="it has pytorch_model.bin"):
        hf.load_hf_dir(no_weights)


def test_wrong_model_type_or_family_is_named(gpt2_dir, tmp_path):
    with pytest.raises(ValueError, match=r"holds a gpt2 model \(model_type\), not llama"):
        hf.load_hf_dir(gpt2_dir, model_type="llama")
    t5_cfg = hf.config_from_hf_dir(gpt2_dir)
    t5_cfg.model.family = "t5"
    with pytest.raises(ValueError, match=r"model.family='t5' \(config.json: 'decoder'\)"):
        hf.load_hf_dir(gpt2_dir, t5_cfg)
    odd = _copy(gpt2_dir, tmp_path / "odd")
    config = json.loads((odd / "config.json").read_text())
    (odd / "config.json").write_text(json.dumps({**config, "model_type": "mamba"}))
    with pytest.raises(ValueError, match=r"model_type 'mamba'; jaxformer reads \['bert'"):
        hf.load_hf_dir(odd)


def test_mismatches_name_the_tensor_and_file(gpt2_dir, tmp_path):
    cfg = hf.config_from_hf_dir(gpt2_dir)
    cfg.model.d_model = 32
    with pytest.raises(ValueError, match=r"model.d_model=32 \(config.json: 64\)"):
        hf.load_hf_dir(gpt2_dir, cfg)
    # config.json says one thing, the tensors another: the tensor and its file are named.
    bad = _copy(gpt2_dir, tmp_path / "bad")
    config = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**config, "vocab_size": 2 * VOCAB}))
    file = bad / "model.safetensors"
    with pytest.raises(ValueError) as err:
        hf.load_hf_dir(bad)
    message = str(err.value)
    assert "'transformer.wte.weight' (128, 64)" in message and "(256, 64)" in message
    assert str(file) in message
    # A tensor the map needs and the file lacks.
    from safetensors.numpy import save_file

    tensors = hf.read_safetensors(str(gpt2_dir / "model.safetensors"))
    save_file({k: v for k, v in tensors.items() if k != "transformer.h.1.ln_2.bias"}, str(file))
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(KeyError, match=r"lacks \['transformer.h.1.ln_2.bias'\].*model.safetensors"):
        hf.load_hf_dir(bad)


# -- tools/hf_convert.py -------------------------------------------------------------------


def _tool() -> Any:
    spec = importlib.util.spec_from_file_location(
        "hf_convert", REPO_ROOT / "tools" / "hf_convert.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


TOOL_ARGS = [
    f"--config={REPO_ROOT / 'configs' / 'default.py'}",
    "--config.train.global_batch=8",
    "--config.train.eval_every=0",
    "--config.train.tensorboard=False",
]


@pytest.fixture(scope="module")
def byte_gpt2(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Path]:
    """A GPT-2 over the byte tokenizer's 259 ids, saved by transformers."""
    model = _gpt2(vocab=259)
    path = tmp_path_factory.mktemp("byte_gpt2")
    model.save_pretrained(path, safe_serialization=True)
    return model, path


def test_import_generate_export(byte_gpt2, tmp_path, capsys):
    from jaxformer import cli
    from jaxformer.data.tokenizers import ByteTokenizer

    hf_model, hf_dir = byte_gpt2
    tool = _tool()
    run = [*TOOL_ARGS, f"--config.train.run_dir={tmp_path / 'run'}"]
    # The default config is a LLaMA-style model: the import names what differs.
    assert tool.main(["import", "--hf_dir", str(hf_dir), *run]) == 2
    err = capsys.readouterr().err
    assert "model.position='rope' (config.json: 'learned')" in err and "--derive" in err
    assert not (tmp_path / "run").exists()
    assert tool.main(["import", "--hf_dir", str(hf_dir), *run, "--derive"]) == 0
    overrides = capsys.readouterr().out.split()
    assert "--config.model.position=learned" in overrides
    assert "--config.model.vocab_size=259" in overrides
    assert "--config.data.seq_len=64" in overrides
    run += overrides
    assert tool.main(["import", "--hf_dir", str(hf_dir), *run]) == 0
    assert (tmp_path / "run" / "checkpoints" / "0").is_dir()
    assert tool.main(["import", "--hf_dir", str(hf_dir), *run]) == 2, "never overwrites"
    assert "already holds checkpoints" in capsys.readouterr().err

    # jaxformer generate on the imported run: HF's greedy tokens.
    argv = ["generate", *run, "--prompt=def ", "--max_new_tokens=24", "--temperature=0"]
    assert cli.main(argv) == 0
    text = capsys.readouterr().out[:-1]  # print's newline
    tokenizer = ByteTokenizer()
    prompt = [tokenizer.bos_id, *tokenizer.encode("def ")]
    with torch.no_grad():
        out = hf_model.generate(
            torch.tensor([prompt]), do_sample=False, max_new_tokens=24,
            eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id,
        )  # fmt: skip
    new = out[0, len(prompt) :].numpy()
    assert text and text == tokenizer.decode(new)

    # Export the run: transformers loads it and computes the original model's logits.
    out_dir = tmp_path / "out"
    assert tool.main(["export", *run, "--out", str(out_dir), "--max_shard_size=100000"]) == 0
    assert "exported step 0" in capsys.readouterr().out
    assert (out_dir / hf.INDEX_FILE).is_file()  # sharded: the model is about 370 KB
    reloaded = _from_pretrained("gpt2", out_dir)
    np.testing.assert_array_equal(_hf_logits("gpt2", reloaded), _hf_logits("gpt2", hf_model))
    assert tool.main(["export", *run, "--out", str(tmp_path / "x"), "--model_type=llama"]) == 2
    assert "the model is a gpt2 model, not llama" in capsys.readouterr().err


def test_train_from_an_import(byte_gpt2, tmp_path, capsys):
    """Fine-tuning: `jaxformer train` in the imported run starts from step 0 with the
    imported weights (at lr 0 they stay exactly those) and draws data from the start."""
    from jaxformer import cli
    from jaxformer.config import load_config

    hf_model, hf_dir = byte_gpt2
    tool = _tool()
    run = [*TOOL_ARGS, f"--config.train.run_dir={tmp_path / 'run'}", "--config.optimizer.lr=0.0"]
    assert tool.main(["import", "--hf_dir", str(hf_dir), *run, "--derive"]) == 0
    run += capsys.readouterr().out.split()
    assert tool.main(["import", "--hf_dir", str(hf_dir), *run]) == 0
    assert cli.main(["train", *run, "--config.train.steps=1"]) == 0
    cfg = load_config(run[0].split("=", 1)[1], run[1:])
    model, step, _ = restore_params(cfg)
    assert step == 1
    original = hf_model.state_dict()
    for name, value in hf.hf_state_dict(model).items():
        np.testing.assert_array_equal(value, original[name].numpy(), err_msg=name)


def test_tool_errors(gpt2_dir, tmp_path, capsys):
    tool = _tool()
    run = [*TOOL_ARGS, f"--config.train.run_dir={tmp_path / 'run'}"]
    assert tool.main(["import", "--hf_dir", str(tmp_path / "none"), *run]) == 2
    assert "is not a directory" in capsys.readouterr().err
    assert tool.main(["export", *run, "--out", str(tmp_path / "out")]) == 2
    assert "no checkpoint in" in capsys.readouterr().err
