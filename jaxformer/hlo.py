"""Reading XLA's optimized HLO text: the collectives of a compiled program, how often each
runs per call, how many bytes it moves, and the jaxformer functions that caused it.

jax exposes no structured view of a compiled program's collectives, so ``jaxformer plan``
(``step_plan``) and ``tools/collectives.py`` parse ``compiled.as_text()``. Only what they
need is parsed: instruction headers (name, shape, opcode, operands, attributes), the calls
between computations with the trip counts XLA records for ``while`` loops, the three ways
``replica_groups`` is printed, and the stack-frame tables behind each op's metadata.

Bytes follow one convention, the size of the full buffer each device holds on the large
side of the collective: the output of an all-gather, the input of a reduce-scatter, the
operands of an all-reduce, all-to-all or collective-permute. ``sent`` estimates what each
device puts on the wire with ring algorithms over a group of n devices: (n-1)/n of that
size for all-gather, reduce-scatter and all-to-all, 2(n-1)/n for all-reduce, all of it
for collective-permute.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import re

COLLECTIVE_KINDS = (
    "all-gather",
    "reduce-scatter",
    "all-reduce",
    "all-to-all",
    "collective-permute",
)


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
# The planner (``step_plan``) is on the Python stack of every op it traces: its frames say
# nothing about which model code caused a collective.
_PLANNER_FILE = os.sep + "step_plan.py"


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
        mine = path.startswith(_JAXFORMER_DIR) and not path.endswith(_PLANNER_FILE)
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
