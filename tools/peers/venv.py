"""The peers' own virtual environments: MaxText and Levanter need Python 3.12 and pins of
their own, so each is installed from PyPI into a venv under the cache directory."""

from __future__ import annotations

import datetime
import json
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

from peers.common import PeerError, child_env, run_logged

PYTHON312_CANDIDATES = ("python3.12", "/root/.pyenv/versions/3.12.1/bin/python3.12")


def _is_python312(path: str) -> bool:
    """Whether ``path`` runs and is Python 3.12 (a pyenv shim may exist yet not run)."""
    try:
        out = subprocess.run(
            [path, "-c", "import sys; print(sys.version_info[:2] == (3, 12))"],
            capture_output=True,
            text=True,
            timeout=60,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return out.stdout.strip() == "True"


def find_python312(given: str | None) -> str:
    """The interpreter for the peers' environments: ``given``, else a working Python 3.12."""
    candidates = [given] if given else list(PYTHON312_CANDIDATES)
    if not given:
        candidates += sorted(
            str(p) for p in Path.home().glob(".pyenv/versions/3.12*/bin/python3.12")
        )
    for candidate in candidates:
        path = shutil.which(candidate) or (candidate if Path(candidate).is_file() else None)
        if path and _is_python312(path):
            return path
    if given:
        raise PeerError(f"--python312={given} is not a working Python 3.12")
    raise PeerError("no Python 3.12 found (MaxText and Levanter need it); pass --python312")


def versions(python: str, names: tuple[str, ...]) -> dict[str, str]:
    """Installed versions of ``names`` in the environment of ``python``."""
    code = (
        "import importlib.metadata as m, json, sys\n"
        "out = {}\n"
        "for n in sys.argv[1:]:\n"
        "    try: out[n] = m.version(n)\n"
        "    except m.PackageNotFoundError: out[n] = 'absent'\n"
        "print(json.dumps(out))\n"
    )
    try:
        proc = subprocess.run(
            [python, "-c", code, *names], capture_output=True, text=True, check=True
        )
        return json.loads(proc.stdout)
    except (OSError, subprocess.CalledProcessError, json.JSONDecodeError):
        return {n: "unknown" for n in names}


def jax_pins(jax_version: str | None) -> list[str]:
    """pip requirements pinning jax and jaxlib to ``jax_version`` (none without one)."""
    return [f"jax=={jax_version}", f"jaxlib=={jax_version}"] if jax_version else []


def ensure_venv(
    cache: Path, name: str, python312: str, packages: Callable[[Path], list[list[str]]]
) -> Path:
    """Create ``cache/name`` with Python 3.12 and run the pip installs ``packages`` lists.

    A ``.installed`` marker makes later calls free; delete the directory to reinstall. The
    resolved versions of everything installed are kept in ``freeze.txt`` beside it.
    """
    venv = cache / name
    python = venv / "bin" / "python"
    marker = venv / ".installed"
    if marker.exists() and python.exists():
        _freeze(python, venv / "freeze.txt")
        return python
    log = cache / f"{name}-install.log"
    print(f"[{name}] installing into {venv} (log: {log}) ...", flush=True)
    env = child_env()
    if not python.exists():
        run_logged([python312, "-m", "venv", str(venv)], log, env, 600, cache)
    for i, args in enumerate(packages(python)):
        run_logged(
            [str(python), "-m", "pip", "install", "--quiet", *args],
            log.with_suffix(f".{i}.log"),
            env,
            3600,
            cache,
        )
    marker.write_text(datetime.datetime.now().isoformat() + "\n")
    _freeze(python, venv / "freeze.txt")
    return python


def _freeze(python: Path, path: Path) -> None:
    """Write ``pip freeze`` of ``python``'s environment to ``path`` (once)."""
    if path.exists():
        return
    out = subprocess.run(
        [str(python), "-m", "pip", "freeze"], capture_output=True, text=True, env=child_env()
    )
    if out.returncode == 0:
        path.write_text(out.stdout)
