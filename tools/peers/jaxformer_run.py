"""Our own side of the comparison: jaxformer trained by tools/benchmark.py in the
repository's virtual environment, with the shape as ``--config.`` overrides."""

from __future__ import annotations

import re
import sys
from pathlib import Path

from peers.common import ROOT, PeerError, RunResult, Shape, child_env, run_logged

NAME = "jaxformer"
PYTHON = ROOT / ".venv" / "bin" / "python"
# Distributions whose versions are recorded.
VERSIONS = ("jax", "jaxlib", "flax", "optax")
# How the step time is measured, for the BENCHMARKS.md section.
STEP_TIME = "jaxformer, `tools/benchmark.py`'s median (each step run to completion)"
RESULT_LINE = re.compile(
    r": (?P<params>[\d,]+) params, step (?P<median>[\d.]+) \([\d.]+-[\d.]+\) s, .*"
    r"loss (?P<loss>[\d.naif-]+)"
)


def overrides(shape: Shape) -> list[str]:
    """``--config.`` overrides of configs/default.py for ``shape``."""
    return [
        f"--config.model.vocab_size={shape.vocab}",
        f"--config.model.d_model={shape.d_model}",
        f"--config.model.num_layers={shape.layers}",
        f"--config.model.num_heads={shape.heads}",
        f"--config.model.num_kv_heads={shape.heads}",
        f"--config.model.head_dim={shape.head_dim}",
        f"--config.model.d_ff={shape.d_ff}",
        "--config.model.mlp=swiglu",
        "--config.model.norm=rmsnorm",
        "--config.model.position=rope",
        "--config.model.tie_embeddings=False",
        "--config.model.remat=none",
        f"--config.model.dtype={shape.dtype}",
        f"--config.model.max_len={shape.seq}",
        f"--config.data.seq_len={shape.seq}",
        f"--config.train.global_batch={shape.batch}",
    ]


def run(
    shape: Shape, steps: int, warmup: int, log: Path, timeout: float, extra: list[str]
) -> RunResult:
    """Train with tools/benchmark.py in the repository's own virtual environment; ``extra``
    ``--config.`` overrides come after the shape's (e.g. ``--config.train.loss_chunk=64``)."""
    cmd = [
        str(PYTHON if PYTHON.exists() else sys.executable),
        str(ROOT / "tools" / "benchmark.py"),
        "--config=" + str(ROOT / "configs" / "default.py"),
        *overrides(shape),
        *extra,
        f"--steps={steps}",
        f"--warmup={warmup}",
    ]
    text = run_logged(cmd, log, child_env(), timeout, ROOT)
    match = RESULT_LINE.search(text)
    if not match:
        raise PeerError(f"no result line in tools/benchmark.py output (log: {log})")
    return RunResult(
        NAME,
        0,
        median=float(match["median"]),
        params=int(match["params"].replace(",", "")),
        loss=float(match["loss"]),
    )
