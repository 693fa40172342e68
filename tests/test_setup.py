"""The one setup path (jaxformer/train/setup.py) and the attention backend it selects:
every command validates the same way, and eval / generate read parameters only."""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import TINY_CLI
from flax import nnx

from jaxformer.attention import registry
from jaxformer.attention.dot_product import DotProduct, FusedCausal
from jaxformer.attention.reference import EINSUM
from jaxformer.config import ConfigError, load_config
from jaxformer.model import ModelConfig
from jaxformer.tasks import build_model
from jaxformer.train import loop, setup

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs/default.py")


def _tiny(run_dir: Path, *extra: str):
    return load_config(
        CONFIG,
        [*TINY_CLI, f"--config.train.run_dir={run_dir}", "--config.train.steps=2",
         "--config.train.eval_every=0", "--config.train.tensorboard=False", *extra],
    )  # fmt: skip


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("setup") / "run"
    loop.train(_tiny(run_dir))
    return run_dir


def test_restore_params_reads_the_parameters_alone(trained: Path) -> None:
    """Restored with another optimizer (whose state has another structure, which a whole
    train-state restore refuses), the parameters are those training saved."""
    saved = nnx.state(nnx.merge(*_saved_model(trained)), nnx.Param)
    model, step, _ = setup.restore_params(_tiny(trained, "--config.optimizer.name=adafactor"))
    assert step == 2
    got = nnx.state(model, nnx.Param)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(saved), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(Exception):  # noqa: B017 - Orbax's own structure error
        loop.setup(_tiny(trained, "--config.optimizer.name=adafactor"))


def _saved_model(run_dir: Path) -> tuple:
    run = loop.setup(_tiny(run_dir))
    try:
        return run.graphdef, run.state.params
    finally:
        run.checkpointer.close()


def test_eval_command_restores_parameters_only(trained: Path) -> None:
    step, metrics = loop.evaluate_checkpoint(
        _tiny(trained, "--config.optimizer.name=adafactor"), max_batches=1
    )
    assert step == 2 and 0 < metrics["loss"] < 10


@pytest.mark.parametrize("entry", ["build", "restore_params", "plan"])
def test_every_entry_point_checks_the_dcn_sizes(entry: str, tmp_path: Path) -> None:
    """Every command checks the DCN sizes against the processes the same way, through
    ``setup.make_run_mesh``, which also builds each command's mesh with them."""
    from jaxformer.step_plan import plan

    cfg = _tiny(tmp_path, "--config.mesh.dcn_data=2", "--config.mesh.data=4")
    call = {"build": setup.build, "restore_params": setup.restore_params, "plan": plan}[entry]
    with pytest.raises(ConfigError, match="mesh.dcn_data"):
        call(cfg)


def test_the_backend_is_selected_once_outside_the_model() -> None:
    cfg = load_config(CONFIG, [*TINY_CLI])
    assert registry.select(cfg.model, sequence_parallel=False, platform="cpu") is EINSUM
    gpu_bf16 = load_config(CONFIG, [*TINY_CLI, "--config.model.dtype=bfloat16"])
    assert isinstance(registry.select(gpu_bf16.model, platform="gpu").local, FusedCausal)
    dot = load_config(CONFIG, [*TINY_CLI, "--config.model.attention_impl=dot_product"])
    model = build_model(dot.model, 0, sequence_parallel=True)
    assert isinstance(model.cfg.attention, registry.SequenceParallel)
    assert isinstance(model.cfg.attention.local, DotProduct)
    assert isinstance(build_model(dot.model, 0, sequence_parallel=False).cfg.attention, DotProduct)


def test_a_model_config_never_drops_a_named_backend() -> None:
    cfg = load_config(CONFIG, [*TINY_CLI, "--config.model.attention_impl=dot_product"])
    with pytest.raises(ValueError, match="attention_impl='dot_product' needs its backend"):
        ModelConfig.from_config(cfg.model)
    assert ModelConfig.from_config(load_config(CONFIG).model).attention is EINSUM
