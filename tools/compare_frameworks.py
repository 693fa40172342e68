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
import datetime
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from peers import jaxformer_run, levanter, maxtext, report
from peers.common import PeerError, RunResult, Shape
from peers.venv import ensure_venv, find_python312, versions

PEERS = {m.NAME: m for m in (maxtext, levanter)}
FRAMEWORKS = (jaxformer_run.NAME, *PEERS)
# Distributions whose versions are recorded, per framework.
VERSIONS = {jaxformer_run.NAME: jaxformer_run.VERSIONS, **{n: m.VERSIONS for n, m in PEERS.items()}}


def build_parser() -> argparse.ArgumentParser:
    """The command line: the shape, the protocol, the peers' versions, where results go."""
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
    return parser


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    """The parsed flags and the frameworks to run, in order; bad combinations exit."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.write and not args.out:
        parser.error("--write needs --out=FILE")
    frameworks = [f.strip() for f in args.frameworks.split(",") if f.strip()]
    unknown = set(frameworks) - set(FRAMEWORKS)
    if unknown:
        parser.error(f"unknown frameworks {sorted(unknown)}; choose from {FRAMEWORKS}")
    return args, frameworks


def shape_of(args: argparse.Namespace) -> Shape:
    """The decoder the flags describe."""
    return Shape(
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


def install_peers(
    args: argparse.Namespace, frameworks: list[str], cache: Path
) -> tuple[dict[str, Path], dict[str, str]]:
    """Each framework's interpreter, and why a peer could not be installed: a failure leaves
    that peer out of the rounds (its row names the reason) rather than ending the run."""
    pythons: dict[str, Path] = {}
    if jaxformer_run.NAME in frameworks:
        pythons[jaxformer_run.NAME] = jaxformer_run.PYTHON
    errors: dict[str, str] = {}
    installers = {
        maxtext.NAME: maxtext.packages(args.maxtext_version, args.peer_jax),
        levanter.NAME: levanter.packages(args.levanter_version, args.peer_jax),
    }
    for fw in frameworks:
        if fw not in PEERS:
            continue
        try:
            name = f"{fw}-jax{args.peer_jax}" if args.peer_jax else fw
            python312 = find_python312(args.python312)
            pythons[fw] = ensure_venv(cache, name, python312, installers[fw])
        except (PeerError, subprocess.CalledProcessError, OSError) as e:
            errors[fw] = f"install failed: {e}"
            print(f"[{fw}] {errors[fw]}", flush=True)
    return pythons, errors


def make_runners(
    args: argparse.Namespace, shape: Shape, pythons: dict[str, Path]
) -> dict[str, Callable[[Path], RunResult]]:
    """Per framework, one process's run given its log path (the peers in their own venvs)."""
    runners: dict[str, Callable[[Path], RunResult]] = {
        jaxformer_run.NAME: lambda log: jaxformer_run.run(
            shape, args.steps, args.warmup, log, args.timeout, args.jaxformer_arg
        )
    }
    for name, peer in PEERS.items():
        runners[name] = lambda log, name=name, peer=peer: peer.run(
            pythons[name], shape, args.steps, args.warmup, log, args.timeout
        )
    return runners


def run_rounds(
    rounds: int, frameworks: list[str], runners: dict[str, Callable[[Path], RunResult]], logs: Path
) -> list[RunResult]:
    """Every framework once per round, alternating, so that outside load spreads over all;
    a process that fails gives a result with its error and the rest still run."""
    results = []
    for rnd in range(1, rounds + 1):
        for fw in frameworks:
            log = logs / f"r{rnd}-{fw}.log"
            start = time.perf_counter()
            try:
                result = runners[fw](log)
            except (PeerError, subprocess.CalledProcessError, OSError) as e:
                result = RunResult(fw, rnd, error=str(e))
            result.round, result.log = rnd, log
            result.wall_s = time.perf_counter() - start
            results.append(result)
            print(report.round_line(result), flush=True)
    return results


def write_section(
    args: argparse.Namespace,
    argv: list[str],
    shape: Shape,
    frameworks: list[str],
    text: str,
    found: dict[str, dict[str, str]],
    pythons: dict[str, Path],
    wall: float,
    load_before: tuple[float, ...],
) -> None:
    """Append the result, with how it was measured, to ``--out``."""
    # tools/ is this script's directory, so on sys.path; benchmark.py imports jax, so only
    # here, once the runs are done.
    from benchmark import git_commit

    section = report.section(
        shape, text, found, pythons,
        frameworks=frameworks, rounds=args.rounds, warmup=args.warmup, steps=args.steps,
        command="python tools/compare_frameworks.py " + shlex.join(argv),
        commit=git_commit(), wall=wall, load_before=load_before,
        step_times=[m.STEP_TIME for m in (jaxformer_run, *PEERS.values())],
    )  # fmt: skip
    path = Path(args.out)
    with path.open("a") as f:
        f.write(section)
    print(f"appended to {path}")


def main(argv: list[str] | None = None) -> int:
    """Install the peers, train every framework in alternating rounds, report the table;
    exit status 1 when any framework has no result."""
    args, frameworks = parse_args(argv)
    argv = sys.argv[1:] if argv is None else argv
    shape = shape_of(args)
    cache = Path(args.cache_dir).expanduser().resolve()
    cache.mkdir(parents=True, exist_ok=True)
    logs = cache / "logs" / datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    started = time.perf_counter()
    load_before = os.getloadavg()

    pythons, install_errors = install_peers(args, frameworks, cache)
    print(report.start_line(shape, args.rounds, args.warmup, args.steps, logs), flush=True)
    results = [RunResult(fw, 0, error=err) for fw, err in install_errors.items()]
    runnable = [fw for fw in frameworks if fw not in install_errors]
    results += run_rounds(args.rounds, runnable, make_runners(args, shape, pythons), logs)

    rows = report.summarise(shape, results, frameworks)
    found = {fw: versions(str(pythons[fw]), VERSIONS[fw]) for fw in pythons}
    wall = time.perf_counter() - started
    text = report.table(shape, rows)
    report.print_summary(shape, rows, text, found, wall)
    if args.write:
        write_section(args, argv, shape, frameworks, text, found, pythons, wall, load_before)
    return 0 if all("step" in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
