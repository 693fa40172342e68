"""MaxText as a peer: its PyPI install on CPU, the shape as ``key=value`` overrides of its
base.yml, and the step times and parameter count parsed from its train loop's output."""

from __future__ import annotations

import re
import subprocess
import textwrap
from collections.abc import Callable
from pathlib import Path

from peers.common import (
    PeerError,
    RunResult,
    Shape,
    child_env,
    last_error,
    run_logged,
    timed_result,
)
from peers.venv import jax_pins

NAME = "maxtext"
# Distributions whose versions are recorded.
VERSIONS = ("maxtext", "jax", "jaxlib", "flax", "optax")
# How the step time is measured, for the BENCHMARKS.md section.
STEP_TIME = "MaxText, the `seconds:` of its `completed step` log lines (dispatch to dispatch)"
STEP_LINE = re.compile(r"completed step: (\d+), seconds: ([\d.]+),.*?loss: ([\d.naif-]+)")
PARAMS_LINE = re.compile(r"JAXFORMER_COMPARE_PARAMS (\d+)")
# MaxText logs its parameter count in billions with 3 decimals; this wrapper also prints
# the exact count (read-only: it wraps the function MaxText's own logger calls).
MAIN = textwrap.dedent(
    """
    import sys
    from maxtext.utils import max_utils
    _count = max_utils.calculate_num_params_from_pytree
    def _print_count(params):
        n = _count(params)
        print(f"JAXFORMER_COMPARE_PARAMS {int(n)}", flush=True)
        return n
    max_utils.calculate_num_params_from_pytree = _print_count
    from absl import app
    from maxtext.trainers.pre_train import train
    app.run(train.main, argv=sys.argv)
    """
)
# The requirements of MaxText's "tpu" extra that a CPU run needs (not libtpu, not CUDA).
_TPU_EXTRA = textwrap.dedent(
    """
    import importlib.metadata as m
    from pip._vendor.packaging.requirements import Requirement
    for r in m.requires("maxtext") or []:
        req = Requirement(r)
        if req.marker is None or not req.marker.evaluate({"extra": "tpu"}):
            continue
        name = req.name.lower()
        if name == "libtpu" or name.startswith(("nvidia-cu", "cuda-", "jax-cuda")):
            continue
        print(f"{req.name}{req.specifier}")
    """
)


def packages(version: str, jax_version: str | None) -> Callable[[Path], list[list[str]]]:
    """MaxText's wheel declares no base dependencies: ``--no-deps`` it, then install its
    ``tpu`` extra's requirements minus libtpu and the CUDA packages (and, with
    ``jax_version``, with jax and jaxlib pinned to it instead of the extra's bounds)."""

    def install(python: Path) -> list[list[str]]:
        wheel = subprocess.run(
            [str(python), "-m", "pip", "install", "--quiet", "--no-deps", f"maxtext=={version}"],
            capture_output=True,
            text=True,
            env=child_env(),
        )
        if wheel.returncode != 0:
            raise PeerError(f"pip install maxtext=={version}: {last_error(wheel.stderr)}")
        reqs = subprocess.run(
            [str(python), "-c", _TPU_EXTRA], capture_output=True, text=True, check=True
        ).stdout.split()
        if not reqs:
            raise PeerError(f"maxtext=={version} lists no 'tpu' extra to install")
        if jax_version:
            reqs = [r for r in reqs if re.split(r"[<>=!~ ]", r)[0].lower() not in ("jax", "jaxlib")]
        return [reqs + jax_pins(jax_version)]

    return install


def args(shape: Shape, steps: int, out_dir: Path) -> list[str]:
    """MaxText ``key=value`` overrides of its base.yml for ``shape``."""
    return [
        "run_name=compare",
        f"base_output_directory={out_dir}",
        "dataset_type=synthetic",
        "packing=false",  # one sequence per row, as the other two train
        'jax_cache_dir=""',
        f"steps={steps}",
        "enable_checkpointing=false",
        "enable_tensorboard=false",
        "enable_goodput_recording=false",
        "monitor_goodput=false",
        f"vocab_size={shape.vocab}",
        f"base_emb_dim={shape.d_model}",
        f"base_num_decoder_layers={shape.layers}",
        f"base_num_query_heads={shape.heads}",
        f"base_num_kv_heads={shape.heads}",
        f"head_dim={shape.head_dim}",
        f"base_mlp_dim={shape.d_ff}",
        "decoder_block=llama2",
        "mlp_activations=[silu,linear]",
        "logits_via_embedding=false",
        f"max_target_length={shape.seq}",
        f"per_device_batch_size={shape.batch}",
        f"dtype={shape.dtype}",
        "weight_dtype=float32",
        "remat_policy=minimal",  # its lightest policy: there is no "none"
        "scan_layers=true",
        "attention=dot_product",
        "log_period=1000000",
    ]


def run(
    python: Path, shape: Shape, steps: int, warmup: int, log: Path, timeout: float
) -> RunResult:
    """Train with MaxText's pre-training loop (``maxtext.trainers.pre_train.train``)."""
    found = subprocess.run(
        [
            str(python),
            "-c",
            "import maxtext, os; print(os.path.join(os.path.dirname(maxtext.__file__), "
            "'configs', 'base.yml'))",
        ],
        capture_output=True,
        text=True,
        env=child_env(),
    )
    if found.returncode != 0:
        raise PeerError(f"cannot import maxtext in {python}: {last_error(found.stderr)}")
    config = found.stdout.strip()
    out_dir = log.parent / (log.stem + "-out")
    cmd = [str(python), "-c", MAIN, config, *args(shape, warmup + steps, out_dir)]
    text = run_logged(cmd, log, child_env(), timeout, log.parent)
    times: dict[int, float] = {}
    loss = None
    for m in STEP_LINE.finditer(text):
        times[int(m[1])] = float(m[2])
        loss = float(m[3])
    return timed_result(
        NAME, times, 0, warmup, PARAMS_LINE.search(text), loss,
        f"no 'completed step' lines after step {warmup} (log: {log})",
    )  # fmt: skip
