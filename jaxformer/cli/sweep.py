"""``jaxformer sweep``: plan, run, collect and fit scaling-law sweeps (docs/scaling.md).

jaxformer sweep plan --spec configs/sweeps/micro.py --out sweeps/micro
jaxformer sweep run --plan sweeps/micro [--parallel K | --emit slurm|k8s]
jaxformer sweep collect --plan sweeps/micro --out sweeps/micro/table.csv
jaxformer sweep fit --table sweeps/micro/table.csv --budget 1e15 --plots sweeps/micro/plots

The arguments and the printing; the work is ``jaxformer.scaling``'s.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

from jaxformer.errors import ConfigError

log = logging.getLogger("jaxformer")


def add_parser(sub: Any) -> None:
    """Adds the ``sweep`` command and its subcommands to the top-level parser."""
    sweep = sub.add_parser("sweep", help="plan, run, collect and fit scaling-law sweeps")
    cmds = sweep.add_subparsers(dest="sweep_command", required=True)

    plan = cmds.add_parser("plan", help="turn a sweep spec into runs; print and write them")
    plan.add_argument("--spec", required=True, help="configs/sweeps/NAME.py")
    plan.add_argument("--out", required=True, help="plan directory (plan.json, configs/, runs/)")

    run = cmds.add_parser(
        "run", help="train a plan's runs (skipping finished ones, resuming started ones)"
    )
    run.add_argument("--plan", required=True, help="plan directory")
    run.add_argument("--parallel", type=int, default=1, help="runs trained at once")
    run.add_argument("--index", type=int, default=None, help="only this run (array index)")
    run.add_argument("--runs", default="", help="only these runs, comma separated")
    run.add_argument(
        "--gpus_per_run", type=int, default=0,
        help="give each concurrent run its own GPUs (CUDA_VISIBLE_DEVICES)",
    )  # fmt: skip
    run.add_argument(
        "--emit", choices=("slurm", "k8s"), default="",
        help="write a SLURM job array / Kubernetes Indexed Job for the plan instead",
    )  # fmt: skip
    run.add_argument(
        "--pod_plan_dir", default="", help="k8s: the plan directory as the pods see it"
    )

    collect = cmds.add_parser("collect", help="one CSV row per finished run")
    collect.add_argument("--plan", required=True, help="plan directory")
    collect.add_argument("--out", default="", help="CSV path (default: PLAN/table.csv)")
    collect.add_argument(
        "--smooth_fraction", type=float, default=0.1,
        help="smoothed losses average the records in this last fraction of the steps",
    )  # fmt: skip

    fit = cmds.add_parser("fit", help="fit Chinchilla approaches 2 and 3; optional plots")
    fit.add_argument("--table", required=True, help="CSV from `sweep collect`")
    fit.add_argument("--budget", type=float, default=0.0, help="compute budget C (FLOPs)")
    fit.add_argument(
        "--loss", default="eval_loss",
        help="loss column: eval_loss | eval_loss_smoothed | train_loss_smoothed",
    )  # fmt: skip
    fit.add_argument("--params", default="params", help="N column: params | non_embedding_params")
    fit.add_argument("--bootstrap", type=int, default=200, help="bootstrap resamples")
    fit.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    fit.add_argument("--plots", default="", help="write PNG and SVG plots into this directory")
    fit.add_argument("--json", default="", help="also write the fit as JSON to this path")


def _plan(args: argparse.Namespace) -> int:
    from jaxformer.scaling.sweep_plan import sweep_plan_from_spec, table, write_sweep_plan

    plan = sweep_plan_from_spec(args.spec)
    path = write_sweep_plan(plan, args.out)
    print(table(plan))
    print(f"wrote {path} and {len(plan.runs)} run configs under {Path(args.out) / 'configs'}")
    return 0


def _run(args: argparse.Namespace) -> int:
    from jaxformer.scaling import runner

    if args.emit:
        if args.parallel < 1:
            raise ConfigError(f"--parallel must be >= 1, got {args.parallel}")
        if args.emit == "slurm":
            path = runner.emit_slurm(args.plan, args.parallel)
            print(f"wrote {path}: submit it with  sbatch {path}")
        else:
            path = runner.emit_k8s(args.plan, args.parallel, args.pod_plan_dir)
            print(f"wrote {path}: apply it with  kubectl apply -f {path}")
        return 0
    names = [n for n in args.runs.split(",") if n]
    outcome = runner.run_plan(
        args.plan,
        parallel=args.parallel,
        index=args.index,
        names=names,
        gpus_per_run=args.gpus_per_run,
    )
    print(
        f"sweep run: {len(outcome.finished)} finished, {len(outcome.skipped)} already done, "
        f"{len(outcome.interrupted)} interrupted (resumable), {len(outcome.failed)} failed"
    )
    if outcome.failed:
        print(f"failed: {' '.join(outcome.failed)} (see PLAN/runs/NAME/train.log)", file=sys.stderr)
    if outcome.interrupted:
        print("run `jaxformer sweep run` again to resume the interrupted runs", file=sys.stderr)
    return outcome.exit_code


def _collect(args: argparse.Namespace) -> int:
    from jaxformer.scaling.collect import collect, write_csv

    rows, missing = collect(args.plan, args.smooth_fraction)
    out = args.out or str(Path(args.plan) / "table.csv")
    write_csv(rows, out)
    print(f"wrote {len(rows)} runs to {out}")
    if missing:
        print(f"not finished (left out): {' '.join(missing)}", file=sys.stderr)
    return 0


def _fit(args: argparse.Namespace) -> int:
    import json

    from jaxformer.scaling import fit

    result = fit.fit_table(
        args.table,
        loss=args.loss,
        params=args.params,
        bootstrap=args.bootstrap,
        seed=args.seed,
        budget=args.budget or None,
    )
    print(fit.report(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    if args.plots:
        from jaxformer.scaling import plots

        for path in plots.plot_all(result, args.plots):
            print(f"wrote {path}")
    return 0


def main(args: argparse.Namespace, rest: list[str]) -> int:
    """Runs ``jaxformer sweep ...``; returns the process exit code."""
    if rest:
        print(f"jaxformer sweep: unrecognised arguments: {' '.join(rest)}", file=sys.stderr)
        return 2
    commands = {"plan": _plan, "run": _run, "collect": _collect, "fit": _fit}
    try:
        return commands[args.sweep_command](args)
    except ConfigError as err:
        print(f"jaxformer sweep: {err}", file=sys.stderr)
        return 2
