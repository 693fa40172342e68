"""Meshes and layouts on 8 simulated CPU devices: every layout trains like one device."""

import functools
import math

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from jaxformer import parallel
from jaxformer.losses import cross_entropy
from jaxformer.parallel import DEFAULT_RULES, MESH_AXES
from jaxformer.train.optim import make_optimizer
from jaxformer.train.step import build_model, init_state, jit_steps

# Every sharded dimension divides by 8: heads, KV heads, d_ff, d_model and the vocabulary.
OVERRIDES = {
    "model.vocab_size": 128,
    "model.d_model": 64,
    "model.num_heads": 8,
    "model.num_kv_heads": 8,
    "model.d_ff": 128,
    "model.max_len": 16,
    "data.seq_len": 16,
    "train.global_batch": 16,
    "train.steps": 10,
    "optimizer.lr": 1e-2,
    # Adam divides each gradient element by its own magnitude (+ eps), so elements whose
    # gradient is near eps turn float32 rounding in sharded reductions into update noise
    # (measured 4e-5 relative after 3 steps with eps 1e-8). eps 1e-5 bounds that
    # amplification so parameters can be compared at the same 1e-5 as gradients.
    "optimizer.eps": 1e-5,
}
MESHES = {
    "single": (1, 1, 1),
    "data8": (8, 1, 1),
    "fsdp8": (1, 8, 1),
    "tensor8": (1, 1, 8),
    "2x2x2": (2, 2, 2),
}
STEPS = 3
RTOL = 1e-5


def _mesh(shape):
    """A mesh from (data, fsdp, tensor) sizes; the other axes have size 1."""
    return parallel.make_mesh(
        dict(zip(("data", "fsdp", "tensor"), shape, strict=True)), jax.devices()[: math.prod(shape)]
    )


def _flat(tree):
    """{'blocks/attn/q/kernel': numpy array} for a params-like state."""
    return {
        "/".join(map(str, path)): np.asarray(var.get_value())
        for path, var in nnx.to_flat_state(tree)
    }


def _batches(make_batch):
    out = []
    for seed in range(STEPS):
        batch = make_batch(16, 16, 128, seed=seed)
        # Uneven token counts: rows 0, 4, 8 all land in microbatch 0 of 4.
        batch["weights"][[0, 4, 8], 5:] = 0.0
        out.append(batch)
    return out


def _run(cfg, shape, batches):
    mesh = _mesh(shape)
    rules = DEFAULT_RULES
    tx = make_optimizer(cfg.optimizer, cfg.train.steps, cfg.model.d_model)
    graphdef, state, shardings = init_state(cfg, tx, mesh, rules)
    result = {
        "specs": {
            "/".join(map(str, p)): v.get_value().sharding.spec
            for p, v in nnx.to_flat_state(state.params)
        },
        "mu_specs": {
            "/".join(map(str, p)): v.get_value().sharding.spec
            for p, v in nnx.to_flat_state(jax.tree.leaves(state.opt_state, is_leaf=_is_mu)[0].mu)
        },
    }
    data = parallel.batch_sharding(mesh, rules)

    def mean_loss_and_grads(params, batch):
        def loss_fn(p):
            model = nnx.merge(graphdef, p)
            logits = model(batch["inputs"], batch["segment_ids"], batch["positions"])
            loss, stats = cross_entropy(logits, batch["targets"], batch["weights"])
            return loss / stats["weight"]

        with parallel.activate(mesh, rules):
            return jax.value_and_grad(loss_fn)(params)

    if cfg.train.microbatches == 1:
        grad_fn = jax.jit(
            mean_loss_and_grads,
            in_shardings=(shardings.params, data),
            out_shardings=(None, shardings.params),
        )
        loss, grads = grad_fn(state.params, batches[0])
        result["grad_loss"] = float(loss)
        result["grads"] = _flat(grads)
        result["grad_specs"] = {
            "/".join(map(str, p)): v.get_value().sharding.spec for p, v in nnx.to_flat_state(grads)
        }

    train, _ = jit_steps(cfg, graphdef, tx, mesh, rules, shardings)
    metrics = []
    for batch in batches:
        state, m = train(state, batch)
        metrics.append({k: float(v) for k, v in m.items()})
    result["losses"] = [m["loss"] for m in metrics]
    result["grad_norms"] = [m["grad_norm"] for m in metrics]
    result["params"] = _flat(state.params)
    result["step"] = int(state.step)
    return result


def _is_mu(x):
    return hasattr(x, "mu") and hasattr(x, "nu")


@pytest.fixture(scope="module")
def run(make_config, make_batch):
    """run(mesh_name, microbatches=1) -> results of 3 train steps, computed once each."""
    batches = _batches(make_batch)

    @functools.cache
    def cached(name, microbatches=1):
        cfg = make_config({**OVERRIDES, "train.microbatches": microbatches})
        return _run(cfg, MESHES[name], batches)

    return cached


def _assert_trees_close(got, want, rtol=RTOL, what=""):
    assert got.keys() == want.keys()
    for key in want:
        a, b = got[key].astype(np.float64), want[key].astype(np.float64)
        scale = max(np.linalg.norm(b), 1e-30)
        rel = np.linalg.norm(a - b) / scale
        assert rel < rtol, f"{what} {key}: relative difference {rel:.2e}"


def test_eight_simulated_devices():
    # Set by tests/conftest.py through XLA_FLAGS before jax starts; if this fails, something
    # imported jax before conftest ran.
    assert jax.device_count() == 8, jax.devices()
    assert jax.default_backend() == "cpu"


# -- equivalence with one device ----------------------------------------------------------


@pytest.mark.parametrize("name", ["data8", "fsdp8", "tensor8", "2x2x2"])
def test_mesh_gives_same_gradients_as_one_device(run, name):
    got, want = run(name), run("single")
    assert got["grad_loss"] == pytest.approx(want["grad_loss"], rel=RTOL)
    _assert_trees_close(got["grads"], want["grads"], what=f"{name} gradient")
    # The gradients come out laid out like the parameters.
    assert got["grad_specs"] == got["specs"]


@pytest.mark.parametrize("name", ["data8", "fsdp8", "tensor8", "2x2x2"])
def test_mesh_trains_like_one_device(run, name):
    got, want = run(name), run("single")
    assert got["step"] == STEPS
    np.testing.assert_allclose(got["losses"], want["losses"], rtol=RTOL)
    np.testing.assert_allclose(got["grad_norms"], want["grad_norms"], rtol=RTOL)
    _assert_trees_close(got["params"], want["params"], what=f"{name} params after 3 steps")
    # The first step's loss is the loss of the initial parameters on the first batch.
    assert got["losses"][0] == pytest.approx(want["grad_loss"], rel=RTOL)


def test_training_changes_parameters_and_loss(run):
    single = run("single")
    assert len(set(single["losses"])) == STEPS
    assert all(np.isfinite(single["losses"]))


@pytest.mark.parametrize("name", ["single", "2x2x2"])
def test_gradient_accumulation_matches_full_batch(run, name):
    full, accumulated = run(name, 1), run(name, 4)
    np.testing.assert_allclose(accumulated["losses"], full["losses"], rtol=RTOL)
    np.testing.assert_allclose(accumulated["grad_norms"], full["grad_norms"], rtol=RTOL)
    _assert_trees_close(accumulated["params"], full["params"], what=f"{name} microbatches=4")


# -- layouts ------------------------------------------------------------------------------


def _has(spec, axis):
    return any(axis == entry or (isinstance(entry, tuple) and axis in entry) for entry in spec)


def test_tensor_parallel_shards_mlp_and_attention_kernels(run):
    specs = run("tensor8")["specs"]
    kernels = [k for k in specs if k.endswith("kernel")]
    assert {k.split("/")[-2] for k in kernels} == {"q", "k", "v", "o", "up", "gate", "down"}
    for key in kernels:
        assert _has(specs[key], "tensor"), (key, specs[key])
    assert specs["blocks/mlp/up/kernel"] == P(None, None, "tensor")
    assert specs["blocks/mlp/down/kernel"] == P(None, "tensor", None)
    assert specs["blocks/attn/q/kernel"] == P(None, None, "tensor", None)
    assert specs["blocks/attn/o/kernel"] == P(None, "tensor", None, None)
    assert specs["embed"] == P("tensor", None)
    assert specs["blocks/attn_norm/scale"] == P(None, None)


def test_fsdp_shards_embed_dimensions(run):
    specs = run("fsdp8")["specs"]
    assert specs["embed"] == P(None, "fsdp")
    assert specs["blocks/attn/q/kernel"] == P(None, "fsdp", None, None)
    assert specs["blocks/attn/o/kernel"] == P(None, None, None, "fsdp")
    assert specs["blocks/mlp/down/kernel"] == P(None, None, "fsdp")
    for key, spec in specs.items():
        if key.endswith("kernel") or key == "embed":
            assert _has(spec, "fsdp"), key
            assert not _has(spec, "tensor"), key


def test_data_parallel_replicates_parameters(run):
    for key, spec in run("data8")["specs"].items():
        assert all(entry is None for entry in spec), (key, spec)


def test_mixed_mesh_layout_and_optimizer_state_follow_parameters(run):
    result = run("2x2x2")
    specs = result["specs"]
    assert specs["blocks/mlp/up/kernel"] == P(None, "fsdp", "tensor")
    assert specs["embed"] == P("tensor", "fsdp")
    # Adam's moments are laid out like the parameters they belong to.
    assert result["mu_specs"] == specs


@pytest.mark.parametrize(("name", "rows"), [("data8", 2), ("fsdp8", 2), ("2x2x2", 4)])
def test_batch_is_split_over_data_axes(make_batch, name, rows):
    mesh = _mesh(MESHES[name])
    sharding = parallel.batch_sharding(mesh)
    batch = jax.device_put(make_batch(16, 16, 128)["inputs"], sharding)
    shards = batch.addressable_shards
    assert len(shards) == math.prod(MESHES[name])
    assert {s.data.shape for s in shards} == {(rows, 16)}
    distinct = {tuple((i.start, i.stop) for i in s.index) for s in shards}
    assert len(distinct) == 16 // rows  # replicated over tensor, split over data x fsdp
    assert _has(sharding.spec, "data") or MESHES[name][0] == 1


# -- rules ---------------------------------------------------------------------------------


def test_logical_to_spec_replicates_what_does_not_divide():
    mesh = _mesh((1, 2, 4))
    spec = parallel.logical_to_spec
    assert spec(("embed", "mlp"), (64, 128), mesh, DEFAULT_RULES) == P("fsdp", "tensor")
    # 4 KV heads divide tensor=4; 6 do not, so that dimension is replicated.
    assert spec(("embed", "kv_heads"), (64, 4), mesh, DEFAULT_RULES) == P("fsdp", "tensor")
    assert spec(("embed", "kv_heads"), (64, 6), mesh, DEFAULT_RULES) == P("fsdp", None)
    assert spec(("vocab", "embed"), (259, 63), mesh, DEFAULT_RULES) == P(None, None)
    # A mesh axis is used once per array: the second tensor-mapped dimension is replicated.
    assert spec(("heads", "mlp"), (8, 8), mesh, DEFAULT_RULES) == P("tensor", None)
    # Size-1 mesh axes are dropped; the batch goes over every data-like axis that divides.
    assert spec(("batch", "length"), (8, 16), mesh, DEFAULT_RULES) == P("fsdp", None)
    mesh = _mesh((2, 2, 2))
    assert spec(("batch", None), (8, 16), mesh, DEFAULT_RULES) == P(("data", "fsdp"), None)
    assert spec(("batch", None), (6, 16), mesh, DEFAULT_RULES) == P(None, None)
    assert spec(("batch", None), None, mesh, DEFAULT_RULES) == P(("data", "fsdp"), None)
    assert spec(("layers", "head_dim", None), (2, 8, 8), mesh, DEFAULT_RULES) == P(None, None, None)
    # Rules are data: a custom table moves the layout without touching the model.
    rules = {**DEFAULT_RULES, "embed": "tensor"}
    assert spec(("embed", "mlp"), (64, 128), mesh, rules) == P("tensor", None)


def test_tree_shardings_replicates_kv_heads_that_do_not_divide(make_config):
    cfg = make_config({**OVERRIDES, "model.num_kv_heads": 4})
    abstract = nnx.state(nnx.eval_shape(lambda: build_model(cfg, 0)), nnx.Param)
    shardings = parallel.tree_shardings(abstract, _mesh((1, 1, 8)))
    specs = {"/".join(map(str, p)): v.get_value().spec for p, v in nnx.to_flat_state(shardings)}
    assert specs["blocks/attn/k/kernel"] == P(None, None, None, None)  # 4 heads, tensor 8
    assert specs["blocks/attn/q/kernel"] == P(None, None, "tensor", None)  # 8 heads


def test_make_mesh_checks_device_count():
    mesh = _mesh((2, 1, 4))
    assert dict(mesh.shape) == {**dict.fromkeys(MESH_AXES, 1), "data": 2, "tensor": 4}
    assert mesh.axis_names == MESH_AXES
    with pytest.raises(ValueError, match="needs 8 devices"):
        parallel.make_mesh({"data": 2, "fsdp": 2, "tensor": 2}, jax.devices()[:4])
    assert dict(parallel.make_mesh({"data": 8, "fsdp": 1, "tensor": 1}).shape)["data"] == 8


def test_constrain_is_a_no_op_without_a_mesh():
    x = np.ones((4, 4), np.float32)
    assert parallel.constrain(x, ("batch", None)) is x
