"""``jaxformer plan``: compile the train step for a mesh without running it, and report what
each device holds and what it communicates.

The state is abstract (``ShapeDtypeStruct``s carrying their shardings, from
``train.step.abstract_state``) and the batch is a spec built from the config, so nothing is
allocated and no dataset is opened: a layout for 256 devices can be planned on a laptop
with ``--devices 256`` (simulated CPU devices).

What is reported, per device:

- parameter and optimizer-state bytes: the size of each leaf's shard under its sharding;
- the compiled step's ``memory_analysis()``: argument, output, aliased (donated), temporary
  and generated-code bytes, and their total (arguments + outputs - aliased + temporaries +
  code), which is the peak XLA plans for the step;
- the collectives in the optimized HLO (``compiled.as_text()``), by kind, with the number of
  executions and bytes per step: an instruction inside a loop (scanned layers, microbatches)
  counts once per trip. Bytes follow one convention, the size of the full buffer each
  device holds on the large side of the collective: the output of an all-gather, the input
  of a reduce-scatter, the operands of an all-reduce, all-to-all or collective-permute.
  ``sent`` estimates what each device puts on the wire with ring algorithms over a group of
  n devices: (n-1)/n of that size for all-gather, reduce-scatter and all-to-all, 2(n-1)/n
  for all-reduce, all of it for collective-permute;
- lowering and compile time, and the model FLOPs per step (``jaxformer.flops``).

Everything describes the backend that compiled it: a plan made on simulated CPU devices
shows XLA's CPU pipeline, which (unlike GPU and TPU) never forms reduce-scatters: a
sharded gradient appears as an all-reduce of the whole gradient followed by a slice. See
docs/parallelism.md.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import re
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from jaxformer import flops, parallel
from jaxformer.config import ConfigError, resolve_mesh, validate

COLLECTIVE_KINDS = (
    "all-gather",
    "reduce-scatter",
    "all-reduce",
    "all-to-all",
    "collective-permute",
)
_DEVICE_FLAG = "--xla_force_host_platform_device_count"


# -- devices ---------------------------------------------------------------------------------


def use_host_devices(n: int) -> None:
    """Makes jax start ``n`` simulated CPU devices, for planning a mesh bigger than the machine.

    XLA reads the device count once, when the backend starts (the first jax operation, not
    ``import jax``), so this must run before anything touches a device. If the backend has
    already started (a test session, a notebook), nothing is changed and :func:`plan_devices`
    takes the first ``n`` of the devices that exist.
    """
    if n < 1:
        raise ConfigError(f"--devices must be positive, got {n}")
    from jax._src import xla_bridge  # jax is pinned; there is no public "has it started" query

    if xla_bridge.backends_are_initialized():
        return
    flags = re.sub(rf"{_DEVICE_FLAG}=\S+", "", os.environ.get("XLA_FLAGS", "")).split()
    os.environ["XLA_FLAGS"] = " ".join([*flags, f"{_DEVICE_FLAG}={n}"])
    jax.config.update("jax_platforms", "cpu")


def plan_devices(n: int = 0) -> list[jax.Device]:
    """The first ``n`` devices (all of them for 0); a clear error if there are fewer."""
    devices = jax.devices()
    if n > len(devices):
        raise ConfigError(
            f"--devices {n} asks for more devices than the {len(devices)} "
            f"{devices[0].platform} devices that jax has already started"
        )
    return devices[:n] if n else devices


# -- the batch and the state -----------------------------------------------------------------


def batch_spec(
    cfg: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, rules: parallel.sharding.Rules
) -> dict[str, jax.ShapeDtypeStruct]:
    """The global train batch as shapes: what the data pipeline (``train.loop._dataset``)
    delivers for ``cfg``, keys and lengths per task. Weights are float32, the rest int32."""
    from jaxformer.data import BATCH_KEYS
    from jaxformer.data.seq2seq import ENCODER_KEYS

    length = cfg.data.seq_len
    lengths = {key: length for key in BATCH_KEYS}
    if cfg.model.family in ("encoder_decoder", "t5"):
        lengths |= {key: cfg.data.source_seq_len or length for key in ENCODER_KEYS}
    if cfg.model.get("num_labels", 0) > 0:  # BERT classification: one label per row
        lengths |= {"token_type_ids": length, "targets": 1, "weights": 1}
    elif cfg.data.get("nsp", False):  # BERT pre-training on sentence pairs
        lengths |= {"token_type_ids": length, "nsp_targets": 1, "nsp_weights": 1}
    sharding = parallel.batch_sharding(mesh, rules)
    return {
        key: jax.ShapeDtypeStruct(
            (cfg.train.global_batch, n),
            jnp.float32 if key.endswith("weights") else jnp.int32,
            sharding=sharding,
        )
        for key, n in lengths.items()
    }


def shard_bytes(tree: Any) -> int:
    """Bytes one device holds of a pytree of sharded arrays or ``ShapeDtypeStruct``s: the
    largest shard of each leaf (shards are equal: jaxformer only shards dimensions that
    divide)."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        shape = leaf.sharding.shard_shape(leaf.shape)
        total += math.prod(shape) * jnp.dtype(leaf.dtype).itemsize
    return total


def global_size(tree: Any) -> int:
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree))


# -- collectives in HLO text -----------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Collective:
    """One collective instruction of the compiled step."""

    kind: str  # one of COLLECTIVE_KINDS
    name: str  # HLO instruction name
    computation: str  # the HLO computation it sits in
    shapes: tuple[str, ...]  # the buffers counted, e.g. ("f32[64,8,8]",)
    bytes: int  # per execution, by the convention in the module docstring
    group_size: int | None  # devices taking part (None: not parsed)
    executions: int  # per step: the product of the trip counts of the loops around it
    # Where each buffer of ``shapes`` comes from, for attributing bytes to model code: the
    # JAX op_name of the instruction that made it (the gathered weight's consumer for an
    # all-gather, the operand's producer otherwise; "transpose(...)" marks the backward
    # pass) and the jaxformer functions on its Python stack, outermost first.
    op_names: tuple[str, ...] = ()
    functions: tuple[tuple[str, ...], ...] = ()

    @property
    def bytes_per_step(self) -> int:
        return self.bytes * self.executions

    @property
    def sent_per_step(self) -> int | None:
        """Estimated bytes each device sends per step with ring algorithms."""
        n = self.group_size
        if self.kind == "collective-permute":
            return self.bytes_per_step
        if n is None:
            return None
        share = 2 * (n - 1) / n if self.kind == "all-reduce" else (n - 1) / n
        return round(self.bytes_per_step * share)


_HEADER = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s*\(.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_ARRAY = re.compile(r"\b([a-z]\w*)\[([<=\d,]*)\]")
_COMMENT = re.compile(r"/\*.*?\*/")
_CALLEE = re.compile(
    r"\b(body|condition|calls|to_apply|true_computation|false_computation)=%?([\w.\-]+)"
)
_BRANCHES = re.compile(r"\bbranch_computations=\{([^}]*)\}")
_TRIP_COUNT = re.compile(r'"known_trip_count"\s*:\s*\{\s*"n"\s*:\s*"(\d+)"')


def _closing(text: str, start: int) -> int:
    """Index of the bracket closing the one at ``text[start]``."""
    depth = 0
    for i in range(start, len(text)):
        if text[i] in "([{":
            depth += 1
        elif text[i] in ")]}":
            depth -= 1
            if depth == 0:
                return i
    raise ValueError(f"unbalanced brackets in HLO: {text[start : start + 80]!r}")


def _split_top(text: str) -> list[str]:
    """Splits on the commas outside brackets."""
    items, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == "," and depth == 0:
            items.append(text[start:i])
            start = i + 1
    items.append(text[start:])
    return [item.strip() for item in items if item.strip()]


def _arrays(shape: str) -> list[str]:
    """The array shapes in an HLO shape (a tuple gives several), without layouts."""
    return [f"{dtype}[{dims}]" for dtype, dims in _ARRAY.findall(_COMMENT.sub("", shape))]


def array_bytes(shape: str) -> int:
    """Bytes of an HLO array shape such as ``f32[64,8,8]`` or ``bf16[]``."""
    match = _ARRAY.fullmatch(shape)
    if not match:
        raise ValueError(f"not an HLO array shape: {shape!r}")
    dtype, dims = match.groups()
    if dtype in ("token", "opaque"):
        return 0
    bits = 8 if dtype == "pred" else int(re.search(r"\d+", dtype).group())
    elements = math.prod(int(d.removeprefix("<=")) for d in dims.split(",") if d)
    return (elements * bits + 7) // 8


def _group_size(attrs: str, num_devices: int) -> int | None:
    """Devices per replica group, from the three ways HLO prints ``replica_groups``."""
    match = re.search(
        r"replica_groups=mesh\[([^\]]*)\](?:,\s*device_ids=\(\[[^\]]*\](?:T\([^)]*\))?\))?"
        r"\s*\{([^}]*)\}",
        attrs,
    )
    if match:  # mesh['axis_0'=4,'axis_1'=2] {'axis_0'}, maybe with device_ids=([2,4]T(1,0))
        sizes = dict(re.findall(r"'?([\w]+)'?=(\d+)", match.group(1)))
        axes = re.findall(r"'?([\w]+)'?", match.group(2))
        return math.prod(int(sizes[a]) for a in axes) if all(a in sizes for a in axes) else None
    match = re.search(r"replica_groups=\[(\d+),(\d+)\]<=", attrs)
    if match:  # iota: [groups, size]<=[devices]
        return int(match.group(2))
    match = re.search(r"replica_groups=\{\{([^}]*)\}", attrs)
    if match:  # explicit: {{0,1,2,3},{4,5,6,7}}
        return len(match.group(1).split(","))
    if re.search(r"replica_groups=\{\s*\}", attrs) or "replica_groups" not in attrs:
        return num_devices  # one group of every device
    return None


@dataclasses.dataclass
class _Instruction:
    name: str
    computation: str
    shape: str
    opcode: str
    operands: list[str]
    attrs: str


def _parse_hlo(text: str) -> tuple[list[_Instruction], str]:
    """The instructions of an HLO module and the name of its entry computation."""
    instructions: list[_Instruction] = []
    computation, entry = "", ""
    for line in text.splitlines():
        header = _HEADER.match(line)
        if header and "=" not in line.split("(", 1)[0]:
            computation = header.group(2)
            if header.group(1):
                entry = computation
            continue
        match = _INSTRUCTION.match(line)
        if not match or not computation:
            continue
        name, rest = match.groups()
        if rest.startswith("("):
            end = _closing(rest, 0) + 1
            shape, rest = rest[:end], rest[end:].lstrip()
        else:
            shape, _, rest = rest.partition(" ")
        op = re.match(r"([\w\-]+)\(", rest)
        if not op:
            continue
        open_at = op.end() - 1
        close_at = _closing(rest, open_at)
        operands = _split_top(_COMMENT.sub("", rest[open_at + 1 : close_at]))
        instructions.append(
            _Instruction(name, computation, shape, op.group(1), operands, rest[close_at + 1 :])
        )
    if not entry:
        raise ValueError("no ENTRY computation in the HLO text")
    return instructions, entry


def _executions(instructions: list[_Instruction], entry: str) -> tuple[dict[str, int], int]:
    """How many times each computation runs per call of the entry computation, and how many
    loops had no known trip count (counted as one trip)."""
    callers: dict[str, list[tuple[str, int]]] = {}
    unknown = 0
    for ins in instructions:
        if ins.opcode in ("async-update", "async-done"):
            continue  # the async-start already calls the wrapped computation
        trips = 1
        if ins.opcode == "while":
            found = _TRIP_COUNT.search(ins.attrs)
            trips = int(found.group(1)) if found else 1
            unknown += found is None
        callees = [c for _, c in _CALLEE.findall(ins.attrs)]
        for group in _BRANCHES.findall(ins.attrs):
            callees += [c.strip().lstrip("%") for c in group.split(",") if c.strip()]
        for callee in callees:
            callers.setdefault(callee, []).append((ins.computation, trips))

    @functools.cache
    def runs(computation: str) -> int:
        if computation == entry:
            return 1
        return sum(runs(caller) * trips for caller, trips in callers.get(computation, []))

    return {ins.computation: runs(ins.computation) for ins in instructions}, unknown


_METADATA = re.compile(r'metadata=\{[^}]*?op_name="([^"]*)"(?:[^}]*?stack_frame_id=(\d+))?')
_TABLES = ("FileNames", "FunctionNames", "FileLocations", "StackFrames")
_JAXFORMER_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


def _stack_frames(text: str) -> dict[int, tuple[str, ...]]:
    """The jaxformer functions (outermost first) of each stack frame id in the HLO text's
    frame tables, so a collective can be traced to the model code that caused it."""
    tables: dict[str, dict[int, str]] = {name: {} for name in _TABLES}
    table = None
    for line in text.splitlines():
        if line in _TABLES:
            table = line
            continue
        row = re.match(r"^(\d+) (.*)$", line) if table else None
        if not row:
            table = None
            continue
        tables[table][int(row.group(1))] = row.group(2)

    def field(row: str, key: str) -> int:
        found = re.search(rf"\b{key}=(\d+)", row)
        return int(found.group(1)) if found else 0

    files = {k: v.strip('"') for k, v in tables["FileNames"].items()}
    names = {k: v.strip('"') for k, v in tables["FunctionNames"].items()}
    locations = {
        k: (files.get(field(v, "file_name_id"), ""), names.get(field(v, "function_name_id"), ""))
        for k, v in tables["FileLocations"].items()
    }
    frames = tables["StackFrames"]

    @functools.cache
    def chain(frame: int) -> tuple[str, ...]:
        if frame not in frames:
            return ()
        row = frames[frame]
        # XLA 0.10.2 prints a frame's parent one above its id (a root frame has parent 1);
        # parents come first, so requiring a smaller id also rules out cycles.
        parent = field(row, "parent_frame_id") - 1
        path, function = locations.get(field(row, "file_location_id"), ("", ""))
        outer = chain(parent) if 0 < parent < frame else ()
        mine = path.startswith(_JAXFORMER_DIR) and not path.endswith(os.sep + "plan.py")
        return (*outer, function) if mine else outer

    return {frame: chain(frame) for frame in frames}


def collectives(hlo_text: str, num_devices: int) -> tuple[list[Collective], int]:
    """The collectives of an optimized HLO module, and the count of loops whose trip count
    XLA did not record (their collectives are counted once per loop, a lower bound)."""
    instructions, entry = _parse_hlo(hlo_text)
    shapes = {ins.name: ins.shape for ins in instructions}
    done_shape = {
        ins.operands[0].split()[-1].lstrip("%"): ins.shape
        for ins in instructions
        if ins.opcode.endswith("-done") and ins.operands
    }
    runs, unknown = _executions(instructions, entry)
    frames = _stack_frames(hlo_text)
    origin: dict[str, tuple[str, tuple[str, ...]]] = {}
    for ins in instructions:
        meta = _METADATA.search(ins.attrs)
        if meta:
            origin[ins.name] = (meta.group(1), frames.get(int(meta.group(2) or 0), ()))

    def operand_arrays(operands: list[str]) -> list[str]:
        out: list[str] = []
        for operand in operands:
            inline = _arrays(operand)
            out += inline or _arrays(shapes.get(operand.split()[-1].lstrip("%"), ""))
        return out

    def operand_origins(ins: _Instruction, operands: list[str]) -> list[tuple[str, tuple]]:
        out = []
        for operand in operands:
            name = operand.split()[-1].lstrip("%")
            count = len(_arrays(operand) or _arrays(shapes.get(name, "")))
            out += [origin.get(name, origin.get(ins.name, ("", ())))] * count
        return out

    found: list[Collective] = []
    for ins in instructions:
        kind = ins.opcode.removesuffix("-start")
        if kind not in COLLECTIVE_KINDS or runs.get(ins.computation, 0) == 0:
            continue
        if kind == "all-gather":
            if ins.opcode.endswith("-start"):
                arrays = _arrays(done_shape.get(ins.name, ""))
            else:
                arrays = _arrays(ins.shape)
            origins = [origin.get(ins.name, ("", ()))] * len(arrays)
        elif kind == "collective-permute":
            arrays = operand_arrays(ins.operands[:1])
            origins = operand_origins(ins, ins.operands[:1])
        else:
            arrays = operand_arrays(ins.operands)
            origins = operand_origins(ins, ins.operands)
        found.append(
            Collective(
                kind=kind,
                name=ins.name,
                computation=ins.computation,
                shapes=tuple(arrays),
                bytes=sum(array_bytes(a) for a in arrays),
                group_size=None
                if kind == "collective-permute"
                else _group_size(ins.attrs, num_devices),
                executions=runs[ins.computation],
                op_names=tuple(op for op, _ in origins),
                functions=tuple(fns for _, fns in origins),
            )
        )
    return found, unknown


# -- the plan --------------------------------------------------------------------------------


MEMORY_FIELDS = {
    "argument": "argument_size_in_bytes",
    "output": "output_size_in_bytes",
    "alias": "alias_size_in_bytes",
    "temp": "temp_size_in_bytes",
    "generated_code": "generated_code_size_in_bytes",
}


@dataclasses.dataclass
class Plan:
    """What one train step of a config costs each device, from the compiled program."""

    platform: str
    num_devices: int
    mesh: dict[str, int]
    global_batch: int
    seq_len: int
    microbatches: int
    pipeline_schedule: str  # train.pipeline_schedule (meaningful when mesh stage > 1)
    params: int  # parameters in the model (all devices)
    param_bytes: int  # per device, from the shardings
    opt_state_bytes: int  # per device
    other_state_bytes: int  # per device: step counter, RNG key, bad-step guard
    batch_bytes: int  # per device
    memory: dict[str, int]  # per device, the compiled step's memory_analysis (MEMORY_FIELDS)
    collectives: list[Collective]
    unknown_trip_counts: int
    lower_s: float
    compile_s: float
    train_flops_per_step: int  # jaxformer.flops convention, whole step over all devices

    @property
    def memory_total(self) -> int:
        """What XLA plans to hold at once: arguments + outputs - aliased + temporaries + code."""
        m = self.memory
        return m["argument"] + m["output"] - m["alias"] + m["temp"] + m["generated_code"]

    @property
    def bubble_fraction(self) -> float:
        """Idle share of each pipeline stage's time (0 without pipelining)."""
        from jaxformer.parallel.pipeline import bubble_fraction

        return bubble_fraction(self.mesh.get("stage", 1), self.microbatches)

    def totals(self) -> dict[str, dict[str, int | None]]:
        """Per kind: executions, bytes and estimated bytes sent, per device per step."""
        out: dict[str, dict[str, int | None]] = {}
        for kind in COLLECTIVE_KINDS:
            ops = [c for c in self.collectives if c.kind == kind]
            sent = [c.sent_per_step for c in ops]
            out[kind] = {
                "count": sum(c.executions for c in ops),
                "bytes": sum(c.bytes_per_step for c in ops),
                "sent": None if None in sent else sum(s for s in sent if s is not None),
            }
        return out

    def to_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["memory"] = {**self.memory, "total": self.memory_total}
        out["collective_totals"] = self.totals()
        out["bubble_fraction"] = self.bubble_fraction
        return out

    def table(self) -> str:
        """The plan for a terminal."""
        devices = f"{self.num_devices} {self.platform} device(s)"
        per_shard = self.global_batch // max(1, parallel.batch_shards(self.mesh))
        lines = [
            f"mesh {self.mesh} over {devices}",
            f"global batch {self.global_batch} x {self.seq_len} tokens "
            f"({per_shard} sequences per batch shard, {self.microbatches} microbatch(es)); "
            f"{self.params:,} parameters",
            f"lowered in {self.lower_s:.2f} s, compiled in {self.compile_s:.2f} s",
        ]
        stages = self.mesh.get("stage", 1)
        if stages > 1:
            lines.append(
                f"pipeline: {stages} stages x {self.microbatches} microbatches, "
                f"{self.pipeline_schedule}; bubble {self.bubble_fraction:.1%} of each stage's "
                f"time; activation memory per stage (one device's temporaries) "
                f"{_human(self.memory['temp'])}"
            )
        lines += ["", "memory per device"]
        rows = [
            ("parameters", self.param_bytes, "shards of the parameters"),
            ("optimizer state", self.opt_state_bytes, "shards of the optimizer state"),
            ("step, RNG, guard", self.other_state_bytes, ""),
            ("batch", self.batch_bytes, "this device's rows"),
            ("arguments", self.memory["argument"], "compiled: state + batch"),
            ("outputs", self.memory["output"], "compiled: new state + metrics"),
            ("aliased", self.memory["alias"], "outputs written over donated arguments"),
            ("temporaries", self.memory["temp"], "activations, gradients, gathered weights"),
            ("generated code", self.memory["generated_code"], ""),
            ("total", self.memory_total, "arguments + outputs - aliased + temporaries + code"),
        ]
        lines += [f"  {name:<16}{_human(b):>12}  {note}".rstrip() for name, b, note in rows]
        lines += [
            "",
            "collectives per device per step      count        bytes   sent (ring)",
        ]
        for kind, total in self.totals().items():
            sent = "-" if total["sent"] is None else _human(total["sent"])
            lines.append(f"  {kind:<32}{total['count']:>9}{_human(total['bytes']):>13}{sent:>14}")
        if self.unknown_trip_counts:
            lines.append(
                f"  ({self.unknown_trip_counts} loop(s) without a known trip count: their "
                "collectives are counted once)"
            )
        flops_step = self.train_flops_per_step
        lines += [
            "",
            f"model FLOPs per step {flops_step:.3e} ({flops_step / self.num_devices:.3e} per "
            "device; docs/flops.md)",
        ]
        return "\n".join(lines)


def _human(n: int) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


def plan(
    cfg: ml_collections.ConfigDict,
    devices: Sequence[jax.Device] | None = None,
    rules: parallel.sharding.Rules | None = None,
) -> Plan:
    """Lowers and compiles ``cfg``'s train step for its mesh over ``devices`` (default: all)
    against an abstract state and batch, and reports memory and collectives per device."""
    from jaxformer.train.optim import make_optimizer
    from jaxformer.train.step import abstract_state, jit_steps

    rules = parallel.DEFAULT_RULES if rules is None else rules
    devices = list(jax.devices() if devices is None else devices)
    mesh_shape = validate(cfg, len(devices), jax.process_count())
    _, dcn_shape = resolve_mesh(cfg.mesh, len(devices))
    mesh = parallel.make_mesh(mesh_shape, devices, dcn=dcn_shape)
    tx = make_optimizer(cfg.optimizer, cfg.train.steps, cfg.model.d_model)
    graphdef, state, shardings = abstract_state(cfg, tx, mesh, rules)
    batch = batch_spec(cfg, mesh, rules)
    train_step, _ = jit_steps(cfg, graphdef, tx, mesh, rules, shardings)

    start = time.perf_counter()
    lowered = train_step.lower(state, batch)
    lowered_at = time.perf_counter()
    compiled = lowered.compile()
    compiled_at = time.perf_counter()

    stats = compiled.memory_analysis()
    memory = {key: int(getattr(stats, field)) for key, field in MEMORY_FIELDS.items()}
    found, unknown = collectives(compiled.as_text(), len(devices))
    count = flops.count(cfg.model, cfg.data.seq_len)
    return Plan(
        platform=devices[0].platform,
        num_devices=len(devices),
        mesh=mesh_shape,
        global_batch=cfg.train.global_batch,
        seq_len=cfg.data.seq_len,
        microbatches=cfg.train.microbatches,
        pipeline_schedule=cfg.train.pipeline_schedule,
        params=global_size(nnx.state(state.params, nnx.Param)),
        param_bytes=shard_bytes(state.params),
        opt_state_bytes=shard_bytes(state.opt_state),
        other_state_bytes=shard_bytes((state.step, state.rng, state.guard)),
        batch_bytes=shard_bytes(batch),
        memory=memory,
        collectives=found,
        unknown_trip_counts=unknown,
        lower_s=lowered_at - start,
        compile_s=compiled_at - lowered_at,
        train_flops_per_step=count.train_flops_per_token
        * cfg.train.global_batch
        * cfg.data.seq_len,
    )


def report(cfg: ml_collections.ConfigDict, num_devices: int = 0, as_json: bool = False) -> str:
    """``jaxformer plan``'s output: the table, or JSON for tools."""
    result = plan(cfg, plan_devices(num_devices))
    if as_json:
        return json.dumps(result.to_json(), indent=2)
    return result.table()
