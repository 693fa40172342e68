"""Measure training throughput of configs on synthetic tokens and record it in BENCHMARKS.md.

    python tools/benchmark.py --config=configs/default.py --config=configs/decoder_100m.py \
        --steps=10 --write

Each config is trained for ``--warmup`` untimed steps, then ``--steps`` timed steps, each
timed to completion. Reported: median step time and its spread, tokens/s, model TFLOP/s
per device, MFU (FLOPs as in jaxformer/flops.py: matmuls only, 3x forward, full attention
square; peak from the datasheet on accelerators; on CPU the best of 2048^3 matmuls timed
before and between the timed steps),
compile time, and peak memory (XLA's compiled estimate of arguments + temporaries + outputs,
and on accelerators the allocator's peak; on CPU the process's peak RSS).

``--baseline=DIR`` (a checkout of another commit, e.g. ``git worktree add /tmp/base
COMMIT``) measures every config on that tree too, alternating with this one for
``--rounds`` rounds, so a change is compared with its parent on one machine in one run;
each row names its tree's commit.

Each config runs in a process of its own: the allocator's and the process's peaks only
grow, so a shared process would report the largest config's peak for every later one, and
a config that fails (out of memory, say) gets a row naming the error while the rest run.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

from jaxformer import hardware, parallel
from jaxformer.config import load_config
from jaxformer.host import use_huge_pages
from jaxformer.tasks import count_flops
from jaxformer.train.setup import build
from jaxformer.train.step import jit_steps

ROOT = Path(__file__).resolve().parent.parent
HEADER = (
    "| date | device | commit | config | params | global batch x seq | step time (s) "
    "| tokens/s | TFLOP/s/device | MFU | peak | compile (s) | peak memory |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|\n"
)


def device_description() -> str:
    device = jax.devices()[0]
    return f"{jax.device_count()}x {device.device_kind} ({device.platform}), jax {jax.__version__}"


def synthetic_batch(cfg, rng: np.random.Generator, documents: int = 1) -> dict[str, np.ndarray]:
    """Random tokens, each row ``documents`` equal-length documents packed together (one
    segment id and positions from 0 each), no padding."""
    b, length = cfg.train.global_batch, cfg.data.seq_len
    tokens = rng.integers(3, min(cfg.model.vocab_size, 259), (b, length + 1), dtype=np.int32)
    segment_L = 1 + np.arange(length) * documents // length
    starts = np.searchsorted(segment_L, segment_L)  # each token's document start
    return {
        "inputs": tokens[:, :-1],
        "targets": tokens[:, 1:],
        "segment_ids": np.broadcast_to(segment_L, (b, length)).astype(np.int32),
        "positions": np.broadcast_to(np.arange(length) - starts, (b, length)).astype(np.int32),
        "weights": np.ones((b, length), np.float32),
    }


def compile_step(config: str, overrides: list[str], documents: int = 1):
    """The config's train step compiled for a synthetic batch: (cfg, compiled step, state,
    batch, compile seconds, XLA's memory estimate in bytes or None)."""
    cfg = load_config(config, overrides)
    built = build(cfg)
    mesh, state = built.mesh, built.state
    train_step, _ = jit_steps(cfg, built.graphdef, built.tx, mesh, built.rules, built.shardings)
    sharding = parallel.batch_sharding(mesh)
    batch = {
        k: jax.device_put(v, sharding)
        for k, v in synthetic_batch(cfg, np.random.default_rng(0), documents).items()
    }
    start = time.perf_counter()
    compiled = train_step.lower(state, batch).compile()
    compile_s = time.perf_counter() - start
    memory = compiled.memory_analysis()
    xla_bytes = None
    if memory is not None:
        xla_bytes = (
            memory.argument_size_in_bytes
            + memory.temp_size_in_bytes
            + memory.output_size_in_bytes
            - memory.alias_size_in_bytes
        )
    return cfg, compiled, state, batch, compile_s, xla_bytes


def bench(config: str, overrides: list[str], steps: int, warmup: int, documents: int = 1) -> dict:
    cfg, compiled, state, batch, compile_s, xla_bytes = compile_step(config, overrides, documents)
    device = jax.devices()[0]
    # On CPU the peak is a measured matmul, whose speed drifts with the machine's load
    # and clock as much as the steps' do: sample it before and after every timed step
    # and keep the best of the run (with_peaks), the fastest the machine ran matmuls.
    sample_peak = None
    if hardware.datasheet_peak(device) is None:
        sample_peak = hardware.matmul_sampler(cfg.model.dtype)
    peak_samples = [sample_peak() for _ in range(3)] if sample_peak else []
    times = []
    for i in range(warmup + steps):
        start = time.perf_counter()
        state, metrics = compiled(state, batch)
        jax.block_until_ready(metrics)
        if i >= warmup:
            times.append(time.perf_counter() - start)
            peak_samples += [sample_peak() for _ in range(2)] if sample_peak else []
    count = count_flops(cfg.model, cfg.data.seq_len)
    step_time = statistics.median(times)
    tokens_per_sec = cfg.train.global_batch * cfg.data.seq_len / step_time
    per_device = tokens_per_sec * count.train_flops_per_token / jax.device_count()
    stats = device.memory_stats() if device.platform != "cpu" else None
    if stats and "peak_bytes_in_use" in stats:
        peak_memory = f"{stats['peak_bytes_in_use'] / 2**30:.2f} GiB allocator peak"
    else:
        rss_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        peak_memory = f"{rss_gib:.2f} GiB process RSS"
    if xla_bytes is not None:
        peak_memory += f"; {xla_bytes / 2**30:.2f} GiB XLA estimate"
    spread = (min(times), max(times))
    return {
        "device": device_description(),
        "platform": device.platform,
        "config": config_label(config, overrides, documents),
        "params": count.params,
        "shape": f"{cfg.train.global_batch} x {cfg.data.seq_len}",
        "step_time": f"{step_time:.3f} ({spread[0]:.3f}-{spread[1]:.3f})",
        "tokens_per_sec": tokens_per_sec,
        "tflops": per_device / 1e12,
        "dtype": cfg.model.dtype,
        "peak_samples": peak_samples,  # CPU; with_peaks turns them into the run's peak
        "datasheet_peak": None if sample_peak else hardware.peak_flops(cfg.model.dtype),
        "compile_s": compile_s,
        "memory": peak_memory,
        "loss": float(metrics["loss"]),
    }


def config_label(config: str, overrides: list[str], documents: int) -> str:
    """A row's config cell: the file, its overrides, and ``--documents`` if not 1."""
    packed = [f"--documents={documents}"] if documents != 1 else []
    return " ".join([Path(config).name, *overrides, *packed])


def bench_in_child(
    config: str,
    overrides: list[str],
    steps: int,
    warmup: int,
    documents: int = 1,
    tree: Path = ROOT,
) -> dict:
    """bench() in a fresh Python process (module docstring: why) running ``tree``'s
    jaxformer and benchmark; on failure, a result holding the config and the error's last
    line."""
    env = os.environ | {"PYTHONPATH": str(tree)} if tree != ROOT else None
    with tempfile.TemporaryDirectory() as tmp:
        result_file = Path(tmp) / "result.json"
        cmd = [
            sys.executable,
            str(tree / "tools" / "benchmark.py"),
            f"--config={config}",
            *overrides,
            f"--steps={steps}",
            f"--warmup={warmup}",
            f"--documents={documents}",
            f"--result-file={result_file}",
        ]
        proc = subprocess.run(cmd, stderr=subprocess.PIPE, text=True, cwd=tree, env=env)
        if proc.returncode == 0 and result_file.exists():
            return json.loads(result_file.read_text())
    lines = [line.strip() for line in proc.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if "Error" in line.split(":")[0]]
    error = (errors or lines or [f"exit status {proc.returncode}"])[-1]
    sys.stderr.write("\n".join(lines[-20:]) + "\n")
    return {"config": config_label(config, overrides, documents), "error": error[:300]}


def with_peaks(results: list[dict], platform: str) -> list[dict]:
    """Adds each row's MFU and peak: the datasheet figure on accelerators; on CPU the best
    matmul of the whole run in the row's dtype, so rows measured side by side share one."""
    results = [r for r in results if "error" not in r]
    samples: dict[str, list[float]] = {}
    for r in results:
        samples.setdefault(r["dtype"], []).extend(r["peak_samples"])
    for r in results:
        if r["datasheet_peak"] is not None:
            peak, source = r["datasheet_peak"]
        else:
            peak = max(samples[r["dtype"]])
            source = (
                f"best of {len(samples[r['dtype']])} 2048^3 {r['dtype']} matmuls between "
                f"the steps of this run on {platform}"
            )
        r["mfu"] = r["tflops"] * 1e12 / peak
        r["peak"] = f"{peak / 1e12:.3g} TFLOP/s ({source})"
    return results


def git_commit(tree: Path = ROOT) -> str:
    """The checkout's short commit, with +dirty for uncommitted tracked changes;
    ``JAXFORMER_COMMIT`` instead where this tree was copied without its history."""
    if tree == ROOT and os.environ.get("JAXFORMER_COMMIT"):
        return os.environ["JAXFORMER_COMMIT"]
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=tree,
            capture_output=True,
            text=True,
            check=True,
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=tree,
            capture_output=True,
            text=True,
        ).stdout.strip()
        return out.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog="--config.KEY=VALUE overrides before the first --config apply to every config; "
        "after a --config, to that config only.",
    )
    parser.add_argument(
        "--config",
        action="append",
        required=True,
        help="config file; repeat to measure several side by side",
    )
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument(
        "--documents",
        type=int,
        default=1,
        help="documents packed per synthetic row (1: none; more: the segment-mask path)",
    )
    parser.add_argument(
        "--baseline",
        default="",
        help="another checkout: measure each config there too, alternating",
    )
    parser.add_argument("--rounds", type=int, default=1, help="with --baseline: alternations")
    parser.add_argument("--write", action="store_true", help="add rows to BENCHMARKS.md")
    parser.add_argument("--output", default=str(ROOT / "BENCHMARKS.md"))
    parser.add_argument(
        "--result-file", help=argparse.SUPPRESS
    )  # internal: one config, run by bench_in_child, its result written here as JSON
    if argv is None:
        use_huge_pages()  # as `jaxformer train` does (jaxformer/host.py); returns if done
    argv = sys.argv[1:] if argv is None else argv
    args, rest = parser.parse_known_args(argv)
    if args.documents < 1:
        parser.error(f"--documents must be at least 1, got {args.documents}")
    unknown = [a for a in rest if not a.startswith("--config.")]
    if unknown:
        parser.error(f"unrecognised arguments: {unknown}")
    shared: list[str] = []
    runs: list[tuple[str, list[str]]] = []
    for arg in argv:
        if arg.startswith("--config="):
            runs.append((arg.split("=", 1)[1], list(shared)))
        elif arg.startswith("--config."):
            (runs[-1][1] if runs else shared).append(arg)
    if args.result_file:
        (config, overrides), *more = runs
        if more or args.write:
            parser.error("--result-file takes one --config and no --write")
        result = bench(config, overrides, args.steps, args.warmup, args.documents)
        Path(args.result_file).write_text(json.dumps(result))
        return 0
    date = datetime.date.today().isoformat()
    trees = [ROOT] + ([Path(args.baseline).resolve()] if args.baseline else [])
    commits = {tree: git_commit(tree) for tree in trees}
    results = []
    order = [(c, o, t) for _ in range(max(args.rounds, 1)) for c, o in runs for t in trees]
    for config, overrides, tree in order:
        result = bench_in_child(config, overrides, args.steps, args.warmup, args.documents, tree)
        results.append(result | {"commit": commits[tree]})
        r = results[-1]
        print(
            f"[{r['commit']}] "
            f"{r['config']}: "
            + (f"FAILED: {r['error']}" if "error" in r else f"step {r['step_time']} s"),
            flush=True,
        )
    # The parent never touches an accelerator (on GPUs it would hold memory the children need).
    measured = [r for r in results if "error" not in r]
    device_name = measured[0]["device"] if measured else "unknown device"
    rows = [
        f"| {date} | {device_name} | {r['commit']} | {r['config']} | | | failed: "
        f"{r['error'].replace('|', '/')} | | | | | | |\n"
        for r in results
        if "error" in r
    ]
    for r in with_peaks(results, measured[0]["platform"] if measured else "cpu"):
        print(
            f"{r['config']}: {r['params']:,} params, step {r['step_time']} s, "
            f"{r['tokens_per_sec']:,.0f} tokens/s, {r['tflops']:.3f} TFLOP/s/device, "
            f"MFU {r['mfu']:.1%} of {r['peak']}, compile {r['compile_s']:.1f} s, "
            f"memory {r['memory']}, loss {r['loss']:.3f}",
            flush=True,
        )
        rows.append(
            f"| {date} | {device_name} | {r['commit']} | {r['config']} | {r['params'] / 1e6:.1f}M "
            f"| {r['shape']} | {r['step_time']} | {r['tokens_per_sec']:,.0f} "
            f"| {r['tflops']:.3f} | {r['mfu']:.1%} | {r['peak']} | {r['compile_s']:.1f} "
            f"| {r['memory']} |\n"
        )
    if args.write:
        path = Path(args.output)
        text = path.read_text() if path.exists() else ""
        if HEADER not in text:
            text += "\n" + HEADER
        command = "python tools/benchmark.py " + shlex.join(argv)
        text = text.replace(HEADER, HEADER + "".join(rows), 1)
        text += f"\n<!-- {date} {' vs '.join(commits.values())}: {command} -->\n"
        path.write_text(text)
        print(f"wrote {len(rows)} row(s) to {path}")
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
