"""Model-size presets under configs/: exact parameter counts, valid meshes, and the
tools/count_params.py command. Shapes only (``jax.eval_shape``): nothing is allocated.

The reference counts are those of the original implementations as Hugging Face builds
them (GPT2LMHeadModel, LlamaForCausalLM; tests/test_hf.py checks that on the meta
device). jaxformer matches them exactly, not just within the 0.5% the papers' rounding
would allow: GPT-2's count includes the learned positions (1024 x d_model) and counts the
tied output projection once, and the causal-mask ``attn.bias`` buffer that older
transformers versions store in GPT-2 checkpoints is a buffer, not a parameter, in both.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from typing import Any

import jax
import pytest
from flax import nnx

from jaxformer import flops
from jaxformer.config import ConfigError, load_config
from jaxformer.model import DecoderLM, count_params
from jaxformer.tasks import model_config
from jaxformer.train.validation import validate

CONFIGS = sorted(p.name for p in (Path(__file__).resolve().parents[1] / "configs").glob("*.py"))

# preset -> (exact reference count, embedding parameters: token table + learned positions)
PRESETS = {
    "gpt2_124m": (124_439_808, (50257 + 1024) * 768),
    "gpt2_355m": (354_823_168, (50257 + 1024) * 1024),
    "gpt2_774m": (774_030_080, (50257 + 1024) * 1280),
    "gpt2_1558m": (1_557_611_200, (50257 + 1024) * 1600),
    "llama2_7b": (6_738_415_616, 32000 * 4096),
    "llama_1b": (1_100_048_384, 32000 * 2048),  # TinyLlama-1.1B
}


def _load(repo_root: Path, name: str, *overrides: str) -> Any:
    return load_config(str(repo_root / "configs" / f"{name}.py"), list(overrides))


def _abstract_count(cfg: Any) -> int:
    state = jax.eval_shape(
        lambda: nnx.state(DecoderLM(model_config(cfg.model), nnx.Rngs(0)), nnx.Param)
    )
    return count_params(state)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_parameter_count(repo_root, name):
    reference, embedding = PRESETS[name]
    cfg = _load(repo_root, name)
    count = _abstract_count(cfg)
    assert abs(count - reference) / reference < 0.005  # the requirement
    assert count == reference  # what jaxformer achieves
    analytic = flops.count(cfg.model, cfg.data.seq_len)
    assert (analytic.params, analytic.embedding_params) == (reference, embedding)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_validates(repo_root, name):
    """Each preset passes validation on the test suite's 8 devices and on a larger mesh."""
    cfg = _load(repo_root, name)
    assert validate(cfg, 8)
    mesh = validate(cfg, 64)
    if cfg.mesh.fsdp == -1:
        assert mesh["fsdp"] == 64
    assert cfg.data.seq_len == cfg.model.max_len


def test_gpt2_presets_are_gpt2(repo_root):
    sizes = {"124m": (12, 768, 12), "355m": (24, 1024, 16), "774m": (36, 1280, 20)}
    sizes["1558m"] = (48, 1600, 25)
    for tag, (layers, d, heads) in sizes.items():
        m = _load(repo_root, f"gpt2_{tag}").model
        assert (m.num_layers, m.d_model, m.num_heads, m.d_ff) == (layers, d, heads, 4 * d)
        assert (m.vocab_size, m.max_len, m.position, m.norm, m.norm_eps) == (
            50257, 1024, "learned", "layernorm", 1e-5,
        )  # fmt: skip
        assert (m.mlp, m.use_bias, m.tie_embeddings, m.norm_position) == (
            "gelu", True, True, "pre",
        )  # fmt: skip


def test_llama2_7b_matches_the_paper(repo_root):
    cfg = _load(repo_root, "llama2_7b")
    m, o = cfg.model, cfg.optimizer
    assert (m.vocab_size, m.d_model, m.num_layers, m.num_heads, m.d_ff) == (
        32000, 4096, 32, 32, 11008,
    )  # fmt: skip
    assert (m.position, m.rope_base, m.norm, m.norm_eps, m.mlp) == (
        "rope", 10000.0, "rmsnorm", 1e-5, "swiglu",
    )  # fmt: skip
    assert (m.max_len, m.tie_embeddings, m.use_bias) == (4096, False, False)
    assert (o.name, o.b1, o.b2, o.eps, o.weight_decay, o.clip_norm) == (
        "adamw", 0.9, 0.95, 1e-5, 0.1, 1.0,
    )  # fmt: skip
    assert (o.schedule, o.warmup_steps, o.min_lr_ratio) == ("cosine", 2000, 0.1)
    assert cfg.mesh.fsdp == -1


def test_presets_accept_overrides(repo_root):
    cfg = _load(repo_root, "llama2_7b", "--config.model.num_kv_heads=8")
    # GQA as LLaMA-2 70B: K and V shrink from 32 to 8 heads in each of the 32 layers.
    assert _abstract_count(cfg) == 6_738_415_616 - 32 * 2 * 4096 * (4096 - 1024)
    with pytest.raises(ConfigError, match="model.num_kv_heads"):
        validate(_load(repo_root, "llama2_7b", "--config.model.num_kv_heads=5"), 8)


def _count_params_tool(repo_root: Path) -> Any:
    spec = importlib.util.spec_from_file_location(
        "count_params", repo_root / "tools/count_params.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_count_params_command(repo_root):
    """The command as a user runs it, in a fresh process."""
    result = subprocess.run(
        [sys.executable, "tools/count_params.py", "--config=configs/gpt2_124m.py"],
        cwd=repo_root, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "124,439,808" in result.stdout
    assert "85,056,000" in result.stdout  # non-embedding
    assert "counts agree: yes" in result.stdout
    assert "training FLOPs per token at seq_len 1024" in result.stdout


@pytest.mark.parametrize("path", CONFIGS)
def test_count_params_agrees_with_flops_on_every_config(repo_root, path):
    """The shapes-based count and the analytic one that MFU uses agree on every config."""
    tool = _count_params_tool(repo_root)
    text, agree = tool.report(load_config(str(repo_root / "configs" / path)))
    assert agree, text


def test_count_params_overrides_and_errors(repo_root, capsys):
    tool = _count_params_tool(repo_root)
    preset = f"--config={repo_root / 'configs' / 'llama2_7b.py'}"
    assert tool.main([preset, "--config.model.num_layers=2", "--seq-len=128"]) == 0
    out = capsys.readouterr().out
    small = _load(repo_root, "llama2_7b", "--config.model.num_layers=2")
    assert f"{flops.count(small.model, 128).params:,}" in out and "seq_len 128" in out
    assert tool.main([preset, "--config.model.dmodel=1"]) == 2
    assert "did you mean 'model.d_model'" in capsys.readouterr().err
