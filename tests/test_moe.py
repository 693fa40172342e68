"""The mixture-of-experts MLP: routing, capacity, aux losses, counts, training, meshes, decode."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxformer import flops, parallel
from jaxformer.model import DecoderLM, count_params
from jaxformer.model.moe import MoEMLP, capacity
from jaxformer.parallel import DEFAULT_RULES
from jaxformer.tasks import model_config
from jaxformer.train.optim import make_optimizer
from jaxformer.train.step import init_state, jit_steps

MOE = {"model.moe_experts": 4, "model.moe_top_k": 2}


def _model_cfg(make_config, overrides=None):
    return model_config(make_config({**MOE, **(overrides or {})}).model)


def _randomised_mlp(cfg, seed=0, std=0.5):
    """An MoEMLP whose every parameter (biases included) is random and O(1)."""
    mlp = MoEMLP(cfg, nnx.Rngs(params=seed))
    rng = np.random.default_rng(seed + 100)
    for _, var in nnx.to_flat_state(nnx.state(mlp, nnx.Param)):
        shape = var.get_value().shape
        var.set_value(jnp.asarray(rng.normal(size=shape) * std, jnp.float32))
    return mlp


def _x(shape, seed=1):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


@nnx.jit
def _apply(mlp, x):
    return mlp(x)


@nnx.jit
def _route(mlp, x):
    return mlp.route(x)


def _weights(mlp):
    get = lambda m: None if m is None else np.asarray(m.kernel[...], np.float64)  # noqa: E731
    bias = lambda m: None if m is None or m.bias is None else np.asarray(m.bias[...], np.float64)  # noqa: E731
    return {
        "router": np.asarray(mlp.router.kernel[...], np.float64),
        "up": get(mlp.up), "gate": get(mlp.gate), "down": get(mlp.down),
        "b_up": bias(mlp.up), "b_gate": bias(mlp.gate), "b_down": bias(mlp.down),
    }  # fmt: skip


def _softmax(z):
    z = z - z.max(-1, keepdims=True)
    return np.exp(z) / np.exp(z).sum(-1, keepdims=True)


def _hand_topk(mlp, x_GxSxD):
    """Numpy top-k experts and gates (renormalised for k > 1), per token."""
    probs = _softmax(np.asarray(x_GxSxD, np.float64) @ _weights(mlp)["router"])
    experts = np.argsort(-probs, axis=-1, kind="stable")[..., : mlp.top_k]
    gates = np.take_along_axis(probs, experts, -1)
    if mlp.top_k > 1:
        gates = gates / gates.sum(-1, keepdims=True)
    return experts, gates


def _hand_kept(experts_GxSxK, num_experts, cap):
    """Fill each expert's C slots: all first choices by position, then second choices..."""
    g, s, k = experts_GxSxK.shape
    kept = np.zeros((g, s, k), bool)
    for gi in range(g):
        used = np.zeros(num_experts, int)
        for ki in range(k):
            for si in range(s):
                e = experts_GxSxK[gi, si, ki]
                if used[e] < cap:
                    kept[gi, si, ki] = True
                    used[e] += 1
    return kept


def _expert(w, kind, e, x_D):
    h = x_D @ w["up"][e] + (0 if w["b_up"] is None else w["b_up"][e])
    if kind == "swiglu":
        a = x_D @ w["gate"][e] + (0 if w["b_gate"] is None else w["b_gate"][e])
        h = a / (1 + np.exp(-a)) * h
    elif kind == "gelu":
        h = 0.5 * h * (1 + np.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h**3)))
    else:
        h = np.maximum(h, 0)
    return h @ w["down"][e] + (0 if w["b_down"] is None else w["b_down"][e])


def _reference(mlp, x_GxSxD, kept_GxSxK=None):
    """Token by token: sum over its (kept) top-k experts of gate * expert(x)."""
    w = _weights(mlp)
    x = np.asarray(x_GxSxD, np.float64)
    experts, gates = _hand_topk(mlp, x)
    out = np.zeros_like(x)
    for g, s, k in np.ndindex(*experts.shape):
        if kept_GxSxK is None or kept_GxSxK[g, s, k]:
            out[g, s] += gates[g, s, k] * _expert(w, mlp.kind, experts[g, s, k], x[g, s])
    return out


# -- routing and capacity -----------------------------------------------------------------


def test_capacity_formula():
    assert capacity(16, 4, 2, 1.25) == 10  # ceil(1.25 * 16 * 2 / 4)
    assert capacity(16, 8, 1, 1.0) == 2
    assert capacity(16, 4, 2, 100.0) == 16  # never more than the group's tokens
    assert capacity(1, 64, 1, 0.1) == 1  # at least one slot


def test_tiny_capacity_drops_exactly_the_overflow(make_config):
    cfg = _model_cfg(make_config, {"model.moe_capacity_factor": 0.5})
    mlp = _randomised_mlp(cfg)
    x = _x((3, 16, cfg.d_model))
    routing = _route(mlp, x)
    cap = routing.capacity
    assert cap == 4  # ceil(0.5 * 16 * 2 / 4): 16 slots for 32 assignments per group

    experts, gates = _hand_topk(mlp, x)
    np.testing.assert_array_equal(routing.experts_GxSxK, experts)
    np.testing.assert_allclose(routing.gates_GxSxK, gates, rtol=1e-5)
    kept = _hand_kept(experts, 4, cap)
    np.testing.assert_array_equal(routing.kept_GxSxK, kept)
    # No expert gets more than C tokens, and the kept ones have distinct slots below C.
    for g in range(3):
        for e in range(4):
            mine = (experts[g] == e) & kept[g]
            assert mine.sum() <= cap
            assert sorted(np.asarray(routing.position_GxSxK)[g][mine]) == list(range(mine.sum()))

    y, aux = _apply(mlp, x)
    hand_dropped = 1 - kept.mean()
    assert hand_dropped >= 0.5  # at least 16 of 32 per group cannot fit
    assert float(aux["dropped_fraction"]) == pytest.approx(hand_dropped, abs=1e-7)
    # Dropped assignments contribute nothing; a fully dropped token's output is 0.
    np.testing.assert_allclose(y, _reference(mlp, x, kept), rtol=1e-5, atol=1e-5)
    fully_dropped = ~kept.any(-1)
    assert fully_dropped.any()
    assert np.all(np.asarray(y)[fully_dropped] == 0.0)
    # The dispatched buffer holds exactly the kept tokens, at most C per expert.
    buffer = np.asarray(nnx.jit(lambda m, x: m.dispatch(x, m.route(x)))(mlp, x))
    assert buffer.shape == (3, 4, cap, cfg.d_model)
    assert (np.abs(buffer).sum(-1) > 0).sum() == kept.sum()


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"model.moe_top_k": 1, "model.mlp": "gelu", "model.use_bias": True},
        {"model.mlp": "relu", "model.moe_d_ff": 24, "model.moe_experts": 3},
    ],
    ids=["swiglu-top2", "gelu-top1-bias", "relu-top2-dff24-e3"],
)
def test_matches_per_token_reference_when_nothing_dropped(make_config, overrides):
    cfg = _model_cfg(make_config, {"model.moe_capacity_factor": 4.0, **overrides})
    mlp = _randomised_mlp(cfg, seed=2)
    x = _x((2, 16, cfg.d_model), seed=3)
    y, aux = _apply(mlp, x)
    assert float(aux["dropped_fraction"]) == 0.0
    assert np.asarray(_route(mlp, x).kept_GxSxK).all()
    np.testing.assert_allclose(y, _reference(mlp, x), rtol=1e-5, atol=1e-5)


# -- auxiliary losses ---------------------------------------------------------------------


def _one_hot_router_mlp(make_config, top_k=1):
    cfg = _model_cfg(make_config, {"model.d_model": 8, "model.moe_top_k": top_k})
    mlp = MoEMLP(cfg, nnx.Rngs(params=0))
    kernel = np.zeros((8, 4), np.float32)
    kernel[np.arange(4), np.arange(4)] = 5.0  # input dim i votes for expert i
    mlp.router.kernel.set_value(jnp.asarray(kernel))
    return mlp


def test_load_balancing_loss_is_minimal_for_uniform_routing(make_config):
    mlp = _one_hot_router_mlp(make_config)
    weight = mlp.aux_weight
    assert weight == 0.01
    # Token s points at expert s % 4: each expert gets 1/4 of the tokens, and by symmetry
    # the mean router probability of every expert is 1/4 too.
    uniform = np.zeros((2, 8, 8), np.float32)
    uniform[:, np.arange(8), np.arange(8) % 4] = 1.0
    _, aux = _apply(mlp, jnp.asarray(uniform))
    assert float(aux["aux_loss"]) == pytest.approx(weight * 1.0, rel=1e-6)
    # Collapsed: every token to expert 0: f_0 = 1, so the loss is E * P_0.
    collapsed = np.zeros((2, 8, 8), np.float32)
    collapsed[..., 0] = 1.0
    _, aux_collapsed = _apply(mlp, jnp.asarray(collapsed))
    p0 = math.exp(5) / (math.exp(5) + 3)
    assert float(aux_collapsed["aux_loss"]) == pytest.approx(weight * 4 * p0, rel=1e-6)
    assert float(aux_collapsed["aux_loss"]) > 3 * float(aux["aux_loss"])


def test_load_balancing_counts_every_top_k_choice(make_config):
    mlp = _one_hot_router_mlp(make_config, top_k=2)
    x = _x((2, 8, 8), seed=5)
    _, aux = _apply(mlp, x)
    experts, _ = _hand_topk(mlp, x)
    probs = _softmax(np.asarray(x, np.float64) @ _weights(mlp)["router"])
    f = np.stack([(experts == e).sum((1, 2)) / (8 * 2) for e in range(4)], -1)  # [G, E]
    hand = 4 * (f * probs.mean(1)).sum(-1).mean()
    assert float(aux["aux_loss"]) == pytest.approx(0.01 * hand, rel=1e-5)


def test_router_z_loss_formula(make_config):
    cfg = _model_cfg(make_config)
    mlp = _randomised_mlp(cfg, seed=4)
    x = _x((2, 16, cfg.d_model), seed=6)
    _, aux = _apply(mlp, x)
    logits = np.asarray(x, np.float64) @ _weights(mlp)["router"]
    m = logits.max(-1, keepdims=True)
    lse = (m + np.log(np.exp(logits - m).sum(-1, keepdims=True)))[..., 0]
    assert cfg.moe_z_loss == 0.001
    assert float(aux["z_loss"]) == pytest.approx(0.001 * np.mean(lse**2), rel=1e-5)


def test_top_k_must_fit_the_experts(make_config):
    with pytest.raises(ValueError, match="moe_top_k"):
        MoEMLP(_model_cfg(make_config, {"model.moe_top_k": 5}), nnx.Rngs(params=0))


# -- the decoder: counts, scan, training, meshes, decoding --------------------------------


def _abstract_params(cfg):
    model = nnx.eval_shape(lambda: DecoderLM(model_config(cfg.model), nnx.Rngs(0)))
    return nnx.state(model, nnx.Param)


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {
            "model.mlp": "gelu",
            "model.use_bias": True,
            "model.moe_top_k": 1,
            "model.moe_d_ff": 48,
            "model.tie_embeddings": False,
            "model.scan_layers": False,
        },
    ],
    ids=["swiglu-top2", "gelu-bias-top1-dff48-untied-loop"],
)
def test_flops_count_for_moe(make_config, overrides):
    cfg = make_config({**MOE, **overrides})
    state = _abstract_params(cfg)
    counted = flops.count(cfg.model, 16)
    assert counted.params == count_params(state)
    m = cfg.model
    # Active matmul parameters: every kernel, but only k of the E experts' MLP kernels.
    expert_kernels = other_kernels = 0
    for path, var in nnx.to_flat_state(state):
        names = var.get_metadata()["out_sharding"]
        assert all(n is None or n in DEFAULT_RULES for n in names), (path, names)
        if path[-1] == "kernel":
            size = math.prod(var.get_value().shape)
            if "expert" in names and path[-2] != "router":
                expert_kernels += size
            else:
                other_kernels += size
    output = m.vocab_size * m.d_model if m.tie_embeddings else 0
    active = other_kernels + expert_kernels * m.moe_top_k // m.moe_experts + output
    assert counted.matmul_params == active
    assert counted.params > counted.matmul_params - output  # experts not all active
    assert counted.train_flops_per_token == 3 * (2 * active + counted.attention_flops)


def _forward(model, batch, **kw):
    return nnx.jit(lambda m, *a: m(*a, **kw))(
        model, batch["inputs"], batch["segment_ids"], batch["positions"]
    )


def test_scanned_and_looped_layers_agree(make_config, make_batch):
    """Same parameters, one model scanned (and rematerialised), one a Python loop."""
    scanned = DecoderLM(_model_cfg(make_config, {"model.remat": "full"}), nnx.Rngs(params=0))
    looped = DecoderLM(_model_cfg(make_config, {"model.scan_layers": False}), nnx.Rngs(1))
    stacked = dict(nnx.to_flat_state(nnx.state(scanned, nnx.Param)))
    for path, var in nnx.to_flat_state(nnx.state(looped, nnx.Param)):
        if path[0] == "blocks":
            var.set_value(stacked[("blocks", *path[2:])].get_value()[path[1]])
        else:
            var.set_value(stacked[path].get_value())
    batch = make_batch(2, 16, 128, seed=7)
    logits_s, aux_s = _forward(scanned, batch, return_aux=True)
    logits_l, aux_l = _forward(looped, batch, return_aux=True)
    np.testing.assert_allclose(logits_l, logits_s, rtol=1e-5, atol=1e-5)
    assert aux_s.keys() == aux_l.keys() == {"aux_loss", "z_loss", "dropped_fraction"}
    for key in aux_s:
        assert float(aux_l[key]) == pytest.approx(float(aux_s[key]), rel=1e-5, abs=1e-7)
    # Summed over 2 layers, each at least its minimum weight x 1 (roughly, at init).
    assert float(aux_s["aux_loss"]) == pytest.approx(2 * 0.01, rel=0.1)
    # Without return_aux the model returns logits alone, as for dense models.
    np.testing.assert_allclose(_forward(scanned, batch), logits_s, rtol=1e-6)


def _single_device(cfg):
    mesh = parallel.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
    tx = make_optimizer(cfg.optimizer, cfg.train.steps, cfg.model.d_model)
    graphdef, state, shardings = init_state(cfg, tx, mesh, DEFAULT_RULES)
    train, _ = jit_steps(cfg, graphdef, tx, mesh, DEFAULT_RULES, shardings)
    return state, train


DENSE_METRICS = {"loss", "nll", "accuracy", "grad_norm", "lr", "tokens"} | {
    "skipped",
    "bad_in_a_row",
    "longest_in_a_row",
    "nonfinite_total",
    "spikes_total",  # the bad-step guard
}
MOE_METRICS = {"moe_aux_loss", "moe_z_loss", "moe_dropped_fraction"}


def test_tiny_moe_decoder_trains(make_config, make_batch):
    cfg = make_config({**MOE, "optimizer.lr": 1e-2})
    state, train = _single_device(cfg)
    batch = make_batch(4, 16, 128, seed=4)
    losses = []
    for _ in range(20):
        state, metrics = train(state, batch)
        m = {k: float(v) for k, v in metrics.items()}
        losses.append(m["loss"])
        assert m.keys() == DENSE_METRICS | MOE_METRICS
        # The loss differentiated is the token mean NLL plus the (weighted) MoE terms.
        want = m["nll"] + m["moe_aux_loss"] + m["moe_z_loss"]
        assert m["loss"] == pytest.approx(want, rel=1e-5)
        assert 0.0 <= m["moe_dropped_fraction"] < 1.0
        assert m["moe_aux_loss"] >= 0.01 * 2 * 0.99  # 2 layers, about the minimum or more
    assert np.all(np.isfinite(losses))
    assert losses[-1] < losses[0] - 1.0, losses


def test_dense_metrics_are_unchanged(make_config, make_batch):
    for microbatches in (1, 2):
        cfg = make_config({"model.num_layers": 1, "train.microbatches": microbatches})
        state, train = _single_device(cfg)
        _, metrics = jax.eval_shape(train, state, make_batch(4, 16, 128))  # traced only
        assert metrics.keys() == DENSE_METRICS


def _mesh_run(cfg, shape, batches):
    mesh = parallel.make_mesh(
        dict(zip(("data", "fsdp", "tensor"), shape, strict=True)), jax.devices()[: math.prod(shape)]
    )
    tx = make_optimizer(cfg.optimizer, cfg.train.steps, cfg.model.d_model)
    graphdef, state, shardings = init_state(cfg, tx, mesh, DEFAULT_RULES)
    train, _ = jit_steps(cfg, graphdef, tx, mesh, DEFAULT_RULES, shardings)
    out = []
    for batch in batches:
        state, metrics = train(state, batch)
        out.append({k: float(v) for k, v in metrics.items()})
    return out


def test_moe_on_a_2x2x2_mesh_matches_one_device(make_config, make_batch):
    overrides = {
        **MOE,
        "model.moe_capacity_factor": 1.0,  # some tokens dropped: capacity decisions match too
        "model.num_layers": 1,  # compiles faster
        "train.global_batch": 8,
        "optimizer.lr": 1e-2,
        "optimizer.eps": 1e-5,  # see tests/test_sharding.py
    }
    batches = [make_batch(8, 16, 128, seed=s) for s in range(2)]
    single = _mesh_run(make_config(overrides), (1, 1, 1), batches)
    mesh = _mesh_run(make_config(overrides), (2, 2, 2), batches)
    # Rows are the routing groups, so splitting the batch in microbatches changes nothing.
    micro = _mesh_run(make_config({**overrides, "train.microbatches": 2}), (2, 2, 2), batches)
    assert single[0]["moe_dropped_fraction"] > 0
    for got in (mesh, micro):
        for g, w in zip(got, single, strict=True):
            for key in ("loss", "nll", "grad_norm", *MOE_METRICS):
                assert g[key] == pytest.approx(w[key], rel=1e-5, abs=1e-7), key


@pytest.mark.parametrize("scan", [True, False], ids=["scan", "loop"])
def test_kv_cache_decode_matches_full_forward(make_config, make_batch, scan):
    # Capacity factor E / k gives every expert room for the whole group: nothing is
    # dropped, so one token at a time routes exactly like the full sequence.
    cfg = _model_cfg(make_config, {"model.moe_capacity_factor": 2.0, "model.scan_layers": scan})
    model = DecoderLM(cfg, nnx.Rngs(params=0))
    batch = make_batch(2, 12, 128, seed=8)
    tokens, segments, positions = batch["inputs"], batch["segment_ids"], batch["positions"]
    full, aux = _forward(model, batch, return_aux=True)
    assert float(aux["dropped_fraction"]) == 0.0

    decode = nnx.jit(lambda m, t, s, p, c: m.decode(t, s, p, c))
    cache = model.init_cache(2, 12, jnp.float32)
    prompt = 5
    logits, cache = decode(
        model, tokens[:, :prompt], segments[:, :prompt], positions[:, :prompt], cache
    )
    steps = [logits]
    for i in range(prompt, 12):
        logits, cache = decode(
            model, tokens[:, i : i + 1], segments[:, i : i + 1], positions[:, i : i + 1], cache
        )
        steps.append(logits)
    np.testing.assert_allclose(np.concatenate(steps, axis=1), full, rtol=1e-5, atol=1e-5)
