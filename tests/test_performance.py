"""The speed work keeps the math: the weight-gradient order of Dense, the remat policies
that must still see Dense's products; and the huge-page malloc of the entry points."""

import functools
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO_ROOT
from flax import nnx

from jaxformer.attention.masks import SegmentMask, causal_blocks
from jaxformer.attention.reference import EINSUM
from jaxformer.attention.registry import dot_product_attention
from jaxformer.host import huge_pages_supported
from jaxformer.model import DecoderLM
from jaxformer.model.layers import Norm, mlp_activation
from jaxformer.model.products import contract_last, tied_logits
from jaxformer.tasks import model_config

self_attention_mask = EINSUM.self_mask  # the dense mask a stack's layers share

sys.path.insert(0, str(REPO_ROOT / "tools"))
import benchmark  # noqa: E402
import profile_step  # noqa: E402


@pytest.mark.parametrize(
    ("x_shape", "w_shape", "n"),
    [
        ((2, 5, 8), (8, 12), 1),  # [B, L, D] x [D, F]
        ((2, 5, 8), (8, 3, 4), 1),  # [B, L, D] x [D, H, Dh]: the q/k/v projections
        ((2, 5, 3, 4), (3, 4, 8), 2),  # [B, L, H, Dh] x [H, Dh, D]: the output projection
    ],
)
def test_contract_last_matches_dot_general_and_its_gradients(x_shape, w_shape, n):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=x_shape), jnp.float32)
    w = jnp.asarray(rng.normal(size=w_shape), jnp.float32)
    probe = jnp.asarray(rng.normal(size=x_shape[: len(x_shape) - n] + w_shape[n:]), jnp.float32)

    def reference(x, w):
        contract = (tuple(range(x.ndim - n, x.ndim)), tuple(range(n)))
        return jax.lax.dot_general(x, w, (contract, ((), ())))

    def loss(fn):
        return lambda x, w: jnp.sum(jnp.sin(fn(x, w)) * probe)

    want = jax.grad(loss(reference), argnums=(0, 1))(x, w)
    got = jax.grad(loss(lambda x, w: contract_last(x, w, n)), argnums=(0, 1))(x, w)
    np.testing.assert_allclose(contract_last(x, w, n), reference(x, w), rtol=1e-6)
    for g, r in zip(got, want, strict=True):
        assert g.shape == r.shape and g.dtype == r.dtype
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-6)
    # bfloat16 compute: gradients come back in each operand's dtype.
    xb, wb = x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)
    gx, gw = jax.grad(loss(lambda x, w: contract_last(x, w, n)), argnums=(0, 1))(xb, wb)
    assert gx.dtype == gw.dtype == jnp.bfloat16


def _train_flops(make_config, remat: str) -> float:
    """XLA's FLOP count of one forward + backward of a small decoder under ``remat``."""
    cfg = make_config({"model.remat": remat, "model.d_model": 64, "model.d_ff": 256})
    model = DecoderLM(model_config(cfg.model), nnx.Rngs(params=0))
    graphdef, params = nnx.split(model, nnx.Param)
    tokens = jnp.ones((4, 16), jnp.int32)
    positions = jnp.tile(jnp.arange(16, dtype=jnp.int32), (4, 1))

    def loss(p):
        return nnx.merge(graphdef, p)(tokens, jnp.ones_like(tokens), positions).sum()

    compiled = jax.jit(jax.grad(loss)).lower(params).compile()
    return compiled.cost_analysis()["flops"]


def test_dots_remat_policies_still_save_dense_products(make_config):
    """Dense's custom gradient hides its dot_general from jax's dot policies; the layers
    name its product so that "dots" and "dots_no_batch" still keep it (not recompute it)."""
    none, full = _train_flops(make_config, "none"), _train_flops(make_config, "full")
    dots, no_batch = _train_flops(make_config, "dots"), _train_flops(make_config, "dots_no_batch")
    assert full > 1.2 * none  # full remat recomputes the whole forward
    assert dots == pytest.approx(none, rel=0.02)  # every product saved
    # Attention's batched products are recomputed, the projections and MLP are not.
    assert none < no_batch < none + 0.5 * (full - none)


TOUCH_BLOCKS = textwrap.dedent(
    """
    import ctypes, os, resource, sys
    from jaxformer.host import use_huge_pages
    use_huge_pages()  # re-executes this script unless there is nothing to do
    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    faults = []
    for _ in range(3):  # malloc as XLA:CPU does (numpy would ask for huge pages itself)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        block = libc.malloc(256 * 2**20)
        ctypes.memset(block, 1, 256 * 2**20)  # touch every page
        libc.free(block)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    print(os.getpid(), os.environ.get("GLIBC_TUNABLES", ""), faults)
    """
)


@pytest.mark.skipif(not huge_pages_supported(), reason="needs glibc >= 2.35 and THP madvise")
@pytest.mark.parametrize("enabled", ["1", "0"])
def test_use_huge_pages_reexecutes_with_huge_page_malloc(enabled):
    """The entry points re-execute once with glibc.malloc.hugetlb=1; a 256 MiB block then
    faults in ~128 huge pages instead of 65,536 small ones (what every XLA:CPU step paid
    for each of its large buffers)."""
    env = {"JAXFORMER_HUGE_PAGES": enabled, "PATH": "/usr/bin:/bin"}
    proc = subprocess.Popen(
        [sys.executable, "-c", TOUCH_BLOCKS], env=env, stdout=subprocess.PIPE, text=True
    )
    out, _ = proc.communicate(timeout=120)
    pid, tunables, faults = out.split(" ", 2)
    assert int(pid) == proc.pid  # execve: the same process, not a child
    pages = 256 * 2**20 // 4096
    if enabled == "1":
        assert tunables == "glibc.malloc.hugetlb=1"
        assert max(eval(faults)) < pages // 50, faults
    else:
        assert tunables == ""
        assert min(eval(faults)) > pages // 2, faults


@pytest.mark.parametrize(
    ("length", "window", "kv_heads", "with_bias"),
    [(512, 0, 2, False), (512, 200, 4, False), (384, 0, 1, True), (256, 64, 2, True)],
)
def test_causal_blocks_equal_the_whole_square(length, window, kv_heads, with_bias):
    """Causal self-attention in query blocks (keys after a block, and before its window,
    never scored) gives the whole-square einsum's output and gradients, on packed
    documents with padding, grouped KV heads and a logit bias."""
    blocks = causal_blocks(length, window)
    assert len(blocks) > 1 and blocks[-1][1] == length
    rng = np.random.default_rng(1)
    b, h, dh = 2, 4, 8
    q = jnp.asarray(rng.normal(size=(b, length, h, dh)), jnp.float32)
    k, v = (jnp.asarray(rng.normal(size=(b, length, kv_heads, dh)), jnp.float32) for _ in "kv")
    bias = jnp.asarray(rng.normal(size=(1, h, length, length)), jnp.float32) if with_bias else None
    cut = length // 3
    segments = np.ones((b, length), np.int32)
    segments[:, cut:] = 2
    segments[1, -20:] = 0  # padding
    positions = np.concatenate([np.arange(cut), np.arange(length - cut)])[None].repeat(b, 0)
    mask = self_attention_mask(jnp.asarray(segments), jnp.asarray(positions), True, window)
    assert isinstance(mask, SegmentMask) and mask.dense_BxLxL is not None
    # Padding queries attend to nothing; what they return is unspecified (each path
    # spreads them over the keys it scores), so the probe ignores them.
    probe = rng.normal(size=q.shape) * (segments > 0)[:, :, None, None]
    probe = jnp.asarray(probe, jnp.float32)

    def loss(m):
        def f(q, k, v, bias):
            out = dot_product_attention(q, k, v, m, bias, implementation="einsum", scale=0.3)
            return jnp.sum(out * probe)

        return jax.value_and_grad(f, argnums=(0, 1, 2, 3) if with_bias else (0, 1, 2))

    want = loss(mask.dense())(q, k, v, bias)  # a plain array: one whole square
    got = loss(mask)(q, k, v, bias)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
    for g, w in zip(got[1], want[1], strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)


def test_benchmark_writes_a_row_with_mfu_against_the_sampled_matmul_peak(tmp_path):
    """tools/benchmark.py end to end on a tiny model: one row in the output file, with the
    command, and on CPU the peak taken from matmuls sampled around the timed steps."""
    out = tmp_path / "BENCH.md"
    tiny = ["--config.model.d_model=32", "--config.model.num_layers=1", "--config.data.seq_len=16"]
    args = [f"--config={REPO_ROOT / 'configs/default.py'}", *tiny, "--config.train.global_batch=8"]
    assert benchmark.main([*args, "--steps=2", "--warmup=1", "--write", f"--output={out}"]) == 0
    text = out.read_text()
    row = next(line for line in text.splitlines() if line.startswith("| 20"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[3].startswith("default.py --config.model.d_model=32")
    assert cells[5] == "8 x 16"
    mfu, peak = float(cells[9].rstrip("%")) / 100, cells[10]
    assert "best of 7 2048^3 float32 matmuls between the steps of this run on cpu" in peak
    tflops, peak_tflops = float(cells[8]), float(peak.split()[0])
    # Within the cells' rounding (TFLOP/s to 3 decimals, MFU to 0.1%); on a loaded machine the
    # sampled peak is low, and the TFLOP/s cell's rounding then counts for more.
    assert mfu == pytest.approx(tflops / peak_tflops, abs=0.001 / peak_tflops + 0.001)
    assert 0.05 < peak_tflops < 1e4  # a plausible CPU, in TFLOP/s
    assert "python tools/benchmark.py --config=" in text


def test_benchmark_config_that_fails_gets_a_row_naming_the_error_and_the_rest_run(tmp_path):
    """Each config runs in its own process: one that fails (here a batch that does not
    divide over the 8 simulated devices) is reported, and the next is still measured."""
    out = tmp_path / "BENCH.md"
    tiny = ["--config.model.d_model=32", "--config.model.num_layers=1", "--config.data.seq_len=16"]
    default = f"--config={REPO_ROOT / 'configs/default.py'}"
    args = [*tiny, default, "--config.train.global_batch=7", default]
    assert benchmark.main([*args, "--steps=1", "--warmup=1", "--write", f"--output={out}"]) == 1
    rows = [line for line in out.read_text().splitlines() if line.startswith("| 20")]
    assert len(rows) == 2
    assert (
        "global_batch=7" in rows[0] and "failed: " in rows[0] and "7" in rows[0].split("failed")[1]
    )
    assert "cpu" in rows[1].split("|")[2] and "%" in rows[1]


def test_benchmark_baseline_alternates_with_another_checkout(tmp_path):
    """--baseline=DIR measures each config on that tree's jaxformer too, in turn with this
    one, and each row names its tree's commit (a copy without history: 'unknown')."""
    import shutil

    other = tmp_path / "other"
    for part in ("jaxformer", "tools", "configs"):
        shutil.copytree(
            REPO_ROOT / part, other / part, ignore=shutil.ignore_patterns("__pycache__")
        )
    out = tmp_path / "BENCH.md"
    tiny = ["--config.model.d_model=32", "--config.model.num_layers=1", "--config.data.seq_len=16"]
    args = [f"--config={REPO_ROOT / 'configs/default.py'}", *tiny, "--config.train.global_batch=8"]
    argv = [*args, f"--baseline={other}", "--steps=1", "--warmup=1", "--write", f"--output={out}"]
    assert benchmark.main(argv) == 0
    rows = [line for line in out.read_text().splitlines() if line.startswith("| 20")]
    commits = [row.split("|")[3].strip() for row in rows]
    assert len(rows) == 2 and commits[1] == "unknown" and commits[0] == benchmark.git_commit()


@pytest.mark.parametrize("kind", ["swiglu", "geglu", "gelu", "gelu_exact", "relu"])
def test_mlp_activation_recomputes_and_keeps_only_its_inputs(kind):
    """mlp_activation is rematerialised: the same values and gradients as the plain
    formula, with only its inputs (up, gate) kept for the backward pass."""
    rng = np.random.default_rng(0)
    up, gate = (jnp.asarray(rng.normal(size=(2, 3, 8)), jnp.float32) for _ in range(2))
    plain = {
        "swiglu": lambda u, g: jax.nn.silu(g) * u,
        "geglu": lambda u, g: jax.nn.gelu(g, approximate=True) * u,
        "gelu": lambda u, g: jax.nn.gelu(u, approximate=True),
        "gelu_exact": lambda u, g: jax.nn.gelu(u, approximate=False),
        "relu": lambda u, g: jax.nn.relu(u),
    }[kind]
    gated = kind in ("swiglu", "geglu")

    def ours(u, g):
        return mlp_activation(kind, u, g if gated else None)

    probe = jnp.asarray(rng.normal(size=up.shape), jnp.float32)
    out, vjp = jax.vjp(ours, up, gate)
    want, want_vjp = jax.vjp(plain, up, gate)
    np.testing.assert_allclose(out, want, rtol=1e-6)
    for a, b in zip(vjp(probe), want_vjp(probe), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    kept = jax.tree.leaves(vjp)
    assert len(kept) == (2 if gated else 1) and all(k.shape == up.shape for k in kept)


def test_causal_blocks_keep_only_inputs_and_probabilities_for_the_backward():
    """Blocked causal attention keeps q, k, v once, each block's probabilities and the
    mask, not a slice of k and v per block (2.5x their size at 4 blocks)."""
    b, length, heads, dh = 2, 512, 2, 8
    q, k, v = (jnp.full((b, length, heads, dh), x, jnp.float32) for x in (0.1, 0.2, 0.3))
    segments = jnp.ones((b, length), jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(length), (b, length))
    mask = self_attention_mask(segments, positions, True)

    def attend(q, k, v):
        return dot_product_attention(q, k, v, mask, None, implementation="einsum", scale=0.3)

    _, vjp = jax.vjp(attend, q, k, v)
    kept = sorted(x.shape for x in jax.tree.leaves(vjp))
    blocks = causal_blocks(length)
    assert len(blocks) == 4
    probs = [(b, heads, end - start, end - key_start) for start, end, key_start in blocks]
    assert kept == sorted([q.shape] * 3 + probs + [(b, length, length)])


@pytest.mark.parametrize("kind", ["rmsnorm", "layernorm"])
def test_norm_recomputes_and_keeps_only_its_input_and_scale(kind):
    """Norm is rematerialised: the same output and gradients as the formula, with only
    x and the scale kept for the backward pass."""
    rng = np.random.default_rng(0)
    norm = Norm(16, kind, 1e-6, jnp.float32, nnx.Rngs(0))
    norm.scale[...] = jnp.asarray(rng.normal(size=16), jnp.float32)
    x = jnp.asarray(rng.normal(size=(2, 4, 16)), jnp.float32)

    def formula(x, scale):
        if kind == "layernorm":
            x = x - x.mean(-1, keepdims=True)
        return x / jnp.sqrt((x * x).mean(-1, keepdims=True) + 1e-6) * scale

    probe = jnp.asarray(rng.normal(size=x.shape), jnp.float32)
    graphdef, state = nnx.split(norm)
    out, vjp = jax.vjp(lambda s, x: nnx.merge(graphdef, s)(x), state, x)
    want, want_vjp = jax.vjp(formula, x, norm.scale[...])
    np.testing.assert_allclose(out, want, rtol=1e-5)
    d_state, dx = vjp(probe)
    dx_want, dscale_want = want_vjp(probe)
    np.testing.assert_allclose(dx, dx_want, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(d_state["scale"][...], dscale_want, rtol=1e-4, atol=1e-6)
    assert sorted(k.shape for k in jax.tree.leaves(vjp)) == sorted([(16,), x.shape])


def test_benchmark_rows_of_one_run_share_the_best_matmul_of_each_dtype():
    def result(dtype, tflops, samples):
        return {"dtype": dtype, "tflops": tflops, "peak_samples": samples, "datasheet_peak": None}

    rows = benchmark.with_peaks(
        [
            result("float32", 0.3, [0.40e12, 0.45e12]),
            result("float32", 0.2, [0.50e12]),
            result("bfloat16", 0.4, [0.80e12]),
        ],
        "cpu",
    )
    assert [r["mfu"] for r in rows] == pytest.approx([0.6, 0.4, 0.5])
    assert rows[0]["peak"].startswith("0.5 TFLOP/s (best of 3 2048^3 float32 matmuls")
    assert rows[2]["peak"].startswith("0.8 TFLOP/s (best of 1 2048^3 bfloat16 matmuls")


def test_profile_sums_device_stream_time_by_kind_and_op():
    """A GPU trace's kernels are read from its stream threads only (the "XLA Ops" thread
    repeats them), classed by name, and divided over the traced steps."""
    meta = [
        {"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/device:GPU:0"}},
        {"ph": "M", "name": "process_name", "pid": 7, "args": {"name": "/host:CPU"}},
        {"ph": "M", "name": "thread_name", "pid": 1, "tid": 14, "args": {"name": "Stream #14"}},
        {"ph": "M", "name": "thread_name", "pid": 1, "tid": 2, "args": {"name": "XLA Ops"}},
    ]
    kernels = [
        ("nvjet_sm90_tst_128x160", 600.0),
        ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop", 300.0),
        ("loop_multiply_fusion", 80.0),
        ("memcpy128", 20.0),
        ("nvjet_sm90_tst_128x160", 200.0),
    ]
    events = [
        {"ph": "X", "pid": 1, "tid": 14, "name": n, "dur": d, "ts": 0} for n, d in kernels
    ] + [{"ph": "X", "pid": 1, "tid": 2, "name": "fusion.1", "dur": 999.0, "ts": 0}]
    ops = profile_step.device_ops({"traceEvents": meta + events})
    assert sorted(us for _, _, us in ops) == sorted(d for _, d in kernels)
    text = profile_step.summarize(ops, steps=2, wall_s=0.0012, top=3)
    assert "device busy 0.6 ms (100% of the step)" in text
    assert "| matmul | 0.40 | 66.7% |" in text
    assert "| attention | 0.15 | 25.0% |" in text
    assert "| copy | 0.01 | 1.7% |" in text
    assert "| nvjet_sm90_tst_128x160 | matmul | 0.40 | 66.7% |" in text


def test_profile_step_runs_a_config_end_to_end(capsys):
    tiny = ["--config.model.d_model=32", "--config.model.num_layers=1", "--config.data.seq_len=16"]
    config = f"--config={REPO_ROOT / 'configs/default.py'}"
    assert profile_step.main([config, *tiny, "--steps=1", "--warmup=1", "--top=3"]) == 0
    out = capsys.readouterr().out
    assert "device busy" in out and "| kind | ms/step | share of busy |" in out
    assert ".trace.json.gz" in out


def test_benchmark_rows_name_the_commit_given_where_the_history_is_missing(monkeypatch):
    assert benchmark.git_commit() != "unknown"  # this checkout has its history
    monkeypatch.setenv("JAXFORMER_COMMIT", "abc1234")
    assert benchmark.git_commit() == "abc1234"


def _equations(jaxpr, primitive: str):
    """Every equation of ``primitive`` in a jaxpr and the jaxprs nested in its equations."""
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == primitive:
            yield eqn
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else [value]:
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    yield from _equations(inner, primitive)


def test_tied_logits_gradient_is_autodiffs_in_float32_and_runs_bf16_products_in_bf16():
    """The tied vocabulary projection: exactly autodiff's gradient in float32; in bf16 its
    backward products take bf16 operands (autodiff's took the float32 cotangent, which
    made them float32 products), with float32 results close to the float32 gradient."""
    kx, kt, kg = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, (2, 5, 16))
    table = jax.random.normal(kt, (40, 16)) * 0.3
    probe = jax.random.normal(kg, (2, 5, 40))

    def loss(f, x, table):
        return jnp.sum(f(x, table) * probe)

    def plain(x, table):
        return jnp.einsum("bld,vd->blv", x, table, preferred_element_type=jnp.float32)

    got = jax.grad(functools.partial(loss, tied_logits), argnums=(0, 1))(x, table)
    want = jax.grad(functools.partial(loss, plain), argnums=(0, 1))(x, table)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-6)

    xb, tb = x.astype(jnp.bfloat16), table.astype(jnp.bfloat16)
    grad = jax.grad(functools.partial(loss, tied_logits), argnums=(0, 1))
    dots = list(_equations(jax.make_jaxpr(grad)(xb, tb).jaxpr, "dot_general"))
    assert len(dots) == 3  # the forward product and the two backward ones
    operand_dtypes = {str(v.aval.dtype) for e in dots for v in e.invars}
    assert operand_dtypes == {"bfloat16"}, operand_dtypes
    gx, gt = grad(xb, tb)
    assert gx.dtype == jnp.bfloat16 and gt.dtype == jnp.bfloat16
    np.testing.assert_allclose(gx.astype(np.float32), want[0], rtol=5e-2, atol=5e-2)
    np.testing.assert_allclose(gt.astype(np.float32), want[1], rtol=5e-2, atol=5e-2)
