"""launch/xla_gpu_flags.sh names only flags this jaxlib knows: XLA aborts at start-up on
an unknown flag, so a renamed or removed flag would break every GPU launch."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_xla_flags_are_known_to_the_installed_jaxlib() -> None:
    flags = subprocess.run(
        ["bash", "-c", ". launch/xla_gpu_flags.sh && printf %s \"$XLA_FLAGS\""],
        cwd=ROOT, capture_output=True, text=True, check=True, env={"PATH": os.environ["PATH"]},
    ).stdout.split()  # fmt: skip
    assert len(flags) >= 8 and all(f.startswith("--xla_gpu_") for f in flags), flags
    env = {**os.environ, "XLA_FLAGS": " ".join(flags), "JAX_PLATFORMS": "cpu"}
    code = "import jax, jax.numpy as jnp; print(float(jax.jit(lambda x: x + 1)(jnp.ones(()))))"
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert run.returncode == 0 and run.stdout.strip() == "2.0", run.stderr[-2000:]
