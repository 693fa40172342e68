"""Compare training throughput of jaxformer, MaxText and Levanter on one decoder shape.

    python tools/compare_frameworks.py --rounds=3 --steps=10 --warmup=3 \\
        --write --out=BENCHMARKS.md

MaxText and Levanter are installed from PyPI into their own virtual environments under
``--cache-dir`` (default ``~/.cache/jaxformer-compare``, or ``$JAXFORMER_COMPARE_CACHE``),
created on first use with Python 3.12 (which both require). The three frameworks then train
the same LLaMA-style decoder (RMSNorm, RoPE, SwiGLU MLP, untied input and output embeddings,
no remat, AdamW, float32 unless ``--dtype`` says otherwise) on synthetic tokens on this
machine's CPU, one process at a time and alternately (jaxformer, MaxText, Levanter,
jaxformer, ...) for ``--rounds`` rounds, so that load from elsewhere on the machine spreads
over all three. Each process runs ``--warmup`` untimed steps (the first includes compilation)
then ``--steps`` timed ones; its step times are parsed from the framework's own output:

- jaxformer: ``tools/benchmark.py`` (each step run to completion; it prints the median);
- MaxText: the ``completed step: N, seconds: S`` lines of its train loop (time between
  dispatches of consecutive steps, which in steady state is the step time);
- Levanter: the ``throughput/duration`` its JSON-logger tracker logs per step (the step to
  completion, without loading the batch).

Reported per framework: the median over rounds of each round's median step time (with the
range over rounds), tokens/s = global batch x sequence / that, and its ratio to jaxformer's.
The parameter count each framework reports is printed beside the analytic one, and a
mismatch of more than 3% is flagged, since then the shapes differ.

A peer that cannot be installed or run is reported with its error in the table; the
others are still compared. How to read the result: docs/performance.md, "Comparing with
MaxText and Levanter".
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FRAMEWORKS = ("jaxformer", "maxtext", "levanter")
PARAM_TOLERANCE = 0.03
PYTHON312_CANDIDATES = ("python3.12", "/root/.pyenv/versions/3.12.1/bin/python3.12")
# Distributions whose versions are recorded, per framework.
VERSIONS = {
    "jaxformer": ("jax", "jaxlib", "flax", "optax"),
    "maxtext": ("maxtext", "jax", "jaxlib", "flax", "optax"),
    "levanter": ("marin-levanter", "marin-haliax", "equinox", "jax", "jaxlib", "optax"),
}


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


# ----------------------------------------------------------------------------- helpers


def _run_logged(cmd: list[str], log: Path, env: dict[str, str], timeout: float, cwd: Path) -> str:
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
        raise PeerError(f"exit status {proc.returncode}: {_last_error(text)} (log: {log})")
    return text


def _last_error(text: str) -> str:
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


def _child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
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


def _find_python312(given: str | None) -> str:
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


def _versions(python: str, names: tuple[str, ...]) -> dict[str, str]:
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


def _machine() -> str:
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


# ----------------------------------------------------------------------------- installs


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
    env = _child_env()
    if not python.exists():
        _run_logged([python312, "-m", "venv", str(venv)], log, env, 600, cache)
    for i, args in enumerate(packages(python)):
        _run_logged(
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
        [str(python), "-m", "pip", "freeze"], capture_output=True, text=True, env=_child_env()
    )
    if out.returncode == 0:
        path.write_text(out.stdout)


def _jax_pins(jax_version: str | None) -> list[str]:
    return [f"jax=={jax_version}", f"jaxlib=={jax_version}"] if jax_version else []


def _maxtext_packages(version: str, jax_version: str | None) -> Callable[[Path], list[list[str]]]:
    """MaxText's wheel declares no base dependencies: ``--no-deps`` it, then install its
    ``tpu`` extra's requirements minus libtpu and the CUDA packages (and, with
    ``jax_version``, with jax and jaxlib pinned to it instead of the extra's bounds)."""

    def packages(python: Path) -> list[list[str]]:
        wheel = subprocess.run(
            [str(python), "-m", "pip", "install", "--quiet", "--no-deps", f"maxtext=={version}"],
            capture_output=True,
            text=True,
            env=_child_env(),
        )
        if wheel.returncode != 0:
            raise PeerError(f"pip install maxtext=={version}: {_last_error(wheel.stderr)}")
        code = textwrap.dedent(
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
        reqs = subprocess.run(
            [str(python), "-c", code], capture_output=True, text=True, check=True
        ).stdout.split()
        if not reqs:
            raise PeerError(f"maxtext=={version} lists no 'tpu' extra to install")
        if jax_version:
            reqs = [r for r in reqs if re.split(r"[<>=!~ ]", r)[0].lower() not in ("jax", "jaxlib")]
        return [reqs + _jax_pins(jax_version)]

    return packages


def _levanter_packages(
    version: str | None, jax_version: str | None
) -> Callable[[Path], list[list[str]]]:
    """``pip install marin-levanter`` (its CPU jax comes with it, or ``jax_version``)."""
    spec = f"marin-levanter=={version}" if version else "marin-levanter"
    return lambda python: [[spec, *_jax_pins(jax_version)]]


# ----------------------------------------------------------------------------- jaxformer


def jaxformer_overrides(shape: Shape) -> list[str]:
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


JAXFORMER_LINE = re.compile(
    r": (?P<params>[\d,]+) params, step (?P<median>[\d.]+) \([\d.]+-[\d.]+\) s, .*"
    r"loss (?P<loss>[\d.naif-]+)"
)


def run_jaxformer(
    shape: Shape, steps: int, warmup: int, log: Path, timeout: float, extra: list[str]
) -> RunResult:
    """Train with tools/benchmark.py in the repository's own virtual environment; ``extra``
    ``--config.`` overrides come after the shape's (e.g. ``--config.train.loss_chunk=64``)."""
    python = ROOT / ".venv" / "bin" / "python"
    cmd = [
        str(python if python.exists() else sys.executable),
        str(ROOT / "tools" / "benchmark.py"),
        "--config=" + str(ROOT / "configs" / "default.py"),
        *jaxformer_overrides(shape),
        *extra,
        f"--steps={steps}",
        f"--warmup={warmup}",
    ]
    text = _run_logged(cmd, log, _child_env(), timeout, ROOT)
    match = JAXFORMER_LINE.search(text)
    if not match:
        raise PeerError(f"no result line in tools/benchmark.py output (log: {log})")
    return RunResult(
        "jaxformer",
        0,
        median=float(match["median"]),
        params=int(match["params"].replace(",", "")),
        loss=float(match["loss"]),
    )


def _timed_result(
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


# ----------------------------------------------------------------------------- MaxText

MAXTEXT_STEP = re.compile(r"completed step: (\d+), seconds: ([\d.]+),.*?loss: ([\d.naif-]+)")
MAXTEXT_PARAMS = re.compile(r"JAXFORMER_COMPARE_PARAMS (\d+)")
# MaxText logs its parameter count in billions with 3 decimals; this wrapper also prints
# the exact count (read-only: it wraps the function MaxText's own logger calls).
MAXTEXT_MAIN = textwrap.dedent(
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


def maxtext_args(shape: Shape, steps: int, out_dir: Path) -> list[str]:
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


def run_maxtext(
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
        env=_child_env(),
    )
    if found.returncode != 0:
        raise PeerError(f"cannot import maxtext in {python}: {_last_error(found.stderr)}")
    config = found.stdout.strip()
    out_dir = log.parent / (log.stem + "-out")
    cmd = [
        str(python),
        "-c",
        MAXTEXT_MAIN,
        config,
        *maxtext_args(shape, warmup + steps, out_dir),
    ]
    text = _run_logged(cmd, log, _child_env(), timeout, log.parent)
    times: dict[int, float] = {}
    loss = None
    for m in MAXTEXT_STEP.finditer(text):
        times[int(m[1])] = float(m[2])
        loss = float(m[3])
    return _timed_result(
        "maxtext", times, 0, warmup, MAXTEXT_PARAMS.search(text), loss,
        f"no 'completed step' lines after step {warmup} (log: {log})",
    )  # fmt: skip


# ----------------------------------------------------------------------------- Levanter


LEVANTER_MAIN = textwrap.dedent(
    """
    import dataclasses, sys
    import jax.numpy as jnp
    import numpy as np
    import levanter.config
    from levanter.data.dataset import ListAsyncDataset
    from levanter.data.text.datasets import DirectDatasetComponent
    from levanter.data.text.examples import GrugLmExample
    from levanter.main import train_lm

    VOCAB, SEQ, ROWS = (int(x) for x in sys.argv[1:4])
    TOKENIZER_DIR = sys.argv[4]

    def write_tokenizer(path):
        # Levanter's LLaMA checkpoint converter loads a tokenizer when the run starts (from
        # the hub unless model.tokenizer names a directory): a word-level one of VOCAB ids.
        import json, os
        from tokenizers import Tokenizer
        from tokenizers.models import WordLevel
        from tokenizers.pre_tokenizers import WhitespaceSplit
        os.makedirs(path, exist_ok=True)
        vocab = {"<unk>": 0, **{str(i): i for i in range(1, VOCAB)}}
        tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
        tok.pre_tokenizer = WhitespaceSplit()
        tok.save(os.path.join(path, "tokenizer.json"))
        with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
            json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "unk_token": "<unk>"}, f)
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump({"model_type": "llama", "vocab_size": VOCAB}, f)

    def main(config: train_lm.TrainLmConfig):
        write_tokenizer(TOKENIZER_DIR)
        # Synthetic tokens: a programmatic ("direct") dataset component in place of a cache.
        rng = np.random.default_rng(0)
        rows = [
            GrugLmExample.causal(jnp.asarray(rng.integers(0, VOCAB, SEQ, dtype=np.int32)))
            for _ in range(ROWS)
        ]
        train = DirectDatasetComponent(datasets={"train": ListAsyncDataset(rows)})
        data = dataclasses.replace(
            config.data, components={"synthetic": train}, train_weights=None
        )
        train_lm.main(dataclasses.replace(config, data=data))

    levanter.config.main(main, args=sys.argv[5:])()
    """
)
LEVANTER_STEP = re.compile(r'"step": (\d+), "metrics": \{[^\n]*?"throughput/duration": ([\d.e+-]+)')
LEVANTER_LOSS = re.compile(r'"step": (\d+), "metrics": \{[^\n]*?"train/loss": ([\d.e+-]+|NaN)')
LEVANTER_PARAMS = re.compile(r'"parameter_count": (\d+)')


def levanter_config(shape: Shape, steps: int, out_dir: Path) -> str:
    """Levanter's YAML config (``TrainLmConfig``) for ``shape``; the data is injected."""
    compute = {"float32": "f32", "bfloat16": "bf16"}[shape.dtype]
    return textwrap.dedent(
        f"""
        data:
          tokenizer: passthrough  # integer ids as they are: no tokenizer files, no hub
          vocab_size: {shape.vocab}
          cache_dir: {out_dir / "cache"}
        train_seq_len: {shape.seq}
        model:
          type: llama
          max_seq_len: {shape.seq}
          hidden_dim: {shape.d_model}
          intermediate_dim: {shape.d_ff}
          num_layers: {shape.layers}
          num_heads: {shape.heads}
          num_kv_heads: {shape.heads}
          head_dim: {shape.head_dim}
          activation_function: silu
          tie_word_embeddings: false
          gradient_checkpointing: false
          scan_layers: true
          tokenizer: {out_dir / "tokenizer"}
          reference_checkpoint: {out_dir / "tokenizer"}
        optimizer:
          learning_rate: 3e-3
          weight_decay: 0.1
        trainer:
          require_accelerator: false
          mp: p=f32,c={compute}
          tracker:
            type: json_logger
          watch:
            interval: 0
          train_batch_size: {shape.batch}
          num_train_steps: {steps}
          steps_per_eval: 100000000
          log_dir: {out_dir / "logs"}
          checkpointer:
            base_path: {out_dir / "checkpoints"}
            save_interval: 100000000s
            keep: []
        """
    )


def run_levanter(
    python: Path, shape: Shape, steps: int, warmup: int, log: Path, timeout: float
) -> RunResult:
    """Train with ``levanter.main.train_lm`` on a synthetic in-memory dataset."""
    out_dir = log.parent / (log.stem + "-out")
    out_dir.mkdir(parents=True, exist_ok=True)
    config = out_dir / "config.yaml"
    config.write_text(levanter_config(shape, warmup + steps, out_dir))
    rows = shape.batch * (warmup + steps)
    cmd = [
        str(python),
        "-c",
        LEVANTER_MAIN,
        str(shape.vocab),
        str(shape.seq),
        str(rows),
        str(out_dir / "tokenizer"),
        "--config_path",
        str(config),
    ]
    try:
        text = _run_logged(cmd, log, _child_env(), timeout, out_dir)
    finally:
        shutil.rmtree(out_dir / "checkpoints", ignore_errors=True)
    times = {int(m[1]): float(m[2]) for m in LEVANTER_STEP.finditer(text)}
    losses = {int(m[1]): float(m[2]) for m in LEVANTER_LOSS.finditer(text)}
    return _timed_result(
        "levanter", times, min(times) if times else 0, warmup,
        LEVANTER_PARAMS.search(text), losses[max(losses)] if losses else None,
        f"no 'throughput/duration' records after {warmup} steps (log: {log})",
    )  # fmt: skip


# ----------------------------------------------------------------------------- report


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
        if r["params"] and abs(r["params"] / shape.params - 1) > PARAM_TOLERANCE:
            params += f" (differs from {shape.params:,})"
        ratio = f"{r['ratio']:.2f}" if "ratio" in r else "-"
        loss = f"{r['loss']:.3f}" if r["loss"] is not None else "-"
        rounds = f"{r['rounds']} round(s)" + (f", {r['failed']} failed" if r["failed"] else "")
        lines.append(
            f"| {r['framework']} | {params} | {r['step']:.3f} [{r['lo']:.3f}-{r['hi']:.3f}], "
            f"{rounds} | {r['tokens_per_s']:,.0f} | {ratio} | {loss} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per process")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps (incl. compile)")
    parser.add_argument(
        "--frameworks", default=",".join(FRAMEWORKS), help="comma-separated subset, run order"
    )
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--d-ff", type=int, default=1024)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8, help="global batch (sequences)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument(
        "--cache-dir",
        default=os.environ.get(
            "JAXFORMER_COMPARE_CACHE", str(Path.home() / ".cache" / "jaxformer-compare")
        ),
        help="where the peers' virtual environments and the run logs live",
    )
    parser.add_argument("--python312", default=None, help="interpreter for the peers' venvs")
    parser.add_argument("--maxtext-version", default="0.2.5")
    parser.add_argument("--levanter-version", default=None, help="default: newest on PyPI")
    parser.add_argument(
        "--jaxformer-arg",
        action="append",
        default=[],
        metavar="--config.KEY=VALUE",
        help="extra override for jaxformer's run, after the shape's (repeatable)",
    )
    parser.add_argument(
        "--peer-jax",
        default=None,
        metavar="VERSION",
        help="pin jax and jaxlib in the peers' environments (own venvs, named <peer>-jaxVERSION); "
        "default: whatever each peer's requirements resolve to",
    )
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per process")
    parser.add_argument("--write", action="store_true", help="append the result to --out")
    parser.add_argument("--out", default=None, help="markdown file --write appends to")
    args = parser.parse_args(argv)
    argv = sys.argv[1:] if argv is None else argv
    if args.write and not args.out:
        parser.error("--write needs --out=FILE")
    frameworks = [f.strip() for f in args.frameworks.split(",") if f.strip()]
    unknown = set(frameworks) - set(FRAMEWORKS)
    if unknown:
        parser.error(f"unknown frameworks {sorted(unknown)}; choose from {FRAMEWORKS}")
    shape = Shape(
        args.vocab,
        args.d_model,
        args.layers,
        args.heads,
        args.head_dim,
        args.d_ff,
        args.seq,
        args.batch,
        args.dtype,
    )
    cache = Path(args.cache_dir).expanduser().resolve()
    cache.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    logs = cache / "logs" / stamp
    started = time.perf_counter()
    load_before = os.getloadavg()

    # Install (or find) each peer; a failure leaves that peer out, with its reason.
    pythons: dict[str, Path] = {}
    if "jaxformer" in frameworks:
        pythons["jaxformer"] = ROOT / ".venv" / "bin" / "python"
    install_errors: dict[str, str] = {}
    installers = {
        "maxtext": _maxtext_packages(args.maxtext_version, args.peer_jax),
        "levanter": _levanter_packages(args.levanter_version, args.peer_jax),
    }
    for fw in frameworks:
        if fw == "jaxformer":
            continue
        try:
            name = f"{fw}-jax{args.peer_jax}" if args.peer_jax else fw
            python312 = _find_python312(args.python312)
            pythons[fw] = ensure_venv(cache, name, python312, installers[fw])
        except (PeerError, subprocess.CalledProcessError, OSError) as e:
            install_errors[fw] = f"install failed: {e}"
            print(f"[{fw}] {install_errors[fw]}", flush=True)

    print(
        f"shape: vocab {shape.vocab}, d_model {shape.d_model}, {shape.layers} layers, "
        f"{shape.heads} heads x {shape.head_dim}, SwiGLU d_ff {shape.d_ff}, seq {shape.seq}, "
        f"global batch {shape.batch}, {shape.dtype}; {shape.params:,} params (untied); "
        f"{args.rounds} round(s) of {args.warmup} warm-up + {args.steps} timed steps; "
        f"logs in {logs}",
        flush=True,
    )
    results: list[RunResult] = [RunResult(fw, 0, error=err) for fw, err in install_errors.items()]
    runners = {
        "jaxformer": lambda log: run_jaxformer(
            shape, args.steps, args.warmup, log, args.timeout, args.jaxformer_arg
        ),
        "maxtext": lambda log: run_maxtext(
            pythons["maxtext"], shape, args.steps, args.warmup, log, args.timeout
        ),
        "levanter": lambda log: run_levanter(
            pythons["levanter"], shape, args.steps, args.warmup, log, args.timeout
        ),
    }
    for rnd in range(1, args.rounds + 1):
        for fw in frameworks:
            if fw in install_errors:
                continue
            log = logs / f"r{rnd}-{fw}.log"
            start = time.perf_counter()
            try:
                result = runners[fw](log)
            except (PeerError, subprocess.CalledProcessError, OSError) as e:
                result = RunResult(fw, rnd, error=str(e))
            result.round, result.log = rnd, log
            result.wall_s = time.perf_counter() - start
            results.append(result)
            if result.error:
                print(f"round {rnd} {fw}: FAILED ({result.wall_s:.0f} s): {result.error}")
            else:
                times = " ".join(f"{t:.3f}" for t in result.step_times)
                print(
                    f"round {rnd} {fw}: median step {result.median:.3f} s"
                    + (f" (steps: {times})" if times else "")
                    + f", params {result.params:,}" * bool(result.params)
                    + f", loss {result.loss}, {result.wall_s:.0f} s wall",
                    flush=True,
                )

    rows = summarise(shape, results, frameworks)
    versions = {fw: _versions(str(pythons[fw]), VERSIONS[fw]) for fw in pythons}
    wall = time.perf_counter() - started
    text = table(shape, rows)
    print()
    print(text)
    for r in rows:
        if r.get("params") and abs(r["params"] / shape.params - 1) > PARAM_TOLERANCE:
            print(
                f"WARNING: {r['framework']} reports {r['params']:,} params, "
                f"expected {shape.params:,}: the shapes differ"
            )
    print()
    for fw, v in versions.items():
        print(f"{fw}: " + ", ".join(f"{k} {x}" for k, x in v.items()))
    print(f"total wall time {wall:.0f} s")

    if args.write:
        # tools/ is this script's directory, so on sys.path; benchmark.py imports jax, so
        # only here, once the runs are done.
        from benchmark import git_commit

        command = "python tools/compare_frameworks.py " + shlex.join(argv)
        section = [
            f"\n## Side by side on CPU, {datetime.datetime.now():%Y-%m-%d %H:%M}\n",
            f"- machine: {_machine()}; load average (1/5/15 min) "
            f"{' '.join(f'{x:.1f}' for x in load_before)} at the start, "
            f"{' '.join(f'{x:.1f}' for x in os.getloadavg())} at the end",
            f"- jaxformer commit: {git_commit()}",
            f"- command: `{command}` ({wall:.0f} s wall)",
            f"- shape: vocab {shape.vocab}, d_model {shape.d_model}, {shape.layers} layers, "
            f"{shape.heads} heads x {shape.head_dim}, SwiGLU d_ff {shape.d_ff}, "
            f"seq {shape.seq}, global batch {shape.batch}, {shape.dtype}, untied embeddings, "
            f"no remat (MaxText: remat_policy=minimal), synthetic tokens; {shape.params:,} params",
            f"- {args.rounds} round(s), each process {args.warmup} warm-up + {args.steps} "
            "timed steps, frameworks alternating in the order " + ", ".join(frameworks),
        ]
        for fw, v in versions.items():
            section.append(f"- {fw}: " + ", ".join(f"{k} {x}" for k, x in v.items()))
            freeze = Path(pythons[fw]).parent.parent / "freeze.txt"
            if fw != "jaxformer" and freeze.exists():
                section[-1] += f" (all packages: `{freeze}`)"
        section += [
            "- step time: jaxformer, `tools/benchmark.py`'s median (each step run to "
            "completion); MaxText, the `seconds:` of its `completed step` log lines (dispatch "
            "to dispatch); Levanter, the `throughput/duration` its tracker logs (the step "
            "to completion, without data loading); the table gives the median over rounds "
            "of each process's median",
            "- loss: not comparable between frameworks (different initialisations and "
            "learning-rate schedules; jaxformer's synthetic tokens are ids 3-258, the "
            "peers' span the vocabulary)",
            "",
            text,
            "",
        ]
        path = Path(args.out)
        with path.open("a") as f:
            f.write("\n".join(section) + "\n")
        print(f"appended to {path}")
    return 0 if all("step" in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
