"""tools/collectives.py: the analytic count of collective bytes against a hand count, and the
compiled step's bytes for fsdp=2 and tensor=2 against it, excess included, on a tiny decoder
(TINY_OVERRIDES: 2 layers, d_model 32, 4 heads, d_ff 64 SwiGLU, vocab 128, tied, float32,
4 x 16 tokens)."""

import sys

import pytest
from conftest import REPO_ROOT

from jaxformer import hlo, step_plan

sys.path.insert(0, str(REPO_ROOT / "tools"))
import collectives  # noqa: E402

F4 = 4  # bytes per float32
LAYERS, D, F, V, ROWS, LENGTH = 2, 32, 64, 128, 4, 16
K = LAYERS * (4 * D * D + 3 * D * F) * F4  # q, k, v, o and gate, up, down
E = V * D * F4  # the tied token table
R = (2 * LAYERS + 1) * D * F4  # two norm scales per layer and the final one
LEAVES = 7 + 1  # sharded: 7 stacked kernels and the table
HALF = 1 / 2  # (n-1)/n for n = 2


@pytest.fixture(scope="module")
def measured(make_config):
    """measured(layout) -> {role: Row} for layout = 2 devices, compiled once per layout."""
    cache: dict[str, dict[str, collectives.Row]] = {}

    def get(layout: str) -> dict[str, collectives.Row]:
        if layout not in cache:
            rows = collectives.measure(make_config(), layout, 2)
            cache[layout] = {row.role: row for row in rows}
        return cache[layout]

    return get


def test_sizes_and_minimum_are_the_hand_count(make_config):
    cfg = make_config()
    s = collectives.sizes(cfg, {"data": 1, "fsdp": 2, "tensor": 1})
    assert (s.kernels, s.table, s.head, s.replicated) == (K, E, 0, R)
    assert (s.sharded_leaves, s.rows) == (LEAVES, ROWS // 2)  # fsdp splits the batch
    assert s.activation == ROWS // 2 * LENGTH * D * F4
    fsdp = {r.name: r for r in collectives.roles("fsdp", 2, s)}
    assert fsdp["weights all-gather"].minimum == HALF * (2 * K + E)
    assert fsdp["gradient reduction"].minimum == HALF * (K + E) + 2 * HALF * R
    # XLA:CPU: everything all-reduced (2f), the tied table's two gradients separately.
    assert fsdp["gradient reduction"].expected == 2 * HALF * (K + E + E + R)
    assert fsdp["scalars"].minimum == 2 * HALF * F4 * 5
    assert fsdp["scalars"].expected == 2 * HALF * F4 * (4 + 2 * LEAVES)

    s = collectives.sizes(cfg, {"data": 1, "fsdp": 1, "tensor": 2})
    a = ROWS * LENGTH * D * F4  # tensor does not split the batch
    assert (s.activation, s.token_stat, s.sharded_leaves) == (a, ROWS * LENGTH * F4, LEAVES)
    tensor = {r.name: r for r in collectives.roles("tensor", 2, s)}
    # Megatron: 2 all-reduces per layer forward, 2 backward, and the head's input gradient.
    assert tensor["activation all-reduce"].minimum == 2 * HALF * a * (4 * LAYERS + 1)
    assert tensor["activation all-reduce"].expected == 2 * HALF * a * (7 * LAYERS + 1)
    assert tensor["table all-gather"].minimum == HALF * E  # E < 2A: gathering is cheaper
    assert tensor["loss statistics"].minimum == 2 * HALF * 3 * ROWS * LENGTH * F4

    s = collectives.sizes(cfg, {"data": 2, "fsdp": 1, "tensor": 1})
    data = {r.name: r for r in collectives.roles("data", 2, s)}
    assert data["gradient reduction"].minimum == 2 * HALF * (K + E + R)


def test_fsdp_compiled_bytes(measured):
    got = measured("fsdp")
    assert set(got) == {"weights all-gather", "gradient reduction", "scalars"}  # nothing else
    # Gathers are at the minimum: kernels forward and backward, the table once.
    gather = got["weights all-gather"]
    assert gather.kinds == {"all-gather": 2 * LAYERS * 7 + 1}
    assert gather.compiled == pytest.approx(gather.minimum, rel=0.1)
    # Gradients: all-reduced (no reduce-scatter on XLA:CPU), so twice the ring bytes of the
    # reduce-scatter of K + E, plus the tied table's second reduction and the norm scales.
    grads = got["gradient reduction"]
    assert set(grads.kinds) == {"all-reduce"}
    reduce_scatter = HALF * (K + E)
    assert grads.compiled == pytest.approx(2 * reduce_scatter + 2 * HALF * (E + R), rel=0.1)
    assert all(row.explained for row in got.values())


def test_tensor_compiled_bytes(measured):
    got = measured("tensor")
    assert set(got) == {"activation all-reduce", "table all-gather", "loss statistics", "scalars"}
    a = ROWS * LENGTH * D * F4
    acts = got["activation all-reduce"]
    # 2 forward + 5 backward (q, k, v, gate, up separately) per layer, 1 for the head.
    assert acts.compiled == pytest.approx(2 * HALF * a * (7 * LAYERS + 1), rel=0.1)
    assert acts.compiled == pytest.approx(acts.minimum * 15 / 9, rel=0.1)
    for role in ("table all-gather", "loss statistics"):
        assert got[role].compiled == pytest.approx(got[role].minimum, rel=0.1), role
    assert all(row.explained for row in got.values())


def test_backward_all_reduces_trace_to_the_column_parallel_kernels(make_config):
    """The excess of tensor parallelism, read off the HLO's stack frames: per layer, the
    backward pass all-reduces 3 input gradients from Attention._qkv and 2 from the MLP."""
    cfg, _ = collectives.layout_config(make_config(), "tensor", 2)
    found = step_plan.plan(cfg, step_plan.plan_devices(2)).collectives
    backward = [
        fns[-2]
        for c in found
        if c.kind == "all-reduce"
        for shape, op, fns in zip(c.shapes, c.op_names, c.functions, strict=True)
        if shape == f"f32[{ROWS},{LENGTH},{D}]" and "while/body" in op and "transpose(" in op
        for _ in range(c.executions)
    ]
    expected = ["Attention._qkv"] * 3 * LAYERS + ["MLP.__call__"] * 2 * LAYERS
    assert sorted(backward) == sorted(expected)


def test_stack_frames_of_a_collective():
    """Collective.op_names and functions: the operand's producer and its jaxformer frames
    (the XLA 0.10.2 tables print a frame's parent one above its id)."""
    root = hlo._JAXFORMER_DIR
    hlo_text = f"""\
HloModule m

FileNames
1 "/usr/lib/python3/site.py"
2 "{root}model/layers.py"
3 "{root}step_plan.py"

FunctionNames
1 "<module>"
2 "Attention.__call__"
3 "Dense.__call__"
4 "plan"

FileLocations
1 {{file_name_id=1 function_name_id=1 line=1 end_line=1 column=1 end_column=1}}
2 {{file_name_id=2 function_name_id=2 line=10 end_line=10 column=1 end_column=1}}
3 {{file_name_id=2 function_name_id=3 line=20 end_line=20 column=1 end_column=1}}
4 {{file_name_id=3 function_name_id=4 line=30 end_line=30 column=1 end_column=1}}

StackFrames
1 {{file_location_id=1 parent_frame_id=1}}
2 {{file_location_id=4 parent_frame_id=2}}
3 {{file_location_id=2 parent_frame_id=3}}
4 {{file_location_id=3 parent_frame_id=4}}

%add (a: f32[], b: f32[]) -> f32[] {{
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %sum = f32[] add(%a, %b)
}}

ENTRY %main (x: f32[8]) -> f32[8] {{
  %x = f32[8]{{0}} parameter(0)
  %y = f32[8]{{0}} multiply(%x, %x), metadata={{op_name="jit(f)/transpose(jvp())/mul" stack_frame_id=4}}
  ROOT %r = f32[8]{{0}} all-reduce(%y), replica_groups={{}}, to_apply=%add, metadata={{op_name="jit(f)/psum"}}
}}
"""  # noqa: E501 (HLO is printed one instruction per line)
    (found,), _ = hlo.collectives(hlo_text, num_devices=2)
    assert found.op_names == ("jit(f)/transpose(jvp())/mul",)  # the operand's, not the psum's
    # site.py is not jaxformer's, step_plan.py is left out: only the model's frames remain.
    assert found.functions == (("Attention.__call__", "Dense.__call__"),)


def test_command_writes_the_report(make_config, tmp_path):
    out = tmp_path / "collectives.md"
    tiny = [
        "--config.model.d_model=32", "--config.model.num_layers=2", "--config.model.num_heads=4",
        "--config.model.d_ff=64", "--config.model.vocab_size=128", "--config.model.max_len=16",
        "--config.data.seq_len=16", "--config.train.global_batch=4",
    ]  # fmt: skip
    assert collectives.main(["--devices=2", "--layouts=data", f"--write={out}", *tiny]) == 0
    text = out.read_text()
    assert text.startswith("Generated by `python tools/collectives.py --devices=2")
    assert "| data | 2 | gradient reduction | " in text and "| yes |" in text
