"""Pipeline parallelism on the ``stage`` axis: GPipe and 1F1B give the unpipelined model's
loss and gradients (float32), alone and with ``data``, and the same train step."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxformer import parallel
from jaxformer.config import ConfigError
from jaxformer.losses import cross_entropy
from jaxformer.parallel import pipeline_parallel
from jaxformer.train.optim import make_optimizer
from jaxformer.train.step import _microbatched, build_model, init_state, jit_steps, stage_graphdef
from jaxformer.train.validation import validate

RTOL = 1e-5
ROWS, LENGTH, VOCAB = 8, 16, 128
OVERRIDES = {"model.num_layers": 4, "train.global_batch": ROWS, "model.vocab_size": VOCAB}
# The XLA CPU backend's cheapest code generation: these programs run once, and compiling
# them dominates the file's time (the numbers do not depend on it).
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def _compiled(fn, *args):
    return jax.jit(fn).lower(*args).compile(compiler_options=FAST_COMPILE)(*args)


def _batch(make_batch):
    batch = make_batch(ROWS, LENGTH, VOCAB, seed=1)
    batch["weights"][[0, 3], 9:] = 0.0  # uneven token counts across microbatches
    return {k: jnp.asarray(v) for k, v in batch.items()}


def _loss_fn(logits, batch):
    # As the train step's pipeline branch does: no gather inside the stage shard_map.
    return cross_entropy(logits, batch["targets"], batch["weights"], select_by_mask=True)


def _max_rel(a, b):
    """Largest |a - b| over the largest |b|, across every leaf of two params-like states."""
    flat_a, flat_b = nnx.to_flat_state(a), nnx.to_flat_state(b)
    worst = 0.0
    for (path, x), (_, y) in zip(flat_a, flat_b, strict=True):
        x, y = np.asarray(x.get_value()), np.asarray(y.get_value())
        assert x.shape == y.shape, path
        worst = max(worst, float(np.abs(x - y).max() / max(np.abs(y).max(), 1e-30)))
    return worst


@pytest.fixture(scope="module")
def reference(make_config, make_batch):
    """The unpipelined model's summed loss and gradients on the whole batch."""
    cfg = make_config(OVERRIDES)
    graphdef, params = nnx.split(build_model(cfg, 0))
    batch = _batch(make_batch)

    def loss(p):
        model = nnx.merge(graphdef, p)
        logits = model(batch["inputs"], batch["segment_ids"], batch["positions"])
        return _loss_fn(logits, batch)

    (loss_sum, stats), grads = _compiled(jax.value_and_grad(loss, has_aux=True), params)
    return graphdef, params, batch, loss_sum, stats, grads


@pytest.mark.parametrize(
    "stages,schedule,microbatches,axes",
    [
        (2, "gpipe", 4, {}),
        (2, "gpipe", 8, {}),
        (2, "1f1b", 4, {}),
        (2, "1f1b", 8, {}),
        (4, "gpipe", 4, {}),
        (4, "gpipe", 8, {}),
        (4, "1f1b", 4, {}),
        (4, "1f1b", 8, {}),
        (2, "gpipe", 4, {"data": 2}),
        (2, "1f1b", 4, {"data": 2}),
        # The other axes inside each stage, left to the partitioner: FSDP and tensor.
        (2, "gpipe", 4, {"fsdp": 2}),
        (2, "1f1b", 4, {"fsdp": 2}),
        (2, "gpipe", 4, {"tensor": 2}),
        (2, "1f1b", 4, {"tensor": 2}),
        (2, "gpipe", 4, {"fsdp": 2, "tensor": 2}),
        (2, "1f1b", 4, {"fsdp": 2, "tensor": 2}),
    ],
)
def test_pipeline_matches_unpipelined(make_config, reference, stages, schedule, microbatches, axes):
    graphdef, params, batch, ref_loss, ref_stats, ref_grads = reference
    cfg = make_config(
        {
            **OVERRIDES,
            "mesh.stage": stages,
            **{f"mesh.{axis}": size for axis, size in axes.items()},
            "train.microbatches": microbatches,
            "train.pipeline_schedule": schedule,
        }
    )
    shape = validate(cfg, stages * math.prod(axes.values()))
    mesh = parallel.make_mesh(shape, jax.devices()[: math.prod(shape.values())])
    params = jax.device_put(params, parallel.tree_shardings(params, mesh))
    kernel = params["blocks"]["attn"]["q"]["kernel"].get_value()
    assert kernel.sharding.spec[0] == "stage"  # each stage holds its own layers

    def run(p, b):
        with parallel.activate(mesh):
            mbs = _microbatched(b, microbatches)
            stage = stage_graphdef(cfg, stages)  # one stage's layers
            return pipeline_parallel.loss_and_grads(stage, p, mbs, None, cfg, _loss_fn)

    (loss_sum, stats), grads = _compiled(run, params, batch)
    assert float(stats["weight"]) == float(ref_stats["weight"])
    np.testing.assert_allclose(float(loss_sum), float(ref_loss), rtol=RTOL)
    assert _max_rel(grads, ref_grads) < RTOL


def test_train_step_matches_unpipelined(make_config, make_batch):
    """A full optimizer step through ``train.step`` with stage=2 (1F1B) equals the
    unpipelined step with the same microbatches."""
    batch = _batch(make_batch)
    results = []
    for stages, schedule in ((1, "gpipe"), (2, "1f1b")):
        cfg = make_config(
            {
                **OVERRIDES,
                "mesh.stage": stages,
                "train.microbatches": 2,
                "train.pipeline_schedule": schedule,
                "optimizer.eps": 1e-5,  # see test_sharding: keeps Adam's update comparable
            }
        )
        mesh = parallel.make_mesh(validate(cfg, stages), jax.devices()[:stages])
        rules = parallel.DEFAULT_RULES
        tx = make_optimizer(cfg.optimizer, cfg.train.steps, cfg.model.d_model)
        graphdef, state, shardings = init_state(cfg, tx, mesh, rules)
        train, _ = jit_steps(cfg, graphdef, tx, mesh, rules, shardings)
        state, metrics = train.lower(state, batch).compile(FAST_COMPILE)(state, batch)
        results.append((state.params, {k: float(v) for k, v in metrics.items()}))
    (ref_params, ref_metrics), (params, metrics) = results
    for name in ("loss", "grad_norm", "tokens"):
        np.testing.assert_allclose(metrics[name], ref_metrics[name], rtol=RTOL, err_msg=name)
    assert _max_rel(params, ref_params) < RTOL


@pytest.mark.parametrize(
    "overrides,key",
    [
        ({"model.num_layers": 3}, "model.num_layers"),
        ({"model.scan_layers": False}, "model.scan_layers"),
        ({"model.moe_experts": 4}, "model.moe_experts"),
        ({"train.pipeline_schedule": "1f1b", "train.microbatches": 1}, "train.microbatches"),
    ],
)
def test_pipeline_config_errors(make_config, overrides, key):
    cfg = make_config({**OVERRIDES, "mesh.stage": 2, **overrides})
    with pytest.raises(ConfigError, match=key):
        validate(cfg, 2)


def test_pipeline_rejects_other_families(make_config):
    cfg = make_config({"mesh.stage": 2, "model.family": "t5"})
    with pytest.raises(ConfigError, match="model.family"):
        validate(cfg, 2)


@pytest.mark.parametrize("stages,microbatches,expected", [(2, 4, 0.2), (4, 8, 3 / 11)])
def test_bubble_fraction(stages, microbatches, expected):
    assert pipeline_parallel.bubble_fraction(stages, microbatches) == pytest.approx(expected)
