"""Expert parallelism on simulated CPU devices: experts split over the ``expert`` mesh
axis, tokens exchanged by all-to-all, results equal to one device's."""

import functools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from jaxformer import parallel
from jaxformer.config import ConfigError
from jaxformer.model import ModelConfig
from jaxformer.model.moe import MoEMLP
from jaxformer.parallel import DEFAULT_RULES
from jaxformer.tasks import model_config
from jaxformer.train.optim import make_optimizer
from jaxformer.train.step import _loss_and_grads, abstract_state, build_model
from jaxformer.train.validation import validate

RTOL = 1e-5
# Experts on 4 devices alone, and composed with data parallelism on 8.
MESHES = {"expert4": {"expert": 4}, "data2_expert4": {"data": 2, "expert": 4}}
# Capacity E / k gives every expert room for its whole group: no token is dropped.
NO_DROP = {"model.moe_capacity_factor": 4.0}
DROP = {"model.moe_capacity_factor": 1.0}
MODEL = {
    "model.moe_experts": 8,  # 2 experts per device of expert=4
    "model.moe_top_k": 2,
    "model.num_layers": 1,
    "train.global_batch": 8,
    "model.use_bias": True,
}


def _mesh(shape: dict[str, int]) -> jax.sharding.Mesh:
    return parallel.make_mesh(shape, jax.devices()[: math.prod(shape.values())])


def _collectives(hlo_text: str) -> dict[str, int]:
    """How many of each collective the optimized HLO holds (a loop body counts once)."""
    kinds = ("all-to-all", "all-gather", "reduce-scatter", "collective-permute")
    found = re.findall(r"\s(" + "|".join(kinds) + r")(?:-start)?\(", hlo_text)
    return {kind: found.count(kind) for kind in kinds}


def _rel(got: np.ndarray, want: np.ndarray) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))


def _flat(tree: nnx.State) -> dict[str, np.ndarray]:
    return {
        "/".join(map(str, path)): np.asarray(var.get_value())
        for path, var in nnx.to_flat_state(tree)
    }


# -- the MoE layer ------------------------------------------------------------------------


def _randomised_layer(cfg: ModelConfig) -> MoEMLP:
    """An MoEMLP with O(1) random parameters, so routing is far from uniform."""
    layer = MoEMLP(cfg, nnx.Rngs(params=0))
    rng = np.random.default_rng(100)
    for _, var in nnx.to_flat_state(nnx.state(layer, nnx.Param)):
        var.set_value(jnp.asarray(rng.normal(size=var.get_value().shape) * 0.5, jnp.float32))
    return layer


@pytest.fixture(scope="module")
def layer_run(make_config):
    """layer_run(drop, mesh_name) -> results of :func:`_layer_run`, computed once each."""
    return functools.cache(functools.partial(_layer_run, make_config))


def _layer_run(make_config, drop: bool, mesh_name: str | None) -> dict:
    """Output and aux values of one randomised MoE layer on 8 groups of 16 tokens, on one
    device (``mesh_name`` None) or a mesh, with the compiled program's collectives: the
    forward pass alone where capacity drops tokens, else with the gradients (parameters
    and input) of a loss of the output, in one program."""
    cfg = model_config(make_config({**MODEL, **(DROP if drop else NO_DROP)}).model)
    graphdef, params = nnx.split(_randomised_layer(cfg))
    x_GxSxD = jnp.asarray(np.random.default_rng(1).normal(size=(8, 16, cfg.d_model)), jnp.float32)

    def forward(params: nnx.State, x_GxSxD: jax.Array) -> tuple[jax.Array, dict]:
        return nnx.merge(graphdef, params)(x_GxSxD)

    def loss(params: nnx.State, x_GxSxD: jax.Array) -> tuple[jax.Array, tuple]:
        y_GxSxD, aux = forward(params, x_GxSxD)
        return jnp.sum(jnp.sin(y_GxSxD)) + aux["aux_loss"] + aux["z_loss"], (y_GxSxD, aux)

    run = forward if drop else jax.grad(loss, argnums=(0, 1), has_aux=True)
    if mesh_name is None:
        fn = jax.jit(run)
    else:
        mesh = _mesh(MESHES[mesh_name])
        shardings = (parallel.tree_shardings(params, mesh), parallel.batch_sharding(mesh, ndim=3))
        params = jax.device_put(params, shardings[0])
        x_GxSxD = jax.device_put(x_GxSxD, shardings[1])

        def on_mesh(*args):
            with parallel.activate(mesh):
                return run(*args)

        fn = jax.jit(on_mesh, in_shardings=shardings)
    # Compiled once, ahead of time: the same executable runs and shows its collectives.
    exe = fn.lower(params, x_GxSxD).compile()
    out = exe(params, x_GxSxD)
    specs = {k: getattr(v.sharding, "spec", None) for k, v in _flat_arrays(params).items()}
    result = {"specs": specs, "hlo": _collectives(exe.as_text())}
    if not drop:
        (dparams, dx), out = out
        result["grads"] = {**_flat(dparams), "x": np.asarray(dx)}
    y, aux = out
    return result | {"y": np.asarray(y), "aux": {k: float(v) for k, v in aux.items()}}


def _flat_arrays(tree: nnx.State) -> dict[str, jax.Array]:
    return {"/".join(map(str, p)): v.get_value() for p, v in nnx.to_flat_state(tree)}


@pytest.mark.parametrize("mesh_name", list(MESHES))
def test_moe_layer_matches_one_device_when_nothing_is_dropped(layer_run, mesh_name):
    got, want = layer_run(False, mesh_name), layer_run(False, None)
    assert want["aux"]["dropped_fraction"] == 0.0
    assert got["aux"]["dropped_fraction"] == 0.0
    assert _rel(got["y"], want["y"]) < RTOL
    for key in ("aux_loss", "z_loss"):
        assert got["aux"][key] == pytest.approx(want["aux"][key], rel=RTOL)
    assert got["grads"].keys() == want["grads"].keys()
    for key in want["grads"]:
        assert _rel(got["grads"][key], want["grads"][key]) < RTOL, key


@pytest.mark.parametrize("mesh_name", list(MESHES))
def test_moe_layer_drops_the_same_tokens(layer_run, mesh_name):
    got, want = layer_run(True, mesh_name), layer_run(True, None)
    assert want["aux"]["dropped_fraction"] > 0.05
    assert got["aux"]["dropped_fraction"] == pytest.approx(want["aux"]["dropped_fraction"])
    # Capacity is decided per group, wherever the group is: the same tokens are dropped.
    assert _rel(got["y"], want["y"]) < RTOL


@pytest.mark.parametrize("mesh_name", list(MESHES))
def test_tokens_move_by_all_to_all(layer_run, mesh_name):
    forward, backward = layer_run(True, mesh_name)["hlo"], layer_run(False, mesh_name)["hlo"]
    # Forward: tokens to their experts' devices and back. Backward: the two transposes.
    assert forward["all-to-all"] == 2, forward
    assert backward["all-to-all"] == 4, backward
    # No device gathers every group's tokens (or routing), and nothing else moves them.
    for hlo in (forward, backward):
        assert hlo["all-gather"] == hlo["collective-permute"] == hlo["reduce-scatter"] == 0
    specs = layer_run(False, mesh_name)["specs"]
    assert specs["up/kernel"] == P("expert", None, None)
    assert specs["down/kernel"] == P("expert", None, None)
    assert specs["down/bias"] == P("expert", None)
    assert specs["router/kernel"] == P(None, None)  # every device routes its own tokens


# -- the whole model ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_run(make_config, make_batch):
    """model_run(drop, mesh_name) -> results of :func:`_model_run`, computed once each."""
    return functools.cache(functools.partial(_model_run, make_config, make_batch))


def _model_run(make_config, make_batch, drop: bool, mesh_name: str | None) -> dict:
    """Loss, statistics and gradients of the train step's loss (cross-entropy plus the
    MoE terms) for a 2-layer MoE decoder, with the compiled program's collectives."""
    shape = MESHES[mesh_name] if mesh_name else {"data": 1}
    mesh_keys = {f"mesh.{axis}": size for axis, size in shape.items()}
    cfg = make_config({**MODEL, **(DROP if drop else NO_DROP), **mesh_keys})
    mesh = _mesh(shape)
    assert validate(cfg, mesh.size) == dict(mesh.shape)
    tx = make_optimizer(cfg.optimizer, cfg.train.steps, cfg.model.d_model)
    graphdef, _, shardings = abstract_state(cfg, tx, mesh, DEFAULT_RULES)
    # The same initial parameters everywhere (capacity does not change them), laid out
    # for this mesh; built once, since compiling the initialisation is slow on CPU.
    params = jax.device_put(_initial_params(make_config), shardings.params)
    batch = make_batch(8, 16, 128, seed=3)
    batch["weights"][[1, 6], 9:] = 0.0  # uneven token counts across devices

    def loss_and_grads(params, batch):
        with parallel.activate(mesh, DEFAULT_RULES):
            (loss, stats), grads = _loss_and_grads(graphdef, params, batch, None, cfg)
        return loss / stats["weight"], stats, grads

    data = parallel.batch_sharding(mesh)
    exe = jax.jit(loss_and_grads, in_shardings=(shardings.params, data)).lower(params, batch)
    exe = exe.compile()
    loss, stats, grads = exe(params, batch)
    return {
        "loss": float(loss),
        "dropped": float(stats["moe_dropped_fraction"] / stats["weight"]),
        "grads": _flat(grads),
        "hlo": _collectives(exe.as_text()),
    }


@functools.cache
def _initial_params(make_config) -> nnx.State:
    return jax.jit(lambda: nnx.state(build_model(make_config(MODEL), seed=0)))()


@pytest.mark.parametrize(
    ("mesh_name", "drop"), [("expert4", False), ("data2_expert4", True)], ids=["4", "8_drop"]
)
def test_model_loss_and_gradients_match_one_device(model_run, mesh_name, drop):
    """Experts alone over 4 devices with nothing dropped; with data parallelism over 8,
    capacity dropping tokens: the same fraction is dropped, and loss (the MoE terms
    included) and gradients agree."""
    got, want = model_run(drop, mesh_name), model_run(drop, None)
    assert (want["dropped"] > 0.05) if drop else (want["dropped"] == 0.0)
    assert got["dropped"] == pytest.approx(want["dropped"], rel=RTOL, abs=1e-7)
    assert got["loss"] == pytest.approx(want["loss"], rel=RTOL)
    assert got["grads"].keys() == want["grads"].keys()
    worst = max(_rel(got["grads"][k], want["grads"][k]) for k in want["grads"])
    assert worst < RTOL, worst
    # The scanned layer body, compiled once: two all-to-alls forward, two backward; no
    # device gathers the batch's tokens.
    assert got["hlo"]["all-to-all"] == 4, got["hlo"]
    assert got["hlo"]["all-gather"] == 0, got["hlo"]


# -- config -------------------------------------------------------------------------------


def test_expert_axis_is_a_batch_axis(make_config):
    assert parallel.batch_axes() == ("data", "fsdp", "expert")
    assert parallel.batch_shards({"data": 2, "fsdp": 1, "expert": 4, "tensor": 1}) == 8
    device_mesh = _mesh({"data": 2, "expert": 4})
    assert parallel.batch_sharding(device_mesh).spec == P(("data", "expert"), None)
    mesh = {"mesh.data": 2, "mesh.expert": 4}
    assert validate(make_config({**MODEL, **mesh}), num_devices=8)["expert"] == 4
    # 8 rows over data x fsdp x expert = 8 devices, but not in 2 microbatches.
    with pytest.raises(ConfigError, match=r"data x fsdp x expert = 8 devices"):
        validate(make_config({**MODEL, **mesh, "train.microbatches": 2}), 8)
    with pytest.raises(ConfigError, match=r"'mesh.expert' \(4\) must divide model.moe_experts"):
        validate(make_config({**MODEL, **mesh, "model.moe_experts": 6}), 8)
