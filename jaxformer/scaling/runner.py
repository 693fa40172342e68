"""``jaxformer sweep run``: train a plan's runs here, or write the job array a cluster runs.

Every run is one ``jaxformer train`` subprocess writing into ``PLAN/runs/NAME``. The
trainer resumes from the latest checkpoint of its run_dir by itself, so running a plan
again is always safe: a run whose final-step checkpoint exists is finished and skipped,
one with earlier checkpoints resumes, one without starts. A trainer stopped by SIGTERM
saves a checkpoint and exits with 75 (EX_TEMPFAIL): that run is interrupted, not failed.
On SIGTERM or Ctrl-C this runner passes SIGTERM on to its trainers, waits for their
checkpoints and exits with 75 itself, so a preempted sweep resumes where it stopped.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import FrameType
from typing import IO

from jaxformer.config import ConfigError
from jaxformer.scaling.spec import resolve_config_path
from jaxformer.scaling.sweep_plan import PlannedRun, SweepPlan, load_sweep_plan

log = logging.getLogger("jaxformer")

EXIT_INTERRUPTED = 75  # the trainer's exit status after a checkpoint on SIGTERM (EX_TEMPFAIL)


def run_dir(plan_dir: str | Path, run: PlannedRun) -> Path:
    return Path(plan_dir) / "runs" / run.name


def checkpoint_steps(directory: Path) -> list[int]:
    """Steps of the complete checkpoints in a run dir. Orbax renames a step's temporary
    directory to the bare step number only once every item is written."""
    ckpts = directory / "checkpoints"
    if not ckpts.is_dir():
        return []
    return sorted(int(p.name) for p in ckpts.iterdir() if p.is_dir() and p.name.isdigit())


def status(plan_dir: str | Path, run: PlannedRun) -> str:
    """'done' (the final step's checkpoint exists), 'partial' (earlier ones) or 'new'."""
    steps = checkpoint_steps(run_dir(plan_dir, run))
    if steps and steps[-1] >= run.steps:
        return "done"
    return "partial" if steps else "new"


def train_command(plan: SweepPlan, plan_dir: str | Path, run: PlannedRun) -> list[str]:
    """The ``jaxformer train`` command line of one run (the same Python as this process)."""
    base = resolve_config_path(plan.base_config)
    return [
        sys.executable,
        "-m",
        "jaxformer.cli",
        "train",
        f"--config={base}",
        *run.overrides,
        f"--config.train.run_dir={run_dir(plan_dir, run)}",
    ]


def select(
    plan: SweepPlan, index: int | None = None, names: Sequence[str] = ()
) -> list[PlannedRun]:
    """The runs an array task (``index``) or a user (``names``) asks for; all by default."""
    if index is not None:
        if not 0 <= index < len(plan.runs):
            last = len(plan.runs) - 1
            raise ConfigError(f"--index {index} is outside the plan's runs (0..{last})")
        return [plan.runs[index]]
    if names:
        return [plan.run(n) for n in names]
    return list(plan.runs)


@dataclasses.dataclass
class Outcome:
    """What ``run_plan`` did with each run."""

    skipped: list[str] = dataclasses.field(default_factory=list)  # finished before
    finished: list[str] = dataclasses.field(default_factory=list)
    interrupted: list[str] = dataclasses.field(default_factory=list)  # resumable
    failed: list[str] = dataclasses.field(default_factory=list)

    @property
    def exit_code(self) -> int:
        if self.failed:
            return 1
        return EXIT_INTERRUPTED if self.interrupted else 0


class _Stop:
    """Set by SIGTERM/SIGINT: launch nothing more, pass SIGTERM on to the trainers."""

    def __init__(self) -> None:
        self.requested = False
        self.children: list[subprocess.Popen] = []

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        if not self.requested:
            log.info("sweep: signal %d, stopping the running trainers at a checkpoint", signum)
        self.requested = True
        for child in self.children:
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)


def run_plan(
    plan_dir: str | Path,
    *,
    parallel: int = 1,
    index: int | None = None,
    names: Sequence[str] = (),
    gpus_per_run: int = 0,
    env: Mapping[str, str] | None = None,
    poll_s: float = 0.5,
) -> Outcome:
    """Trains the selected runs of a plan, ``parallel`` at a time; see the module docstring.

    ``gpus_per_run`` > 0 gives concurrent slot i the GPUs i*g .. i*g+g-1 (CUDA_VISIBLE_DEVICES).
    """
    if parallel < 1:
        raise ConfigError(f"--parallel must be >= 1, got {parallel}")
    plan = load_sweep_plan(plan_dir)
    outcome = Outcome()
    queue: list[PlannedRun] = []
    for run in select(plan, index, names):
        state = status(plan_dir, run)
        if state == "done":
            outcome.skipped.append(run.name)
        else:
            queue.append(run)
            log.info(
                "sweep: %s %s (%d steps)",
                "resuming" if state == "partial" else "queued",
                run.name,
                run.steps,
            )
    if outcome.skipped:
        log.info(
            "sweep: %d run(s) already finished: %s", len(outcome.skipped), " ".join(outcome.skipped)
        )
    if not queue:
        return outcome

    stop = _Stop()
    previous = {}
    if threading.current_thread() is threading.main_thread():  # signals reach only it
        previous = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
    running: dict[int, tuple[PlannedRun, subprocess.Popen, IO[str]]] = {}  # slot -> run
    base_env = dict(os.environ if env is None else env)
    try:
        while queue or running:
            free = [s for s in range(parallel) if s not in running]
            while queue and free and not stop.requested:
                slot, run = free.pop(0), queue.pop(0)
                directory = run_dir(plan_dir, run)
                directory.mkdir(parents=True, exist_ok=True)
                child_env = dict(base_env)
                if gpus_per_run:
                    ids = range(slot * gpus_per_run, (slot + 1) * gpus_per_run)
                    child_env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, ids))
                logfile = open(directory / "train.log", "a")  # noqa: SIM115 - closed on exit
                logfile.write(f"\n=== jaxformer sweep run {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
                logfile.flush()
                child = subprocess.Popen(
                    train_command(plan, plan_dir, run),
                    stdout=logfile,
                    stderr=subprocess.STDOUT,
                    env=child_env,
                )
                stop.children.append(child)
                running[slot] = (run, child, logfile)
                log.info(
                    "sweep: started %s (pid %d, log %s)",
                    run.name,
                    child.pid,
                    directory / "train.log",
                )
            if stop.requested:
                queue.clear()
            time.sleep(poll_s)
            for slot, (run, child, logfile) in list(running.items()):
                code = child.poll()
                if code is None:
                    continue
                logfile.close()
                del running[slot]
                stop.children.remove(child)
                if code == 0 and status(plan_dir, run) == "done":
                    outcome.finished.append(run.name)
                    log.info("sweep: finished %s", run.name)
                elif code == EXIT_INTERRUPTED or stop.requested:
                    outcome.interrupted.append(run.name)
                    log.info("sweep: interrupted %s (resumable from its checkpoint)", run.name)
                else:
                    outcome.failed.append(run.name)
                    log.error(
                        "sweep: %s failed with exit status %d; see %s",
                        run.name,
                        code,
                        run_dir(plan_dir, run) / "train.log",
                    )
    finally:
        for _, child, logfile in running.values():  # only after an error here: no orphans
            child.send_signal(signal.SIGTERM)
            child.wait()
            logfile.close()
        for s, handler in previous.items():
            signal.signal(s, handler)
    return outcome


def _k8s_name(name: str) -> str:
    """A DNS-1123 label for the Job: lowercase alphanumerics and '-'."""
    label = re.sub(r"[^a-z0-9-]+", "-", f"sweep-{name}".lower()).strip("-")
    return label[:52].rstrip("-")


def emit_slurm(plan_dir: str | Path, parallel: int) -> Path:
    """Writes PLAN/sweep.sbatch: a SLURM job array, one task per run, ``parallel`` at once."""
    plan = load_sweep_plan(plan_dir)
    where = Path(plan_dir).absolute()
    n = len(plan.runs)
    names = "\n".join(f"#   {i:>3}  {r.name}" for i, r in enumerate(plan.runs))
    text = f"""#!/usr/bin/env bash
# Scaling-law sweep '{plan.name}' on SLURM: one array task per run ({n} runs), at most
# {parallel} at once, each one process on one node (single-GPU runs: edit the #SBATCH lines
# for larger ones, as in launch/slurm.sbatch).
#
#   sbatch {where / "sweep.sbatch"}
#
# Submit from the jaxformer checkout (the base config '{plan.base_config}' is relative to
# it); {where} must be on a filesystem every node mounts. Each task runs
# `jaxformer sweep run --index I`, which skips a finished run and resumes a started one,
# so resubmitting the array is always safe. SLURM sends SIGTERM two minutes before the
# time limit (--signal); the trainer checkpoints and exits with 75, and the task
# requeues itself to resume. Then: jaxformer sweep collect --plan {where}
#
# Array index -> run:
{names}
#
#SBATCH --job-name=sweep-{plan.name}
#SBATCH --array=0-{n - 1}%{parallel}
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --gpus-per-task=1
#SBATCH --cpus-per-task=8
#SBATCH --time=24:00:00
#SBATCH --signal=B:TERM@120
#SBATCH --requeue
#SBATCH --output={where}/logs/%x-%A_%a.out
set -euo pipefail

cd "${{SLURM_SUBMIT_DIR:?not inside a SLURM job}}"
# shellcheck source=/dev/null
if [ -f .venv/bin/activate ]; then . .venv/bin/activate; fi

# The batch shell gets SLURM's SIGTERM (B:); pass it on to the sweep runner, which passes
# it on to the trainer.
jaxformer sweep run --plan {where} --index "$SLURM_ARRAY_TASK_ID" &
child=$!
trap 'kill -TERM "$child" 2>/dev/null || true' TERM
status=0
while :; do
  wait "$child" && status=0 || status=$?
  kill -0 "$child" 2>/dev/null || break
done
if [ "$status" = {EXIT_INTERRUPTED} ]; then
  scontrol requeue "${{SLURM_ARRAY_JOB_ID}}_${{SLURM_ARRAY_TASK_ID}}"
fi
exit "$status"
"""
    (where / "logs").mkdir(parents=True, exist_ok=True)
    path = where / "sweep.sbatch"
    path.write_text(text)
    path.chmod(0o755)
    return path


def emit_k8s(plan_dir: str | Path, parallel: int, pod_plan_dir: str = "") -> Path:
    """Writes PLAN/sweep-k8s.yaml: an Indexed Job, one completion index per run."""
    plan = load_sweep_plan(plan_dir)
    where = Path(plan_dir).absolute()
    pod_dir = pod_plan_dir or f"/runs/sweeps/{where.name}"
    if not pod_dir.startswith("/") or len(Path(pod_dir).parts) < 3:
        raise ConfigError(
            f"--pod_plan_dir must be an absolute path below a mount point, got {pod_dir!r}"
        )
    n = len(plan.runs)
    name = _k8s_name(plan.name)
    text = f"""# Scaling-law sweep '{plan.name}' on Kubernetes: an Indexed Job, one completion index
# per run ({n} runs), at most {parallel} pods at once, one single-GPU pod per run.
#
#   kubectl cp {where} <pod-with-the-volume>:{pod_dir}   # or copy it onto the volume otherwise
#   kubectl apply -f {where / "sweep-k8s.yaml"}
#   kubectl get pods -l job-name={name}
#
# Before applying, set the image (one with this repository installed: pip install -e .,
# working directory the checkout, as for launch/k8s/jobset.yaml), the GPUs per pod and a
# ReadWriteMany volume holding the plan at {pod_dir}. Each pod runs
# `jaxformer sweep run --index I`: a finished run is skipped, a started one resumes from
# its checkpoint. A pod evicted or preempted (the trainer checkpoints on SIGTERM and exits
# with 75) is replaced without counting against the backoff limit.
apiVersion: batch/v1
kind: Job
metadata:
  name: {name}
spec:
  completions: {n}
  parallelism: {parallel}
  completionMode: Indexed
  backoffLimitPerIndex: 2  # real failures retried twice per run
  maxFailedIndexes: {n}  # one failing run does not stop the others
  podFailurePolicy:
    rules:
      - action: Ignore  # interrupted at a checkpoint: resume in a new pod
        onExitCodes:
          containerName: jaxformer
          operator: In
          values: [{EXIT_INTERRUPTED}]
      - action: Ignore  # evicted, preempted or drained
        onPodConditions:
          - type: DisruptionTarget
  template:
    spec:
      restartPolicy: Never
      terminationGracePeriodSeconds: 120  # time to write the checkpoint after SIGTERM
      containers:
        - name: jaxformer
          image: REGISTRY/jaxformer:latest  # TODO: your image
          command: ["jaxformer", "sweep", "run"]
          args: ["--plan", "{pod_dir}", "--index", "$(RUN_INDEX)"]
          env:
            - name: RUN_INDEX
              valueFrom:
                fieldRef:
                  fieldPath: metadata.annotations['batch.kubernetes.io/job-completion-index']
          resources:
            limits:
              nvidia.com/gpu: 1  # GPUs per run
          volumeMounts:
            - name: runs
              mountPath: {"/" + Path(pod_dir).parts[1]}
      volumes:
        - name: runs
          persistentVolumeClaim:
            claimName: jaxformer-runs  # TODO: a ReadWriteMany claim
"""
    path = where / "sweep-k8s.yaml"
    path.write_text(text)
    return path
