"""Bytes that FSDP, tensor and data parallelism move per train step: the compiled program's
collectives against the analytic minimum, with every excess attributed to its cause.

    python tools/collectives.py                        # fsdp, tensor, data on 2, 4 and 8 devices
    python tools/collectives.py --devices=8 --layouts=tensor
    python tools/collectives.py --write=docs/collectives.md
    python tools/collectives.py --config.model.d_model=512   # any config override

Each layout is one mesh axis of n simulated CPU devices; ``jaxformer.step_plan`` compiles
the train step for it and ``jaxformer.hlo`` parses the optimized HLO. Every buffer a
collective moves is traced to the model code that made it (``Collective.op_names``/
``functions``) and given a role (weight gathers, gradient reduction, activation
all-reduces...). Bytes are what each device
sends per step under ring algorithms (``Collective.sent_per_step``: (n-1)/n of the buffer
for all-gather and reduce-scatter, 2(n-1)/n for all-reduce), for the compiled program and
for the analytic minimum alike. A third column is the model of what XLA:CPU compiles, the
minimum plus the excess each role's note explains; the command exits with status 1 when a
role's compiled bytes are more than 10% away from it (an excess nobody has explained).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import math
import sys
from collections.abc import Sequence
from pathlib import Path

import ml_collections

from jaxformer import hlo, step_plan
from jaxformer.config import MESH_AXES, ConfigError, load_config

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = "configs/default.py"
# Parameters dominate: 4.2M in the layers (16 MiB), a 384 x 256 token table, 16 x 256 tokens.
# Every sharded dimension (8 heads, d_ff 1024, vocab 384, d_model 256) divides by 8.
SHAPE = {
    "model.d_model": 256,
    "model.num_heads": 8,
    "model.d_ff": 1024,
    "model.num_layers": 4,
}
LAYOUTS = ("fsdp", "tensor", "data")
TOLERANCE = 0.10  # a role is explained when compiled bytes are this close to the model
STAT_SCALARS = 4  # the loss sum and the weight, nll and correct sums (train.step)


# -- sizes -----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Sizes:
    """Full (unsharded) bytes of what a train step can communicate, per device where the
    batch enters. The analytic formulas are written in these."""

    num_layers: int  # N
    kernels: int  # K: every scanned layer's matmul kernels
    replicated: int  # R: parameters no mesh axis shards (norm scales)
    table: int  # E: the token embedding
    head: int  # H: the untied output head (0 when tied to the table)
    tied: bool
    activation: int  # A: one [rows, length, d_model] activation of a device's rows
    token_stat: int  # T: one float32 per token of a device's rows, [rows, length]
    sharded_leaves: int  # parameter leaves split over the axis (one grad-norm partial each)
    attn_inputs: int  # column-parallel kernels reading the attention input (q, k, v)
    mlp_inputs: int  # column-parallel kernels reading the MLP input (gate, up)
    rows: int  # per device
    length: int
    d_model: int


def sizes(cfg: ml_collections.ConfigDict, mesh_shape: dict[str, int]) -> Sizes:
    """Sizes from the abstract state's shapes and shardings over ``mesh_shape``."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from jaxformer import parallel
    from jaxformer.train.setup import build

    num_devices = math.prod(mesh_shape.values())
    cfg = ml_collections.ConfigDict(cfg.to_dict())
    for axis in parallel.MESH_AXES:
        cfg.mesh[axis] = mesh_shape.get(axis, 1)  # the layout measured, whatever cfg says
    state = build(cfg, devices=jax.devices()[:num_devices], abstract=True).state
    kernels = replicated = table = head = sharded = 0
    splits = math.prod(mesh_shape[axis] for axis in ("fsdp", "tensor"))
    for path, variable in nnx.to_flat_state(state.params):
        value = variable.get_value()
        size = math.prod(value.shape) * jnp.dtype(value.dtype).itemsize
        is_sharded = any(axis is not None for axis in value.sharding.spec)
        sharded += is_sharded
        if path == ("embed",):
            table += size
        elif path[0] == "lm_head":
            head += size
        elif path[0] == "blocks" and path[-1] == "kernel":
            kernels += size
        elif not is_sharded:
            replicated += size
            continue
        else:
            raise ValueError(f"no formula covers the sharded parameter {path}")
        if splits > 1 and not is_sharded:  # the formulas take every matrix to be split
            raise ValueError(f"{path} {value.shape} is not split over the mesh {mesh_shape}")
    m = cfg.model
    rows = cfg.train.global_batch // parallel.batch_shards(mesh_shape)
    tokens = rows * cfg.data.seq_len
    return Sizes(
        num_layers=m.num_layers,
        kernels=kernels,
        replicated=replicated,
        table=table,
        head=head,
        tied=m.tie_embeddings,
        activation=tokens * m.d_model * jnp.dtype(m.dtype).itemsize,
        token_stat=tokens * 4,
        sharded_leaves=sharded,
        attn_inputs=3,
        mlp_inputs=2 if m.mlp in ("swiglu", "geglu") else 1,
        rows=rows,
        length=cfg.data.seq_len,
        d_model=m.d_model,
    )


# -- the analytic minimum and the model of XLA:CPU's program ----------------------------------


@dataclasses.dataclass(frozen=True)
class Role:
    """One kind of traffic of a layout: the minimum, what XLA:CPU compiles, and why."""

    name: str
    minimum: float  # ring bytes sent per device per step
    expected: float  # the same for the program XLA:CPU compiles (minimum + explained excess)
    formula: str
    why: str


def roles(layout: str, n: int, s: Sizes) -> list[Role]:
    """The analytic count for ``layout`` over n devices. f = (n-1)/n is what a ring
    all-gather or reduce-scatter sends per byte of its full buffer; all-reduce sends 2f."""
    f = (n - 1) / n
    scalar = 4  # float32
    grad_norm = 2 * s.sharded_leaves * scalar  # one partial per leaf, for each of two norms
    if layout == "fsdp":
        gathered = 2 * s.kernels + s.table + s.head
        scattered = s.kernels + s.table + s.head
        twice = s.table if s.tied else 0
        return [
            Role(
                "weights all-gather",
                f * gathered,
                f * gathered,
                "f (2K + E + H)",
                "minimum (ZeRO-3): each layer's kernels gathered in the forward loop and again "
                "in the backward loop, the table (and head) once, outside the loops",
            ),
            Role(
                "gradient reduction",
                f * scattered + 2 * f * s.replicated,
                2 * f * (scattered + twice + s.replicated),
                "f (K + E + H) reduce-scatter + 2f R all-reduce",
                "2x: XLA:CPU has no reduce-scatter creator, so each sharded gradient is "
                "all-reduced whole and sliced"
                + (
                    "; +E: the tied table's lookup and logits gradients are all-reduced "
                    "separately before they are added (no all-reduce reassociation on CPU)"
                    if s.tied
                    else ""
                ),
            ),
            Role(
                "scalars",
                2 * f * scalar * (STAT_SCALARS + 1),
                2 * f * (scalar * STAT_SCALARS + grad_norm),
                "2f x 4 B x (4 loss sums + 1 norm partial)",
                "the gradient norm is taken twice (the grad_norm metric and "
                "clip_by_global_norm), each all-reducing one partial per sharded leaf",
            ),
        ]
    if layout == "tensor":
        layers = s.num_layers
        per_layer = 2 + s.attn_inputs + s.mlp_inputs  # forward 2, backward one per kernel
        lookup = min(f * s.table, 2 * f * s.activation)
        return [
            Role(
                "activation all-reduce",
                2 * f * s.activation * (4 * layers + 1),
                2 * f * s.activation * (per_layer * layers + 1),
                "2f A (4N + 1)",
                f"{per_layer}N + 1 instead of 4N + 1: in the backward pass the input gradient "
                f"of each column-parallel kernel is all-reduced on its own ({s.attn_inputs} "
                f"for q, k, v; {s.mlp_inputs} for the MLP) rather than their sum, as XLA:CPU "
                "has no all-reduce reassociation",
            ),
            Role(
                "table all-gather",
                lookup,
                f * s.table,
                "min(f E, 2f A)",
                "minimum: the lookup reads a gathered copy of the vocab-sharded table, "
                "cheaper here than all-reducing the looked-up activations (Megatron)"
                if f * s.table <= lookup
                else "the lookup gathers the table, dearer than an all-reduce of the "
                "looked-up activations (Megatron's vocab-parallel embedding) at this shape",
            ),
            Role(
                "loss statistics",
                2 * f * 3 * s.token_stat,
                2 * f * 3 * s.token_stat,
                "2f x 3T",
                "minimum: the max, the sum of exponentials and the target logit over the "
                "vocabulary shards",
            ),
            Role(
                "scalars",
                2 * f * scalar,
                2 * f * grad_norm,
                "2f x 4 B (1 norm partial)",
                "the gradient norm is taken twice (the grad_norm metric and "
                "clip_by_global_norm), each all-reducing one partial per sharded leaf",
            ),
        ]
    if layout == "data":
        params = s.kernels + s.replicated + s.table + s.head
        twice = s.table if s.tied else 0
        return [
            Role(
                "gradient reduction",
                2 * f * params,
                2 * f * (params + twice),
                "2f P",
                "+E: the tied table's lookup and logits gradients are all-reduced "
                "separately before they are added (no all-reduce reassociation on CPU)"
                if s.tied
                else "minimum",
            ),
            Role(
                "scalars",
                2 * f * scalar * STAT_SCALARS,
                2 * f * scalar * STAT_SCALARS,
                "2f x 4 B x 4 loss sums",
                "minimum",
            ),
        ]
    raise ValueError(f"unknown layout {layout!r}; expected one of {LAYOUTS}")


# -- the compiled program --------------------------------------------------------------------


@dataclasses.dataclass
class Compiled:
    """A role's share of the compiled step's collectives."""

    kinds: dict[str, int]  # collective kind -> executions per step
    sent: float  # ring bytes sent per device per step


def classify(layout: str, kind: str, shape: str, functions: tuple[str, ...], s: Sizes) -> str:
    """The role of one buffer of a compiled collective; "unexplained" when none fits."""
    if kind == "all-gather":
        return "table all-gather" if layout == "tensor" else "weights all-gather"
    if kind not in ("all-reduce", "reduce-scatter"):
        return "unexplained"
    if shape.endswith("[]"):
        return "scalars"
    dims = [int(d) for d in shape.split("[", 1)[1].rstrip("]").split(",") if d]
    if layout == "tensor":
        if dims == [s.rows, s.length, s.d_model]:
            return "activation all-reduce"
        if dims[:2] == [s.rows, s.length] and math.prod(dims[2:]) == 1:
            return "loss statistics"
        return "unexplained"
    if any(name.startswith(("Block.", "TokenEmbeddings.", "DecoderLM.")) for name in functions):
        return "gradient reduction"  # a parameter's gradient, from the model's backward pass
    return "unexplained"


def compiled_roles(layout: str, got: step_plan.StepPlan, s: Sizes) -> dict[str, Compiled]:
    """The compiled step's collective bytes, buffer by buffer, summed per role."""
    out: dict[str, Compiled] = {}
    for c in got.collectives:
        seen: set[str] = set()
        sent = c.sent_per_step or 0
        for shape, functions in zip(c.shapes, c.functions, strict=True):
            name = classify(layout, c.kind, shape, functions, s)
            role = out.setdefault(name, Compiled({}, 0.0))
            role.sent += sent * hlo.array_bytes(shape) / c.bytes if c.bytes else 0
            if name not in seen:  # a tuple collective counts once per role it serves
                role.kinds[c.kind] = role.kinds.get(c.kind, 0) + c.executions
                seen.add(name)
    return out


# -- the report ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Row:
    """One role of one layout on n devices, compiled against the analytic count."""

    layout: str
    devices: int
    role: str
    kinds: dict[str, int]
    compiled: float
    minimum: float
    expected: float
    formula: str
    why: str

    @property
    def explained(self) -> bool:
        if self.expected == 0:
            return self.compiled == 0
        return abs(self.compiled / self.expected - 1) <= TOLERANCE


def layout_config(
    base: ml_collections.ConfigDict, layout: str, n: int
) -> tuple[ml_collections.ConfigDict, dict[str, int]]:
    """``base`` with its mesh set to ``layout`` = n and every other axis 1."""
    cfg = copy.deepcopy(base)
    with cfg.unlocked():
        for axis in MESH_AXES:
            cfg.mesh[axis] = n if axis == layout else 1
    return cfg, {axis: cfg.mesh[axis] for axis in ("data", "fsdp", "tensor")}


def measure(base: ml_collections.ConfigDict, layout: str, n: int) -> list[Row]:
    """Compiles the step for ``layout`` over n devices and lines its collectives up against
    the analytic count, role by role."""
    cfg, mesh_shape = layout_config(base, layout, n)
    s = sizes(cfg, mesh_shape)
    got = step_plan.plan(cfg, step_plan.plan_devices(n))
    compiled = compiled_roles(layout, got, s)
    rows = []
    for role in roles(layout, n, s):
        part = compiled.pop(role.name, Compiled({}, 0.0))
        rows.append(
            Row(layout, n, role.name, part.kinds, part.sent, role.minimum, role.expected,
                role.formula, role.why)
        )  # fmt: skip
    for name, part in compiled.items():  # anything no role accounts for
        rows.append(Row(layout, n, name, part.kinds, part.sent, 0.0, 0.0, "-", "not modelled"))
    return rows


def _size(n: float) -> str:
    return step_plan._human(round(n))


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}" if b else "-"


def table(rows: Sequence[Row]) -> str:
    """The Markdown table: per layout, devices and role, compiled against minimum."""
    lines = [
        "| layout | n | traffic | compiled ops | compiled | minimum | ratio | XLA:CPU model "
        "| explained |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ops = ", ".join(f"{count} {kind}" for kind, count in r.kinds.items()) or "none"
        lines.append(
            f"| {r.layout} | {r.devices} | {r.role} | {ops} | {_size(r.compiled)} "
            f"| {_size(r.minimum)} | {_ratio(r.compiled, r.minimum)} | {_size(r.expected)} "
            f"| {'yes' if r.explained else 'NO'} |"
        )
    return "\n".join(lines)


def totals(rows: Sequence[Row]) -> str:
    """One line per layout and device count: all roles together."""
    fields = ("compiled", "minimum", "expected")
    lines = [
        "| layout | n | compiled | minimum | ratio | XLA:CPU model | compiled / model |",
        "|---|---|---|---|---|---|---|",
    ]
    keys = dict.fromkeys((r.layout, r.devices) for r in rows)
    for layout, n in keys:
        part = [r for r in rows if (r.layout, r.devices) == (layout, n)]
        got, low, model = (sum(getattr(r, k) for r in part) for k in fields)
        lines.append(
            f"| {layout} | {n} | {_size(got)} | {_size(low)} | {_ratio(got, low)} "
            f"| {_size(model)} | {_ratio(got, model)} |"
        )
    return "\n".join(lines)


def notes(rows: Sequence[Row]) -> str:
    """Each role's formula and the cause of its excess, once per layout."""
    seen: dict[tuple[str, str], Row] = {}
    for r in rows:
        seen.setdefault((r.layout, r.role), r)
    return "\n".join(
        f"- **{layout} {role}**: minimum {r.formula}; {r.why}."
        for (layout, role), r in seen.items()
    )


def describe(cfg: ml_collections.ConfigDict) -> str:
    m, d, t = cfg.model, cfg.data, cfg.train
    return (
        f"{m.num_layers} layers, d_model {m.d_model}, {m.num_heads} heads, d_ff {m.d_ff} "
        f"({m.mlp}), vocab {m.vocab_size}, {'tied' if m.tie_embeddings else 'untied'} "
        f"embeddings, {m.dtype}; {t.global_batch} x {d.seq_len} tokens per step"
    )


def report(
    cfg: ml_collections.ConfigDict, layouts: Sequence[str], devices: Sequence[int]
) -> tuple[str, list[Row]]:
    """The Markdown report for every layout and device count, and its rows."""
    rows = [row for layout in layouts for n in devices for row in measure(cfg, layout, n)]
    head = f"Model: {describe(cfg)}. Bytes sent per device per step (ring algorithms)."
    return "\n\n".join([head, totals(rows), table(rows), notes(rows)]), rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Override any config key with --config.SECTION.KEY=VALUE (after the shape "
        "this tool sets: " + ", ".join(f"{k}={v}" for k, v in SHAPE.items()) + ").",
    )
    parser.add_argument("--config", default=DEFAULT_CONFIG, help="configs/NAME.py")
    parser.add_argument("--devices", default="2,4,8", help="comma-separated device counts")
    parser.add_argument("--layouts", default=",".join(LAYOUTS), help="of " + ", ".join(LAYOUTS))
    parser.add_argument("--write", default="", help="also write the report to this file")
    args, rest = parser.parse_known_args(argv)
    unknown = [a for a in rest if not a.startswith("--config.")]
    if unknown:
        parser.error(f"unrecognised arguments: {' '.join(unknown)}")
    devices = [int(n) for n in args.devices.split(",")]
    layouts = args.layouts.split(",")
    if bad := [x for x in layouts if x not in LAYOUTS]:
        parser.error(f"unknown layouts {bad}; expected some of {LAYOUTS}")
    step_plan.use_host_devices(max(devices))
    shape = [f"--config.{k}={v}" for k, v in SHAPE.items()]
    try:
        cfg = load_config(args.config, [*shape, *rest])
    except ConfigError as err:
        print(f"collectives: config error: {err}", file=sys.stderr)
        return 2
    text, rows = report(cfg, layouts, devices)
    given = sys.argv[1:] if argv is None else argv
    command = " ".join(["python tools/collectives.py", *given])
    print(text)
    if args.write:
        Path(args.write).write_text(f"Generated by `{command}`.\n\n{text}\n")
    return 0 if all(r.explained for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
