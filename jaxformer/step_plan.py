"""``jaxformer plan``: compile the train step for a mesh without running it, and report what
each device holds and what it communicates.

The state is abstract (``ShapeDtypeStruct``s carrying their shardings, from
``train.setup.build(abstract=True)``, the setup every command shares) and the batch is a
spec built from the config's task, so nothing is allocated and no dataset is opened: a
layout for 256 devices can be planned on a laptop with ``--devices 256`` (simulated CPU
devices).

What is reported, per device:

- parameter and optimizer-state bytes: the size of each leaf's shard under its sharding;
- the compiled step's ``memory_analysis()``: argument, output, aliased (donated), temporary
  and generated-code bytes, and their total (arguments + outputs - aliased + temporaries +
  code), which is the peak XLA plans for the step;
- the collectives in the optimized HLO (``compiled.as_text()``, parsed by ``jaxformer.hlo``),
  by kind, with the number of executions and bytes per step: an instruction inside a loop
  (scanned layers, microbatches) counts once per trip. Bytes are the full buffer on the
  large side of each collective, and ``sent`` a ring-algorithm estimate of what each device
  puts on the wire (the convention is spelled out in ``jaxformer.hlo``);
- lowering and compile time, and the model FLOPs per step (``jaxformer.flops``).

Everything describes the backend that compiled it: a plan made on simulated CPU devices
shows XLA's CPU pipeline, which (unlike GPU and TPU) never forms reduce-scatters: a
sharded gradient appears as an all-reduce of the whole gradient followed by a slice. See
docs/parallelism.md.
"""

from __future__ import annotations

import dataclasses
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

from jaxformer import parallel
from jaxformer.errors import ConfigError
from jaxformer.hlo import COLLECTIVE_KINDS, Collective, collectives
from jaxformer.tasks import task_for
from jaxformer.train import setup
from jaxformer.train.step import jit_steps

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
    lengths = task_for(cfg).batch_lengths(cfg)
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


# -- the plan --------------------------------------------------------------------------------


MEMORY_FIELDS = {
    "argument": "argument_size_in_bytes",
    "output": "output_size_in_bytes",
    "alias": "alias_size_in_bytes",
    "temp": "temp_size_in_bytes",
    "generated_code": "generated_code_size_in_bytes",
}


@dataclasses.dataclass
class StepPlan:
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
        from jaxformer.parallel.pipeline_parallel import bubble_fraction

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
) -> StepPlan:
    """Lowers and compiles ``cfg``'s train step for its mesh over ``devices`` (default: all)
    against an abstract state and batch, and reports memory and collectives per device."""
    devices = list(jax.devices() if devices is None else devices)
    built = setup.build(cfg, rules=rules, devices=devices, abstract=True)
    mesh, mesh_shape, rules, state = built.mesh, built.mesh_shape, built.rules, built.state
    batch = batch_spec(cfg, mesh, rules)
    train_step, _ = jit_steps(cfg, built.graphdef, built.tx, mesh, rules, built.shardings)

    start = time.perf_counter()
    lowered = train_step.lower(state, batch)
    lowered_at = time.perf_counter()
    compiled = lowered.compile()
    compiled_at = time.perf_counter()

    stats = compiled.memory_analysis()
    memory = {key: int(getattr(stats, field)) for key, field in MEMORY_FIELDS.items()}
    found, unknown = collectives(compiled.as_text(), len(devices))
    count = built.task.count_flops(cfg.model, cfg.data.seq_len)
    return StepPlan(
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
