"""Turning the frameworks' runs into what the comparison prints and records: per-round
progress lines, the summary table (one row per framework, ratios to jaxformer's tokens/s)
and the BENCHMARKS.md section with the machine, versions and method beside the table."""

from __future__ import annotations

import datetime
import os
import platform
import statistics
from pathlib import Path

from peers.common import RunResult, Shape

# A framework whose reported parameter count is further than this from the analytic one
# trains a different shape, so its row is flagged.
PARAM_TOLERANCE = 0.03


def start_line(shape: Shape, rounds: int, warmup: int, steps: int, logs: Path) -> str:
    """The line printed before the first round: the shape, the protocol, where logs go."""
    return (
        f"shape: vocab {shape.vocab}, d_model {shape.d_model}, {shape.layers} layers, "
        f"{shape.heads} heads x {shape.head_dim}, SwiGLU d_ff {shape.d_ff}, seq {shape.seq}, "
        f"global batch {shape.batch}, {shape.dtype}; {shape.params:,} params (untied); "
        f"{rounds} round(s) of {warmup} warm-up + {steps} timed steps; "
        f"logs in {logs}"
    )


def round_line(result: RunResult) -> str:
    """The progress line printed after one framework's process in one round."""
    fw, rnd = result.framework, result.round
    if result.error:
        return f"round {rnd} {fw}: FAILED ({result.wall_s:.0f} s): {result.error}"
    times = " ".join(f"{t:.3f}" for t in result.step_times)
    return (
        f"round {rnd} {fw}: median step {result.median:.3f} s"
        + (f" (steps: {times})" if times else "")
        + (f", params {result.params:,}" if result.params else "")
        + f", loss {result.loss}, {result.wall_s:.0f} s wall"
    )


def summarise(shape: Shape, results: list[RunResult], frameworks: list[str]) -> list[dict]:
    """Per framework: median over rounds of the per-round medians, range, tokens/s, ratio."""
    rows = []
    for fw in frameworks:
        ok = [r for r in results if r.framework == fw and r.error is None and r.median]
        errors = [r.error for r in results if r.framework == fw and r.error]
        if not ok:
            rows.append({"framework": fw, "error": errors[0] if errors else "not run"})
            continue
        medians = [r.median for r in ok]
        step = statistics.median(medians)
        params = next((r.params for r in ok if r.params), None)
        rows.append(
            {
                "framework": fw,
                "step": step,
                "lo": min(medians),
                "hi": max(medians),
                "rounds": len(ok),
                "tokens_per_s": shape.tokens_per_step / step,
                "params": params,
                "loss": ok[-1].loss,
                "error": errors[0] if errors else None,
                "failed": len(errors),
            }
        )
    base = next((r for r in rows if r["framework"] == "jaxformer" and "step" in r), None)
    for r in rows:
        if "step" in r and base:
            r["ratio"] = r["tokens_per_s"] / base["tokens_per_s"]
    return rows


def _params_differ(shape: Shape, params: int | None) -> bool:
    """Whether a reported count is off the analytic one by more than ``PARAM_TOLERANCE``."""
    if not params:
        return False
    return abs(params / shape.params - 1) > PARAM_TOLERANCE


def table(shape: Shape, rows: list[dict]) -> str:
    """The markdown table of ``summarise``'s rows."""
    lines = [
        "| framework | params (reported) | median step time (s) [range over rounds] | tokens/s "
        "| tokens/s ÷ jaxformer's | last loss |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "step" not in r:
            error = str(r["error"]).replace("|", "\\|")
            lines.append(f"| {r['framework']} | - | failed: {error} | - | - | - |")
            continue
        params = f"{r['params']:,}" if r["params"] else "not reported"
        if _params_differ(shape, r["params"]):
            params += f" (differs from {shape.params:,})"
        ratio = f"{r['ratio']:.2f}" if "ratio" in r else "-"
        loss = f"{r['loss']:.3f}" if r["loss"] is not None else "-"
        rounds = f"{r['rounds']} round(s)" + (f", {r['failed']} failed" if r["failed"] else "")
        lines.append(
            f"| {r['framework']} | {params} | {r['step']:.3f} [{r['lo']:.3f}-{r['hi']:.3f}], "
            f"{rounds} | {r['tokens_per_s']:,.0f} | {ratio} | {loss} |"
        )
    return "\n".join(lines)


def _version_line(fw: str, v: dict[str, str]) -> str:
    return f"{fw}: " + ", ".join(f"{k} {x}" for k, x in v.items())


def print_summary(
    shape: Shape, rows: list[dict], text: str, versions: dict[str, dict[str, str]], wall: float
) -> None:
    """Print the table, a warning per shape mismatch, each framework's versions, the time."""
    print()
    print(text)
    for r in rows:
        if _params_differ(shape, r.get("params")):
            print(
                f"WARNING: {r['framework']} reports {r['params']:,} params, "
                f"expected {shape.params:,}: the shapes differ"
            )
    print()
    for fw, v in versions.items():
        print(_version_line(fw, v))
    print(f"total wall time {wall:.0f} s")


def machine() -> str:
    """The CPU model, the cores this process may use, and the OS: what the times depend on."""
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{model}, {cores} cores available, {platform.system()} {platform.release()}"


def _loads(loads: tuple[float, ...]) -> str:
    return " ".join(f"{x:.1f}" for x in loads)


def section(
    shape: Shape,
    text: str,
    versions: dict[str, dict[str, str]],
    pythons: dict[str, Path],
    *,
    frameworks: list[str],
    rounds: int,
    warmup: int,
    steps: int,
    command: str,
    commit: str,
    wall: float,
    load_before: tuple[float, ...],
    step_times: list[str],
) -> str:
    """The BENCHMARKS.md section: how, where and with what the table ``text`` was measured;
    ``step_times`` says, per framework, how its step time is measured."""
    lines = [
        f"\n## Side by side on CPU, {datetime.datetime.now():%Y-%m-%d %H:%M}\n",
        f"- machine: {machine()}; load average (1/5/15 min) {_loads(load_before)} at the "
        f"start, {_loads(os.getloadavg())} at the end",
        f"- jaxformer commit: {commit}",
        f"- command: `{command}` ({wall:.0f} s wall)",
        f"- shape: vocab {shape.vocab}, d_model {shape.d_model}, {shape.layers} layers, "
        f"{shape.heads} heads x {shape.head_dim}, SwiGLU d_ff {shape.d_ff}, "
        f"seq {shape.seq}, global batch {shape.batch}, {shape.dtype}, untied embeddings, "
        f"no remat (MaxText: remat_policy=minimal), synthetic tokens; {shape.params:,} params",
        f"- {rounds} round(s), each process {warmup} warm-up + {steps} "
        "timed steps, frameworks alternating in the order " + ", ".join(frameworks),
    ]
    for fw, v in versions.items():
        lines.append("- " + _version_line(fw, v))
        freeze = Path(pythons[fw]).parent.parent / "freeze.txt"
        if fw != "jaxformer" and freeze.exists():
            lines[-1] += f" (all packages: `{freeze}`)"
    lines += [
        "- step time: " + "; ".join(step_times) + "; the table gives the median over rounds "
        "of each process's median",
        "- loss: not comparable between frameworks (different initialisations and "
        "learning-rate schedules; jaxformer's synthetic tokens are ids 3-258, the "
        "peers' span the vocabulary)",
        "",
        text,
        "",
    ]
    return "\n".join(lines) + "\n"
