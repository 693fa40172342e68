"""`jaxformer sweep run` end to end on configs/sweeps/tiny.py: a preempted sweep resumes,
a finished one trains nothing, and `sweep collect` tabulates what ran."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from jaxformer.scaling import runner
from jaxformer.scaling.collect import collect, read_csv, write_csv
from jaxformer.scaling.sweep_plan import load_sweep_plan, sweep_plan_from_spec, write_sweep_plan

ROOT = Path(__file__).resolve().parent.parent


def _env() -> dict[str, str]:
    """One CPU device per trainer (conftest's 8 simulated ones only slow a tiny run)."""
    return {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}


@pytest.mark.slow
def test_sweep_run_resumes_after_sigterm_then_skips_finished_runs(tmp_path: Path) -> None:
    plan_dir = tmp_path / "tiny"
    write_sweep_plan(sweep_plan_from_spec(ROOT / "configs/sweeps/tiny.py"), plan_dir)
    plan = load_sweep_plan(plan_dir)
    short, long = plan.runs  # 30 and 400 steps, checkpoints every 4 and 50 steps
    assert (short.steps, long.steps) == (30, 400)

    # Preempt the whole sweep once the long run has a checkpoint and is still training.
    sweep = subprocess.Popen(
        [sys.executable, "-m", "jaxformer.cli", "sweep", "run", f"--plan={plan_dir}",
         "--parallel=2"],
        cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    deadline = time.time() + 240
    long_dir = runner.run_dir(plan_dir, long)
    while not runner.checkpoint_steps(long_dir) and sweep.poll() is None:
        assert time.time() < deadline, "the long run wrote no checkpoint in time"
        time.sleep(0.05)
    assert sweep.poll() is None, sweep.communicate()[0][-3000:]
    sweep.send_signal(signal.SIGTERM)
    out = sweep.communicate(timeout=120)[0]
    assert sweep.returncode == runner.EXIT_INTERRUPTED, out[-3000:]
    assert "interrupted" in out
    stopped_at = runner.checkpoint_steps(long_dir)[-1]
    assert 0 < stopped_at < long.steps
    assert runner.status(plan_dir, long) == "partial"

    # Running the plan again resumes the long run from its checkpoint (and finishes the
    # short one if the signal came first).
    outcome = runner.run_plan(plan_dir, parallel=2, env=_env(), poll_s=0.1)
    assert outcome.exit_code == 0 and not outcome.failed, outcome
    assert long.name in outcome.finished
    assert f"resumed from checkpoint at step {stopped_at}" in (long_dir / "train.log").read_text()
    assert runner.status(plan_dir, long) == runner.status(plan_dir, short) == "done"

    # A third time there is nothing to do: no trainer starts.
    started = time.perf_counter()
    again = runner.run_plan(plan_dir, parallel=2, env=_env())
    assert again.skipped == [short.name, long.name] and not again.finished
    assert time.perf_counter() - started < 5

    rows, missing = collect(plan_dir)
    assert not missing and [r["name"] for r in rows] == [short.name, long.name]
    write_csv(rows, tmp_path / "table.csv")
    table = {r["name"]: r for r in read_csv(tmp_path / "table.csv")}
    for run in (short, long):
        row = table[run.name]
        assert row["tokens"] == run.tokens and row["params"] == run.params
        assert row["flops"] == pytest.approx(run.flops)
        assert row["eval_loss"] > 0 and row["train_loss_smoothed"] > 0
    assert table[long.name]["eval_loss"] < table[short.name]["eval_loss"]
