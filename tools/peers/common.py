"""What every framework's run shares: the decoder shape, result records, and running one
framework's process with its output logged and its failure turned into a ``PeerError``."""

from __future__ import annotations

import dataclasses
import os
import re
import shlex
import statistics
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


class PeerError(RuntimeError):
    """A framework that could not be installed or run; the message says why."""


@dataclasses.dataclass(frozen=True)
class Shape:
    """The decoder every framework trains."""

    vocab: int
    d_model: int
    layers: int
    heads: int
    head_dim: int
    d_ff: int
    seq: int
    batch: int
    dtype: str

    @property
    def params(self) -> int:
        """Parameters of the untied LLaMA-style decoder (no biases, RMSNorm scales only)."""
        attention = 4 * self.d_model * self.heads * self.head_dim
        mlp = 3 * self.d_model * self.d_ff
        block = attention + mlp + 2 * self.d_model
        return 2 * self.vocab * self.d_model + self.layers * block + self.d_model

    @property
    def tokens_per_step(self) -> int:
        return self.batch * self.seq


@dataclasses.dataclass
class RunResult:
    """One process of one framework: its timed step times (or their median) and params."""

    framework: str
    round: int
    median: float | None = None
    step_times: list[float] = dataclasses.field(default_factory=list)
    params: int | None = None
    loss: float | None = None
    wall_s: float = 0.0
    error: str | None = None
    log: Path | None = None


def run_logged(cmd: list[str], log: Path, env: dict[str, str], timeout: float, cwd: Path) -> str:
    """Run ``cmd`` with its stdout and stderr in ``log``; return that text, or raise."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as f:
        f.write("$ " + shlex.join(cmd) + "\n")
        f.flush()
        try:
            proc = subprocess.run(
                cmd,
                stdout=f,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=cwd,
                timeout=timeout,
                check=False,
            )
        except subprocess.TimeoutExpired as e:
            raise PeerError(f"timed out after {timeout:.0f} s (log: {log})") from e
    text = log.read_text(errors="replace")
    if proc.returncode != 0:
        raise PeerError(f"exit status {proc.returncode}: {last_error(text)} (log: {log})")
    return text


def last_error(text: str) -> str:
    """The most telling line of a failed run's output: its last exception or pip error."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("ERROR: ")]
    if errors:  # pip: the line before "ResolutionImpossible" names the conflict
        picked = [e for e in errors if "ResolutionImpossible" not in e] or errors
        return picked[-1][:600]
    for line in reversed(lines):
        if re.match(r"^[\w.]+(Error|Exception|Exit)\b", line) or "Error:" in line:
            return line[:400]
    return lines[-1][:400] if lines else "no output"


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for a framework's process: CPU only, offline, XLA's default flags (so no
    simulated multi-device CPU), no outside Python paths."""
    drop = ("PYTHONPATH", "VIRTUAL_ENV", "XLA_FLAGS", "JAX_NUM_CPU_DEVICES")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(
        JAX_PLATFORMS="cpu",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        WANDB_MODE="disabled",
        WANDB_SILENT="true",
        TF_CPP_MIN_LOG_LEVEL="1",
        PYTHONUNBUFFERED="1",
    )
    env.update(extra or {})
    return env


def timed_result(
    framework: str,
    times: dict[int, float],
    first: int,
    warmup: int,
    params: re.Match | None,
    loss: float | None,
    missing: str,
) -> RunResult:
    """A peer's result from its logged ``{step: seconds}``: the steps ``warmup`` or more
    after ``first`` are timed; none raises PeerError with ``missing``."""
    timed = [t for step, t in sorted(times.items()) if step - first >= warmup]
    if not timed:
        raise PeerError(missing)
    return RunResult(
        framework,
        0,
        step_times=timed,
        median=statistics.median(timed),
        params=int(params[1]) if params else None,
        loss=loss,
    )
