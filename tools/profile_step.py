"""Where a train step's time goes: trace a few steps of a config and sum the device's op
time by kind (matmul, attention, collective, copy, other fusions) and by op.

    python tools/profile_step.py --config=configs/llama_1b.py --config.train.global_batch=16 \
        --steps=2 --trace-dir=/tmp/trace

The step is the one tools/benchmark.py times (synthetic tokens, same compile). The trace is
jax.profiler's (open the ``*.trace.json.gz`` in Perfetto for the timeline). Device time is
the sum of op durations on the accelerator's streams (on CPU: XLA's executor threads), so
'busy' below 100% of the wall time means the device waited (host work, launch gaps).
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import sys
import tempfile
import time
from pathlib import Path

import jax

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchmark import compile_step  # noqa: E402

# First match wins, tested against the op's name and its HLO text (trace args).
KINDS = (
    ("attention", ("cudnn", "fmha", "flash", "sdpa", "attention")),
    ("matmul", ("gemm", "cublas", "matmul", "xmma", "nvjet", "cutlass", "dot(", " dot", "dot.")),
    ("collective", ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "nccl")),
    ("copy", ("memcpy", "memset", "copy", "dynamic-update-slice", "dynamic_update_slice")),
)


def kind_of(text: str) -> str:
    text = text.lower()
    for kind, needles in KINDS:
        if any(n in text for n in needles):
            return kind
    return "other fusions"


def device_ops(trace: dict) -> list[tuple[str, str, float]]:
    """(op name, its HLO text or '', microseconds) of every op run on a device stream, or
    on CPU on XLA's executor threads."""
    events = trace["traceEvents"]
    processes = {
        e["pid"]: e["args"]["name"]
        for e in events
        if e.get("ph") == "M" and e.get("name") == "process_name"
    }
    threads = {
        (e["pid"], e["tid"]): e["args"]["name"]
        for e in events
        if e.get("ph") == "M" and e.get("name") == "thread_name"
    }
    gpu = {pid for pid, name in processes.items() if name.startswith("/device:")}
    # Kernels run on the device's stream threads; its "XLA Ops" thread repeats them by HLO
    # op, so it is read only where a trace has no stream threads.
    device_threads = {k for k, name in threads.items() if k[0] in gpu}
    streams = {k for k in device_threads if "stream" in threads[k].lower()}
    device_threads = streams or {k for k in device_threads if "xla ops" in threads[k].lower()}
    ops = []
    for e in events:
        if e.get("ph") != "X" or "dur" not in e:
            continue
        thread = threads.get((e["pid"], e["tid"]), "")
        on_device = (e["pid"], e["tid"]) in device_threads
        on_cpu = (
            not gpu
            and thread.startswith("tf_XLA")
            and not e["name"].startswith(("end:", "ThunkExecutor", "ThreadpoolListener"))
        )
        if on_device or on_cpu:
            args = e.get("args", {})
            text = " ".join(str(args.get(k, "")) for k in ("long_name", "hlo_op", "tf_op"))
            ops.append((e["name"], text, float(e["dur"])))
    return ops


def summarize(ops: list[tuple[str, str, float]], steps: int, wall_s: float, top: int) -> str:
    by_kind: collections.Counter = collections.Counter()
    by_op: collections.Counter = collections.Counter()
    text_of: dict[str, str] = {}
    for name, text, us in ops:
        by_kind[kind_of(f"{name} {text}")] += us
        by_op[name] += us
        text_of.setdefault(name, text)
    busy = sum(by_kind.values())
    step_ms = 1e3 * wall_s / steps
    lines = [
        f"step {step_ms:.1f} ms wall; device busy {busy / 1e3 / steps:.1f} ms "
        f"({busy / 1e3 / steps / step_ms:.0%} of the step), {len(ops) // steps} ops per step",
        "",
        "| kind | ms/step | share of busy |",
        "|---|---|---|",
    ]
    for kind, us in by_kind.most_common():
        lines.append(f"| {kind} | {us / 1e3 / steps:.2f} | {us / busy:.1%} |")
    lines += ["", "| op | kind | ms/step | share | HLO |", "|---|---|---|---|---|"]
    for name, us in by_op.most_common(top):
        hlo = " ".join(text_of[name].split())[:160].replace("|", "/")
        lines.append(
            f"| {name[:60]} | {kind_of(name + ' ' + text_of[name])} | {us / 1e3 / steps:.2f} "
            f"| {us / busy:.1%} | {hlo} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--top", type=int, default=25, help="ops listed by time")
    parser.add_argument("--trace-dir", help="keep the trace here (default: a temporary dir)")
    args, overrides = parser.parse_known_args(argv)
    unknown = [a for a in overrides if not a.startswith("--config.")]
    if unknown:
        parser.error(f"unrecognised arguments: {unknown}")
    cfg, compiled, state, batch, compile_s, _ = compile_step(args.config, overrides)
    for _ in range(args.warmup):
        state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    trace_dir = Path(args.trace_dir or tempfile.mkdtemp(prefix="jaxformer-trace-"))
    jax.profiler.start_trace(str(trace_dir))
    start = time.perf_counter()
    for _ in range(args.steps):
        state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    wall_s = time.perf_counter() - start
    jax.profiler.stop_trace()
    trace_file = max(trace_dir.rglob("*.trace.json.gz"), key=lambda p: p.stat().st_mtime)
    with gzip.open(trace_file) as f:
        ops = device_ops(json.load(f))
    print(f"{Path(args.config).name} {' '.join(overrides)}: compile {compile_s:.1f} s")
    print(summarize(ops, args.steps, wall_s, args.top))
    print(f"\ntrace: {trace_file}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
