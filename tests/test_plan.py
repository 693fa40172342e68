"""``jaxformer plan`` on 8 simulated CPU devices: its memory figures are the compiled step's,
and its collective bytes are the ones an analytic count of each layout predicts."""

import json
import math
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from jaxformer import hlo, parallel, step_plan
from jaxformer.cli import main
from jaxformer.train.optim import make_optimizer
from jaxformer.train.step import abstract_state, init_state, jit_steps

# Every sharded dimension divides by 8; two scanned layers of 7 kernels each.
OVERRIDES = {
    "model.vocab_size": 128,
    "model.d_model": 64,
    "model.num_heads": 8,
    "model.d_ff": 128,
    "train.global_batch": 16,
}
LAYERS = 2
KERNELS_PER_LAYER = 7  # q, k, v, o, gate, up, down
CLI_OVERRIDES = [f"--config.{k}={v}" for k, v in {**OVERRIDES, "data.seq_len": 16}.items()]


def _config(make_config, mesh, **extra):
    axes = dict(zip(("data", "fsdp", "tensor"), mesh, strict=True))
    return make_config({**OVERRIDES, **{f"mesh.{k}": v for k, v in axes.items()}, **extra})


@pytest.fixture(scope="module")
def planned(make_config):
    """planned(mesh, **overrides) -> (config, plan), compiled once per distinct config."""
    cache = {}

    def get(mesh, **extra):
        cfg = _config(make_config, mesh, **extra)
        key = cfg.to_json(sort_keys=True)
        if key not in cache:
            cache[key] = step_plan.plan(cfg)
        return cfg, cache[key]

    return get


def _mesh(cfg):
    return parallel.make_mesh({axis: cfg.mesh[axis] for axis in parallel.MESH_AXES})


def _full_bytes(tree):
    return sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(tree))


def _param_bytes(cfg):
    """Full (unsharded) bytes of all parameters, of the fsdp-sharded ones, and of the
    token embedding, from the abstract state's shardings."""
    tx = make_optimizer(cfg.optimizer, cfg.train.steps, cfg.model.d_model)
    _, state, _ = abstract_state(cfg, tx, _mesh(cfg), parallel.DEFAULT_RULES)
    flat = {"/".join(map(str, p)): v.get_value() for p, v in nnx.to_flat_state(state.params)}
    fsdp = {k: v for k, v in flat.items() if "fsdp" in jax.tree.leaves(tuple(v.sharding.spec))}
    return _full_bytes(list(flat.values())), _full_bytes(list(fsdp.values())), flat["embed"]


def _non_scalar(collectives, kind):
    """Bytes per step of a kind's operands that are not scalars (scalars are the loss
    statistics and the gradient norm's partial sums)."""
    return sum(
        hlo.array_bytes(shape) * c.executions
        for c in collectives
        if c.kind == kind
        for shape in c.shapes
        if not shape.endswith("[]")
    )


# -- memory ----------------------------------------------------------------------------------


def test_memory_is_the_compiled_steps_and_state_bytes_are_the_shards(planned, make_batch):
    cfg, got = planned((1, 8, 1))

    # The same step, compiled independently on a real (allocated) state and batch.
    mesh = _mesh(cfg)
    rules = parallel.DEFAULT_RULES
    tx = make_optimizer(cfg.optimizer, cfg.train.steps, cfg.model.d_model)
    graphdef, state, shardings = init_state(cfg, tx, mesh, rules)
    batch = jax.device_put(make_batch(16, 16, 128), parallel.batch_sharding(mesh, rules))
    train, _ = jit_steps(cfg, graphdef, tx, mesh, rules, shardings)
    stats = train.lower(state, batch).compile().memory_analysis()
    for key, field in step_plan.MEMORY_FIELDS.items():
        assert got.memory[key] == getattr(stats, field), key

    # Parameter and optimizer bytes: what device 0 actually holds of the allocated state.
    device = jax.devices()[0]

    def held(tree):
        return sum(
            s.data.nbytes
            for leaf in jax.tree.leaves(tree)
            for s in leaf.addressable_shards
            if s.device == device
        )

    assert got.param_bytes == held(state.params)
    assert got.opt_state_bytes == held(state.opt_state)
    assert got.other_state_bytes == held((state.step, state.rng, state.guard))
    assert got.batch_bytes == held(batch)
    # FSDP: each device holds an eighth of every kernel and all of each norm scale.
    full, fsdp_bytes, _ = _param_bytes(cfg)
    assert got.param_bytes == fsdp_bytes // 8 + (full - fsdp_bytes)
    # The compiled step's arguments are exactly the state and the batch shards.
    assert got.memory["argument"] == (
        got.param_bytes + got.opt_state_bytes + got.other_state_bytes + got.batch_bytes
    )
    # The train step donates its state, so XLA writes the new state over the old.
    assert got.memory["alias"] >= got.param_bytes + got.opt_state_bytes
    assert (
        got.memory_total
        == sum(got.memory[k] for k in ("argument", "output", "temp"))
        - (got.memory["alias"])
        + got.memory["generated_code"]
    )
    assert got.params == sum(math.prod(v.shape) for v in jax.tree.leaves(state.params))


# -- collectives -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("scan_layers", "remat", "gathers"),
    [
        # Scanned layers: the forward loop gathers each layer's kernels, and the backward
        # loop gathers them again (with remat=full, the recomputed forward and the backward
        # share that one gather: XLA CSEs them within the backward loop body).
        (True, "none", 2),
        (True, "full", 2),
        # Unrolled layers: XLA keeps each forward gather alive for the backward pass, so
        # kernels are gathered once per step (and all of them are whole on every device at
        # the peak, the memory FSDP was meant to save).
        (False, "none", 1),
    ],
)
def test_fsdp_collectives_match_the_analytic_count(planned, scan_layers, remat, gathers):
    """fsdp=8, tied embeddings. The analytic count per device per step, with K the full
    bytes of the layers' kernels, E those of the token embedding (vocab x embed, also the
    output head) and P those of every parameter:

    - all-gather: gathers x K + E. The embedding is gathered once, outside the layer loops,
      and reused by the lookup, the logits and both backward uses;
    - gradient reduction: P + E. On CPU XLA does not form reduce-scatters: each gradient is
      all-reduced whole, then each device slices its shard (GPU's reduce-scatter creator
      pass turns that pattern into a reduce-scatter of the same input bytes). The tied
      embedding's two gradients, from the lookup and from the logits, are reduced
      separately before they are added, hence the extra E. Norm scales are replicated, so
      their gradients are all-reduced on any backend.
    """
    cfg, got = planned((1, 8, 1), **{"model.scan_layers": scan_layers, "model.remat": remat})
    full, fsdp_bytes, embed = _param_bytes(cfg)
    embed_bytes = _full_bytes(embed)
    kernels = fsdp_bytes - embed_bytes
    assert kernels == LAYERS * 4 * (
        3 * 64 * 128 + 4 * 64 * 64
    )  # per layer: gate, up, down 64x128; q, k, v, o 64x64

    totals = got.totals()
    assert totals["all-gather"]["bytes"] == gathers * kernels + embed_bytes
    assert totals["all-gather"]["count"] == gathers * LAYERS * KERNELS_PER_LAYER + 1
    assert totals["reduce-scatter"] == {"count": 0, "bytes": 0, "sent": 0}
    assert _non_scalar(got.collectives, "all-reduce") == full + embed_bytes
    assert {c.group_size for c in got.collectives} == {8}
    if scan_layers:
        # Inside the layer loops, each collective runs once per layer.
        in_loops = [c for c in got.collectives if c.executions == LAYERS]
        assert sum(c.kind == "all-gather" for c in in_loops) == 2 * KERNELS_PER_LAYER
    assert not got.unknown_trip_counts


def test_data_parallel_all_reduces_the_parameter_bytes(planned):
    # Untied embeddings: every parameter has one gradient, all-reduced once over data=8.
    cfg, got = planned((8, 1, 1), **{"model.tie_embeddings": False})
    full, _, _ = _param_bytes(cfg)
    totals = got.totals()
    assert _non_scalar(got.collectives, "all-reduce") == full
    assert got.param_bytes == full  # replicated
    for kind in ("all-gather", "reduce-scatter", "all-to-all", "collective-permute"):
        assert totals[kind]["count"] == 0, kind
    # A ring all-reduce over 8 devices sends 2 x 7/8 of the buffer from each device.
    assert totals["all-reduce"]["sent"] == pytest.approx(totals["all-reduce"]["bytes"] * 1.75, 1)


def test_microbatches_repeat_the_gathers_and_reductions(planned):
    """Gradient accumulation runs the whole forward and backward once per microbatch, so
    FSDP gathers (and reduces gradients) once per microbatch: the loop nest's trip counts
    multiply."""
    cfg, one = planned((1, 8, 1))
    _, two = planned((1, 8, 1), **{"train.microbatches": 2})
    _, fsdp_bytes, embed = _param_bytes(cfg)
    kernels = fsdp_bytes - _full_bytes(embed)
    assert two.totals()["all-gather"]["bytes"] == one.totals()["all-gather"]["bytes"] + 2 * kernels
    assert max(c.executions for c in two.collectives) == 2 * LAYERS


# A hand-written module: an async all-gather, a tuple all-reduce, a collective-permute, an
# all-to-all over every device, and a reduce-scatter inside a loop (3 trips) inside a loop
# (2 trips).
HLO = """\
HloModule test, entry_computation_layout={(f32[8,4]{1,0}, bf16[16]{0})->f32[8,4]{1,0}}

%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %sum = f32[] add(%a, %b)
}

%cond (p.1: (s32[], f32[8,4])) -> pred[] {
  %p.1 = (s32[], f32[8,4]{1,0}) parameter(0)
  ROOT %c = pred[] constant(true)
}

%inner_body (p: (s32[], f32[8,4])) -> (s32[], f32[8,4]) {
  %p = (s32[], f32[8,4]{1,0}) parameter(0)
  %x = f32[8,4]{1,0} get-tuple-element(%p), index=1
  %rs = f32[2,4]{1,0} reduce-scatter(%x), channel_id=1, replica_groups=[2,4]<=[8], dimensions={0}, to_apply=%add
  %i = s32[] get-tuple-element(%p), index=0
  ROOT %t = (s32[], f32[8,4]{1,0}) tuple(%i, %x)
}

%outer_body (q: (s32[], f32[8,4])) -> (s32[], f32[8,4]) {
  %q = (s32[], f32[8,4]{1,0}) parameter(0)
  ROOT %w = (s32[], f32[8,4]{1,0}) while(%q), condition=%cond, body=%inner_body, backend_config={"known_trip_count":{"n":"3"}}
}

ENTRY %main (arg: f32[8,4], arg2: bf16[16]) -> f32[8,4] {
  %arg = f32[8,4]{1,0} parameter(0)
  %arg2 = bf16[16]{0} parameter(1)
  %s = f32[] constant(0)
  %zero = s32[] constant(0)
  %ags = (bf16[16]{0}, bf16[128]{0}) all-gather-start(%arg2), channel_id=2, replica_groups={{0,1,2,3,4,5,6,7}}, dimensions={0}
  %agd = bf16[128]{0} all-gather-done(%ags)
  %ar = (f32[8,4]{1,0}, /*index=1*/f32[]) all-reduce(%arg, %s), channel_id=3, replica_groups={{0,1},{2,3},{4,5},{6,7}}, to_apply=%add
  %cps = (f32[8,4]{1,0}, f32[8,4]{1,0}, u32[], u32[]) collective-permute-start(%arg), channel_id=4, source_target_pairs={{0,1},{1,0}}
  %cpd = f32[8,4]{1,0} collective-permute-done(%cps)
  %init = (s32[], f32[8,4]{1,0}) tuple(%zero, %arg)
  %loop = (s32[], f32[8,4]{1,0}) while(%init), condition=%cond, body=%outer_body, backend_config={"known_trip_count":{"n":"2"}}
  %a2a = f32[8,4]{1,0} all-to-all(%arg), channel_id=5, replica_groups={}, dimensions={0}
  ROOT %r = f32[8,4]{1,0} get-tuple-element(%loop), index=1
}
"""  # noqa: E501 (HLO is printed one instruction per line)


def test_collectives_parser_counts_bytes_groups_and_loop_trips():
    found, unknown = hlo.collectives(HLO, num_devices=8)
    by_kind = {c.kind: c for c in found}
    assert sorted(by_kind) == sorted(hlo.COLLECTIVE_KINDS) and len(found) == 5
    assert unknown == 0
    gather = by_kind["all-gather"]  # output bytes, from the matching all-gather-done
    assert (gather.shapes, gather.bytes, gather.group_size) == (("bf16[128]",), 256, 8)
    assert gather.sent_per_step == 224  # 7/8 of the gathered buffer
    reduce = by_kind["all-reduce"]  # operand bytes, tuple operands summed
    assert (reduce.shapes, reduce.bytes, reduce.group_size) == (("f32[8,4]", "f32[]"), 132, 2)
    assert reduce.sent_per_step == 132  # 2 x 1/2 of the buffer
    scatter = by_kind["reduce-scatter"]  # input bytes, inside two loops
    assert (scatter.bytes, scatter.group_size, scatter.executions) == (128, 4, 6)
    assert scatter.bytes_per_step == 768
    permute = by_kind["collective-permute"]  # the data operand only, sent whole
    assert (permute.bytes, permute.sent_per_step) == (128, 128)
    assert by_kind["all-to-all"].group_size == 8  # empty replica_groups: every device

    # Without XLA's trip count the loop counts once, and the plan says so.
    found, unknown = hlo.collectives(HLO.replace('"n":"2"', '"m":"2"'), num_devices=8)
    assert unknown == 1
    assert {c.kind: c.executions for c in found}["reduce-scatter"] == 3


def test_array_bytes():
    assert hlo.array_bytes("f32[64,8,8]") == 64 * 8 * 8 * 4
    assert hlo.array_bytes("bf16[3]") == 6
    assert hlo.array_bytes("pred[5]") == 5
    assert hlo.array_bytes("s4[3]") == 2
    assert hlo.array_bytes("f32[]") == 4
    assert hlo.array_bytes("f8e4m3fn[10]") == 10


# -- the command -----------------------------------------------------------------------------


def test_cli_plan_json(repo_root, capsys):
    argv = ["plan", "--config", str(repo_root / "configs/default.py"), "--devices", "8", "--json"]
    assert main([*argv, *CLI_OVERRIDES, "--config.mesh.fsdp=8"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["mesh"] == {**dict.fromkeys(parallel.MESH_AXES, 1), "fsdp": 8}
    assert out["num_devices"] == 8 and out["platform"] == "cpu"
    assert out["collective_totals"]["all-gather"]["count"] == 2 * 4 * KERNELS_PER_LAYER + 1
    memory = out["memory"]
    assert memory["total"] == (
        memory["argument"] + memory["output"] - memory["alias"] + memory["temp"]
        + memory["generated_code"]
    )  # fmt: skip
    assert out["train_flops_per_step"] > 0 and out["compile_s"] > 0


def test_cli_plan_mesh_that_does_not_fit_the_devices_is_a_config_error(repo_root, capsys):
    config = str(repo_root / "configs/default.py")
    assert main(["plan", "--config", config, "--devices", "4", "--config.mesh.data=8"]) == 2
    err = capsys.readouterr().err
    # config.validate's message, naming the mesh and the keys to change.
    assert "config error" in err and "'data': 8, 'fsdp': 1," in err and "} has 8 devices" in err
    assert "4" in err.split("has 8 devices")[1] and "mesh.data" in err
    assert main(["plan", "--config", config, "--devices", "64"]) == 2
    assert "--devices 64 asks for more devices than the 8" in capsys.readouterr().err


def test_cli_plan_simulates_the_devices_it_is_asked_for(repo_root, tmp_path):
    """A fresh process: --devices must take effect although jaxformer.cli has imported jax."""
    env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": ""}
    command = [sys.executable, "-m", "jaxformer.cli", "plan", "--config", "configs/default.py"]
    result = subprocess.run(
        [*command, "--devices", "4", "--config.mesh.tensor=4", *CLI_OVERRIDES],
        cwd=repo_root,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "'fsdp': 1," in out and "'tensor': 4} over 4 cpu device(s)" in out
    for row in ("parameters", "optimizer state", "temporaries", "total", "all-reduce"):
        assert row in out
    assert "model FLOPs per step" in out
    assert np.isfinite(float(out.split("compiled in ")[1].split(" s")[0]))


def test_pipeline_plan_reports_bubble_and_1f1b_bounds_activation_memory(planned) -> None:
    """Per-stage activation memory is one device's temporaries: at a fixed microbatch size,
    GPipe's grow with the number of microbatches, 1F1B's do not."""
    temps = {}
    for schedule in ("gpipe", "1f1b"):
        for microbatches in (2, 8):
            _, got = planned(
                (4, 1, 1), **{"mesh.stage": 2, "train.microbatches": microbatches},
                **{"train.pipeline_schedule": schedule, "train.global_batch": 8 * microbatches},
            )  # fmt: skip
            temps[schedule, microbatches] = got.memory["temp"]
            bubble = 1 / (microbatches + 1)
            assert got.bubble_fraction == pytest.approx(bubble)
            assert f"bubble {bubble:.1%}" in got.table()
            assert got.to_json()["bubble_fraction"] == pytest.approx(bubble)
    assert temps["gpipe", 8] > 1.5 * temps["gpipe", 2]
    assert temps["1f1b", 8] < 1.2 * temps["1f1b", 2]
    assert temps["1f1b", 8] < temps["gpipe", 8]
