"""Learning-rate schedules, the optimizers (clipping, weight decay) and the loss."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxformer import parallel
from jaxformer.losses import cross_entropy
from jaxformer.train.optim import make_optimizer, make_schedule
from jaxformer.train.step import build_model, init_state, jit_steps
from jaxformer.train.validation import validate


def _opt(make_config, **kw):
    return make_config({f"optimizer.{k}": v for k, v in kw.items()}).optimizer


def _lrs(schedule, steps):
    return np.array([float(schedule(s)) for s in steps])


# -- schedules ----------------------------------------------------------------------------


def test_rsqrt_schedule_matches_formula(make_config):
    opt = _opt(make_config, schedule="rsqrt", warmup_steps=10, rsqrt_scale=2.0, lr=123.0)
    schedule = make_schedule(opt, total_steps=1000, d_model=64)
    steps = [0, 4, 8, 9, 10, 99, 399]

    def hand(step):  # t = step + 1; lr is ignored
        t = step + 1
        return 2.0 * 64**-0.5 * min(t**-0.5, t * 10**-1.5)

    np.testing.assert_allclose(_lrs(schedule, steps), [hand(s) for s in steps], rtol=1e-6)
    # The same numbers written out: 0.25 * min(t^-0.5, t / 31.6228).
    np.testing.assert_allclose(
        _lrs(schedule, [0, 4, 9, 99, 399]),
        [0.25 / 31.6227766, 0.25 * 5 / 31.6227766, 0.25 / math.sqrt(10), 0.025, 0.0125],
        rtol=1e-6,
    )
    # The peak is at t = warmup (step 9); it rises before and falls after.
    lrs = _lrs(schedule, range(30))
    assert np.argmax(lrs) == 9
    assert np.all(np.diff(lrs[:10]) > 0) and np.all(np.diff(lrs[9:]) < 0)


def test_cosine_schedule(make_config):
    lr, floor, warmup, total = 2.0, 0.2, 10, 110
    opt = _opt(make_config, schedule="cosine", lr=lr, min_lr_ratio=0.1, warmup_steps=warmup)
    schedule = make_schedule(opt, total_steps=total, d_model=64)
    decay_steps = total - warmup

    def hand(step):
        if step < warmup:
            return lr * step / warmup  # linear from 0
        k = min(step - warmup, decay_steps)
        return floor + (lr - floor) * 0.5 * (1 + math.cos(math.pi * k / decay_steps))

    steps = [0, 1, 5, 9, 10, 11, 35, 60, 85, 108, 109, 110, 200]
    np.testing.assert_allclose(_lrs(schedule, steps), [hand(s) for s in steps], rtol=1e-5)
    np.testing.assert_allclose(
        _lrs(schedule, [0, 5, 10, 60, 110, 500]), [0.0, 1.0, 2.0, 1.1, 0.2, 0.2], rtol=1e-5
    )
    # Conventions: the peak is used at step `warmup`, the floor from step `total_steps` on,
    # so the last update (step total - 1) is within one step's decay of the floor.
    lrs = _lrs(schedule, range(total + 1))
    assert np.argmax(lrs) == warmup
    assert np.all(np.diff(lrs[: warmup + 1]) > 0) and np.all(np.diff(lrs[warmup:]) <= 0)
    assert floor < lrs[total - 1] < floor + (lr - floor) * math.pi / decay_steps


def test_cosine_without_warmup_starts_at_peak(make_config):
    opt = _opt(make_config, schedule="cosine", lr=1.0, min_lr_ratio=0.0, warmup_steps=0)
    schedule = make_schedule(opt, total_steps=100, d_model=64)
    np.testing.assert_allclose(_lrs(schedule, [0, 50, 100]), [1.0, 0.5, 0.0], atol=1e-6)


def test_linear_schedule(make_config):
    opt = _opt(make_config, schedule="linear", lr=1.0, min_lr_ratio=0.1, warmup_steps=10)
    schedule = make_schedule(opt, total_steps=110, d_model=64)
    steps = [0, 5, 10, 35, 60, 109, 110, 300]
    expected = [0.0, 0.5, 1.0, 1 - 0.9 * 25 / 100, 0.55, 0.1 + 0.9 / 100, 0.1, 0.1]
    np.testing.assert_allclose(_lrs(schedule, steps), expected, rtol=1e-5)


def test_constant_schedule(make_config):
    opt = _opt(make_config, schedule="constant", lr=0.3, warmup_steps=4)
    schedule = make_schedule(opt, total_steps=50, d_model=64)
    np.testing.assert_allclose(
        _lrs(schedule, [0, 1, 2, 3, 4, 20, 49, 1000]),
        [0.0, 0.075, 0.15, 0.225, 0.3, 0.3, 0.3, 0.3],
        rtol=1e-6,
    )
    opt = _opt(make_config, schedule="constant", lr=0.3, warmup_steps=0)
    schedule = make_schedule(opt, total_steps=50, d_model=64)
    np.testing.assert_allclose(_lrs(schedule, [0, 49]), [0.3, 0.3], rtol=1e-6)


def test_wsd_schedule(make_config):
    lr, floor, total, warmup = 1.0, 0.1, 100, 10
    opt = _opt(
        make_config,
        schedule="wsd",
        lr=lr,
        min_lr_ratio=0.1,
        warmup_steps=warmup,
        decay_fraction=0.2,
    )
    schedule = make_schedule(opt, total_steps=total, d_model=64)
    decay = 20  # 0.2 * 100 steps: the decay runs over steps 80..100

    def hand(step):
        if step < warmup:
            return lr * step / warmup
        if step < total - decay:
            return lr
        return lr - (lr - floor) * min(step - (total - decay), decay) / decay

    steps = [0, 5, 10, 40, 79, 80, 81, 90, 99, 100, 150]
    np.testing.assert_allclose(_lrs(schedule, steps), [hand(s) for s in steps], rtol=1e-5)
    lrs = _lrs(schedule, range(total + 1))
    assert np.all(lrs[warmup : total - decay + 1] == pytest.approx(lr))  # stable phase
    assert np.all(np.diff(lrs[total - decay :]) < 0)  # then strictly decaying
    assert lrs[total] == pytest.approx(floor)


# -- loss ---------------------------------------------------------------------------------


def _log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


@pytest.mark.parametrize(("eps", "z"), [(0.0, 0.0), (0.1, 0.0), (0.0, 1e-2), (0.2, 1e-3)])
def test_cross_entropy_matches_numpy(eps, z):
    rng = np.random.default_rng(0)
    v = 7
    logits = rng.normal(size=(2, 3, v)).astype(np.float64) * 3
    targets = rng.integers(0, v, (2, 3))
    targets[0, 0] = logits[0, 0].argmax()  # at least one correct prediction
    targets[1, 2] = logits[1, 2].argmax()
    weights = np.array([[1.0, 1.0, 0.0], [1.0, 0.5, 2.0]])

    logp = _log_softmax(logits)
    onehot = np.eye(v)[targets]
    smoothed = (1 - eps) * onehot + eps / v
    lse = np.log(np.exp(logits).sum(-1))
    per_token = -(smoothed * logp).sum(-1) + z * lse**2
    nll = -(onehot * logp).sum(-1)
    correct = (logits.argmax(-1) == targets).astype(np.float64)

    loss, stats = cross_entropy(
        jnp.asarray(logits, jnp.float32),
        jnp.asarray(targets, jnp.int32),
        jnp.asarray(weights, jnp.float32),
        label_smoothing=eps,
        z_loss=z,
    )
    np.testing.assert_allclose(float(loss), (per_token * weights).sum(), rtol=1e-5)
    np.testing.assert_allclose(float(stats["nll"]), (nll * weights).sum(), rtol=1e-5)
    assert float(stats["weight"]) == pytest.approx(weights.sum())
    assert float(stats["correct"]) == pytest.approx((correct * weights).sum())
    assert float(stats["correct"]) >= 2.0


def test_cross_entropy_bfloat16_logits_and_zero_weights():
    logits = jnp.zeros((1, 4, 8), jnp.bfloat16)
    targets = jnp.zeros((1, 4), jnp.int32)
    loss, stats = cross_entropy(logits, targets, jnp.zeros((1, 4)))
    assert float(loss) == 0.0 and float(stats["weight"]) == 0.0
    loss, _ = cross_entropy(logits, targets, jnp.ones((1, 4)))
    assert float(loss) == pytest.approx(4 * math.log(8), rel=1e-6)


# -- optimizers ---------------------------------------------------------------------------


def _toy_params():
    rng = np.random.default_rng(1)
    return {
        "dense": {
            "kernel": jnp.asarray(rng.normal(size=(4, 3)), jnp.float32),
            "bias": jnp.asarray(rng.normal(size=(3,)), jnp.float32),
        },
        "norm": {"scale": jnp.ones((4,), jnp.float32)},
    }


@pytest.mark.parametrize("grad_scale", [1000.0, 0.05])
def test_clipping_bounds_the_global_norm(make_config, grad_scale):
    opt = _opt(make_config, clip_norm=1.0, lr=0.1, b1=0.9)
    tx = make_optimizer(opt, total_steps=10, d_model=4)
    params = _toy_params()
    rng = np.random.default_rng(2)
    grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params)
    norm = float(optax.tree.norm(grads))
    grads = jax.tree.map(lambda g: g * grad_scale / norm, grads)  # global norm = grad_scale

    _, state = tx.update(grads, tx.init(params), params)
    # Adam's first moment after one step is (1 - b1) * the gradient it was given.
    seen = jax.tree.map(lambda m: m / (1 - 0.9), optax.tree_utils.tree_get(state, "mu"))
    expected_scale = min(1.0, 1.0 / grad_scale)  # clip_by_global_norm: g * min(1, c/|g|)
    for got, want in zip(jax.tree.leaves(seen), jax.tree.leaves(grads), strict=True):
        np.testing.assert_allclose(got, want * expected_scale, rtol=1e-5, atol=1e-7)
    assert float(optax.tree.norm(seen)) == pytest.approx(min(grad_scale, 1.0), rel=1e-5)


def test_clip_norm_zero_disables_clipping(make_config):
    tx = make_optimizer(_opt(make_config, clip_norm=0.0), total_steps=10, d_model=4)
    params = _toy_params()
    grads = jax.tree.map(lambda p: jnp.full_like(p, 100.0), params)
    _, state = tx.update(grads, tx.init(params), params)
    seen = optax.tree_utils.tree_get(state, "mu")
    np.testing.assert_allclose(float(optax.tree.norm(seen)) / (1 - 0.9), 100.0 * np.sqrt(19))


def _decay_config(make_config, name):
    return make_config(
        {
            "optimizer.name": name,
            "optimizer.lr": 0.5,
            "optimizer.weight_decay": 0.1,
            "model.norm": "layernorm",
            "model.use_bias": True,
            "model.position": "learned",
            "model.tie_embeddings": False,
        }
    )


def _step_with_zero_grads(cfg):
    tx = make_optimizer(cfg.optimizer, cfg.train.steps, cfg.model.d_model)

    @jax.jit
    def run():
        params = nnx.state(build_model(cfg, seed=0), nnx.Param)
        zeros = jax.tree.map(jnp.zeros_like, params)
        updates, _ = tx.update(zeros, tx.init(params), params)
        return params, optax.apply_updates(params, updates)

    params, new = run()

    def named(tree):
        out = {}
        for path, leaf in jax.tree.leaves_with_path(tree):
            keys = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
            keys = [k for k in keys if k != "value"]
            out["/".join(keys)] = np.asarray(leaf)
        return out

    return named(params), named(new)


DECAYED = ("kernel", "embed", "pos_embed")
NOT_DECAYED = ("scale", "bias")


def test_adamw_weight_decay_skips_norms_and_biases(make_config):
    cfg = _decay_config(make_config, "adamw")
    before, after = _step_with_zero_grads(cfg)
    leaf_names = {path.rsplit("/", 1)[-1] for path in before}
    assert leaf_names == set(DECAYED + NOT_DECAYED)  # the config covers every kind
    factor = 1 - 0.5 * 0.1  # decoupled: p <- p - lr * wd * p
    for path, p in before.items():
        if path.rsplit("/", 1)[-1] in DECAYED:
            np.testing.assert_allclose(after[path], p * factor, rtol=1e-6, err_msg=path)
        else:
            np.testing.assert_array_equal(after[path], p, err_msg=path)


@pytest.fixture(scope="module")
def adafactor_zero_step(make_config):
    return _step_with_zero_grads(_decay_config(make_config, "adafactor"))


def test_adafactor_weight_decay_mask(adafactor_zero_step):
    before, after = adafactor_zero_step
    for path, p in before.items():
        if path.rsplit("/", 1)[-1] in DECAYED:
            assert np.all(np.abs(after[path]) < np.abs(p) + 1e-12), path
            assert not np.allclose(after[path], p), path
        else:
            np.testing.assert_array_equal(after[path], p, err_msg=path)


def test_adafactor_weight_decay_is_scaled_by_lr_like_adamw(adafactor_zero_step):
    before, after = adafactor_zero_step
    kernel = next(path for path in before if path.endswith("kernel"))
    np.testing.assert_allclose(after[kernel], before[kernel] * (1 - 0.5 * 0.1), rtol=1e-5)


# -- through the train step ---------------------------------------------------------------


def _single_device_run(cfg):
    mesh = parallel.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
    tx = make_optimizer(cfg.optimizer, cfg.train.steps, cfg.model.d_model)
    graphdef, state, shardings = init_state(cfg, tx, mesh, parallel.DEFAULT_RULES)
    train, _ = jit_steps(cfg, graphdef, tx, mesh, parallel.DEFAULT_RULES, shardings)
    return graphdef, state, train


def test_train_step_reports_pre_clip_grad_norm(make_config, make_batch):
    clip = 1e-3
    cfg = make_config({"optimizer.clip_norm": clip, "optimizer.lr": 1e-3})
    graphdef, state, train = _single_device_run(cfg)
    batch = make_batch(4, 16, 128, seed=3)
    batch["weights"][0, :5] = 0.0  # the mean is over the weighted tokens only

    def mean_loss(params):
        model = nnx.merge(graphdef, params)
        logits = model(batch["inputs"], batch["segment_ids"], batch["positions"])
        loss, stats = cross_entropy(logits, batch["targets"], batch["weights"])
        return loss / stats["weight"]

    loss, grads = jax.jit(jax.value_and_grad(mean_loss))(state.params)
    norm = float(optax.tree.norm(grads))
    assert norm > 10 * clip

    new_state, metrics = train(state, batch)
    assert float(metrics["loss"]) == pytest.approx(float(loss), rel=1e-5)
    assert float(metrics["grad_norm"]) == pytest.approx(norm, rel=1e-4)
    assert float(metrics["tokens"]) == 4 * 16 - 5
    assert float(metrics["lr"]) == pytest.approx(1e-3)
    # The optimizer saw the clipped gradient: Adam's mu = (1 - b1) * clip * g / |g|.
    mu = optax.tree_utils.tree_get(new_state.opt_state, "mu")
    assert float(optax.tree.norm(mu)) == pytest.approx((1 - cfg.optimizer.b1) * clip, rel=1e-4)
    assert int(new_state.step) == 1


def test_adafactor_trains(make_config, make_batch):
    cfg = make_config({"optimizer.name": "adafactor", "optimizer.lr": 1e-2})
    _, state, train = _single_device_run(cfg)
    batch = make_batch(4, 16, 128, seed=4)
    losses = []
    for _ in range(20):
        state, metrics = train(state, batch)
        losses.append(float(metrics["loss"]))
    assert np.all(np.isfinite(losses))
    assert losses[-1] < losses[0] - 1.0, losses


def test_chunked_loss_matches_whole_logits_and_holds_less(make_config, make_batch):
    """train.loss_chunk: the same loss, statistics and gradients (label smoothing and
    z-loss on), and a smaller compiled working set when the vocabulary dominates."""
    from jaxformer.train.step import _loss_and_grads

    base = {"model.vocab_size": 4096, "train.label_smoothing": 0.1, "train.z_loss": 1e-4}
    whole, chunked = make_config(base), make_config({**base, "train.loss_chunk": 4})
    graphdef, params = nnx.split(build_model(whole, 0))
    batch = {k: jnp.asarray(v) for k, v in make_batch(8, 16, 4096, seed=3).items()}
    batch["weights"] = batch["weights"].at[1, 5:].set(0.0)

    def compiled(cfg):
        fn = jax.jit(lambda p: _loss_and_grads(graphdef, p, batch, None, cfg))
        return fn.lower(params).compile()

    results = {}
    for name, cfg in (("whole", whole), ("chunked", chunked)):
        exe = compiled(cfg)
        results[name] = (exe(params), exe.memory_analysis().temp_size_in_bytes)
    ((loss, stats), grads), temp_whole = results["whole"]
    ((got_loss, got_stats), got_grads), temp_chunked = results["chunked"]
    np.testing.assert_allclose(float(got_loss), float(loss), rtol=1e-6)
    for key in stats:
        np.testing.assert_allclose(float(got_stats[key]), float(stats[key]), rtol=1e-6)
    for (path, want), (_, got) in zip(
        nnx.to_flat_state(grads), nnx.to_flat_state(got_grads), strict=True
    ):
        want, got = np.asarray(want.get_value()), np.asarray(got.get_value())
        # Sums in another order: compare against the leaf's scale, as the parallel tests do.
        assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max(), path
    assert temp_chunked < 0.6 * temp_whole, (temp_chunked, temp_whole)


def test_loss_chunk_must_divide_the_sequence(make_config):
    from jaxformer.config import ConfigError

    with pytest.raises(ConfigError, match="train.loss_chunk"):
        validate(make_config({"train.loss_chunk": 5}), 1)
