"""Fault injection: preemption, kills mid-save, damaged checkpoints, resuming on other
topologies, bad steps and config changes on resume (docs/reliability.md)."""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import TINY_CLI

from jaxformer import cli
from jaxformer.config import ConfigError, load_config
from jaxformer.errors import EXIT_PREEMPTED, BadSteps, CheckpointError
from jaxformer.train import guard as guard_lib
from jaxformer.train import loop
from jaxformer.train.checkpoint import DAMAGED_DIR, Checkpointer
from jaxformer.train.logs import read_metrics
from jaxformer.train.validation import validate

ROOT = Path(__file__).resolve().parent.parent
WORKERS = Path(__file__).resolve().parent / "workers"
CONFIG = str(ROOT / "configs/default.py")
TINY = [
    *TINY_CLI,
    "--config.model.dropout=0.1",
    "--config.train.log_every=1",
    "--config.train.eval_every=0",
]


def _env(devices: int | None = None) -> dict[str, str]:
    """The environment for a child process, with its own simulated device count."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "SLURM_", "TPU_"))}
    flags = [f for f in env.get("XLA_FLAGS", "").split() if "device_count" not in f]
    if devices:
        flags.append(f"--xla_force_host_platform_device_count={devices}")
    env["XLA_FLAGS"] = " ".join(flags)
    env["JAX_PLATFORMS"] = "cpu"
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def _train_cmd(run_dir: Path, steps: int, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "jaxformer.cli", "train", f"--config={CONFIG}", *TINY,
        f"--config.train.run_dir={run_dir}", f"--config.train.steps={steps}", *extra,
    ]  # fmt: skip


def _losses(run_dir: Path) -> dict[int, float]:
    records = read_metrics(run_dir, "train")
    steps = [r["step"] for r in records]
    assert len(steps) == len(set(steps)), f"steps logged twice: {steps}"
    return {r["step"]: r["loss"] for r in records}


def _wait_for_step(run_dir: Path, proc: subprocess.Popen, step: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the run ended before it could be interrupted"
        path = run_dir / "metrics.jsonl"
        if path.exists() and any(r["step"] >= step for r in read_metrics(run_dir, "train")):
            return
        time.sleep(0.1)
    pytest.fail(f"step {step} not reached in {timeout}s")


@pytest.mark.slow
def test_sigterm_saves_the_current_step_and_resume_is_bit_exact(tmp_path: Path) -> None:
    steps = 24
    no_interval = "--config.train.checkpoint_every=1000"  # only the preemption saves
    straight_dir, run_dir = tmp_path / "straight", tmp_path / "preempted"
    straight = subprocess.Popen(
        _train_cmd(straight_dir, steps, no_interval), env=_env(), stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    proc = subprocess.Popen(
        _train_cmd(run_dir, steps, no_interval), env=_env(), stderr=subprocess.PIPE, text=True
    )
    _wait_for_step(run_dir, proc, 4)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_PREEMPTED, err[-3000:]
    stopped = max(_losses(run_dir))
    assert 4 <= stopped < steps
    assert Checkpointer(run_dir / "checkpoints", keep=3, every=0, use_async=False).all_steps() == [
        stopped
    ], "the preemption checkpoint is at the step the run stopped"
    assert f"saved a checkpoint at step {stopped}" in err

    resumed = subprocess.run(
        _train_cmd(run_dir, steps, no_interval), env=_env(), capture_output=True, text=True
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert straight.wait(timeout=120) == 0
    want, got = _losses(straight_dir), _losses(run_dir)
    assert sorted(got) == list(range(1, steps + 1))
    assert got == want, "resumed losses differ from the uninterrupted run's"

    # Goodput: the restart is counted, and the buckets add up to the total.
    ledger = json.loads((run_dir / "goodput.json").read_text())
    assert ledger["restarts"] == 1 and ledger["step"] == steps
    assert abs(sum(ledger["seconds"].values()) - ledger["total"]) < 1e-6
    assert ledger["seconds"]["step"] > 0 and ledger["seconds"]["compile"] > 0
    last = read_metrics(run_dir, "goodput")[-1]
    assert 0 < last["goodput"] < 1 and last["restarts"] == 1


def _kill_chain(directory: Path, kills: int, rng: random.Random) -> tuple[list[int], int]:
    """Starts the save-loop worker ``kills`` times, SIGKILLing it at a random moment
    while it saves; returns the step each start resumed from, and how many kills left a
    save half-written (a temporary directory behind)."""
    resumed, cut = [], 0
    for _ in range(kills + 1):
        proc = subprocess.Popen(
            [sys.executable, str(WORKERS / "save_loop.py"), str(directory)],
            env=_env(1), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        line = proc.stdout.readline()
        if not line.startswith("resumed"):
            proc.kill()
            pytest.fail(f"worker could not resume: {line}{proc.stderr.read()[-3000:]}")
        resumed.append(int(line.split()[1]))
        if len(resumed) == kills + 1:
            proc.kill()
            proc.wait()
            break
        # Two saves handed over means the first is committed: every start makes progress
        # however slow the machine, and the kill still lands at a random moment after.
        for _ in range(2):
            assert proc.stdout.readline().startswith("saved"), proc.stderr.read()[-3000:]
        time.sleep(rng.uniform(0.05, 1.0))
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        cut += any("tmp" in p.name for p in directory.iterdir())
    return resumed, cut


@pytest.mark.slow
def test_sigkill_at_random_moments_during_saves_never_loses_a_whole_checkpoint(
    tmp_path: Path,
) -> None:
    # Twenty kills in two chains run side by side; the worker itself fails on a restored
    # checkpoint whose arrays, data state and metadata are not all from one step.
    from concurrent.futures import ThreadPoolExecutor

    dirs = [tmp_path / "a", tmp_path / "b"]
    with ThreadPoolExecutor(2) as pool:
        chains = list(pool.map(lambda i: _kill_chain(dirs[i], 10, random.Random(i)), [0, 1]))
    assert sum(cut for _, cut in chains) >= 5, f"too few kills landed mid-save: {chains}"
    for directory, (resumed, _) in zip(dirs, chains, strict=True):
        assert resumed == sorted(resumed), f"went back in time: {resumed}"
        # Most kills come after at least one more save was committed: they cut saves
        # in the middle of a run of them, not only before the first.
        assert len(set(resumed)) > len(resumed) // 2, f"too little progress: {resumed}"
        # Kills never damage a committed checkpoint: nothing had to be moved aside, and
        # the last start cleaned up the temporary directories of cut-off saves.
        assert not (directory.parent / DAMAGED_DIR).exists()
        leftovers = [p.name for p in directory.iterdir() if not p.name.isdigit()]
        assert not [n for n in leftovers if "tmp" in n], leftovers


def _tiny(run_dir: Path, steps: int, *extra: str):
    return load_config(
        CONFIG,
        [*TINY, f"--config.train.run_dir={run_dir}", f"--config.train.steps={steps}", *extra],
    )


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny run of 4 steps with checkpoints at steps 2 and 4."""
    run_dir = tmp_path_factory.mktemp("reliability") / "run"
    loop.train(_tiny(run_dir, 4, "--config.train.checkpoint_every=2"))
    return run_dir


@pytest.mark.parametrize("damage", ["truncate", "delete"])
def test_damaged_checkpoint_is_moved_aside_and_the_previous_one_restored(
    trained_run: Path, tmp_path: Path, damage: str, caplog: pytest.LogCaptureFixture
) -> None:
    run_dir = tmp_path / "run"
    shutil.copytree(trained_run, run_dir)
    state = run_dir / "checkpoints/4/state"
    files = [p for p in state.rglob("*") if p.is_file() and p.parent.name == "d"]
    victim = max(files, key=lambda p: p.stat().st_size)  # the largest array data file
    if damage == "truncate":
        victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    else:
        victim.unlink()
    with caplog.at_level(logging.WARNING, logger="jaxformer"):
        run = loop.setup(_tiny(run_dir, 4))
    run.checkpointer.close()
    assert run.restored_step == 2
    assert "checkpoint step 4" in caplog.text and "falling back to step 2" in caplog.text
    assert [p.name.split("-")[0] for p in (run_dir / DAMAGED_DIR).iterdir()] == ["4"]


def _damage_state(run_dir: Path, step: int) -> None:
    for path in (run_dir / f"checkpoints/{step}/state").rglob("*"):
        if path.is_file():
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def test_eval_and_generate_skip_a_damaged_checkpoint_and_move_nothing(
    trained_run: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Read-only commands read parameters only (train.setup.restore_params): a damaged
    checkpoint is skipped, not moved aside, and with none readable it is an error."""
    from jaxformer.train.setup import restore_params

    run_dir = tmp_path / "run"
    shutil.copytree(trained_run, run_dir)
    _damage_state(run_dir, 4)
    with caplog.at_level(logging.WARNING, logger="jaxformer"):
        _, step, _ = restore_params(_tiny(run_dir, 4))
    assert step == 2 and "left in place; falling back to step 2" in caplog.text
    assert (run_dir / "checkpoints/4").is_dir() and not (run_dir / DAMAGED_DIR).exists()
    _damage_state(run_dir, 2)
    with pytest.raises(CheckpointError, match="can be read .*left in place"):
        loop.evaluate_checkpoint(_tiny(run_dir, 4))
    assert not (run_dir / DAMAGED_DIR).exists()
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["2", "4"]


def test_all_checkpoints_damaged_is_an_error_not_a_silent_restart(
    trained_run: Path, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    shutil.copytree(trained_run, run_dir)
    for step in (2, 4):
        state = run_dir / f"checkpoints/{step}/state"
        files = [p for p in state.rglob("*") if p.is_file() and p.parent.name == "d"]
        max(files, key=lambda p: p.stat().st_size).unlink()  # the largest array data file
    with pytest.raises(CheckpointError, match="every checkpoint .* was damaged"):
        loop.setup(_tiny(run_dir, 4))
    assert sorted(p.name.split("-")[0] for p in (run_dir / DAMAGED_DIR).iterdir()) == ["2", "4"]


def test_shape_changing_config_fails_naming_keys_and_safe_change_is_logged(
    trained_run: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    run_dir = tmp_path / "run"
    shutil.copytree(trained_run, run_dir)
    stored_config = (run_dir / "config.json").read_text()
    with pytest.raises(ConfigError, match=r"model\.d_ff: 64 -> 96") as err:
        loop.setup(_tiny(run_dir, 4, "--config.model.d_ff=96"))
    assert "shapes" in str(err.value) and "mlp" in str(err.value)
    assert (run_dir / "config.json").read_text() == stored_config, "a refused resume wrote"
    with caplog.at_level(logging.WARNING, logger="jaxformer"):
        run = loop.setup(_tiny(run_dir, 8, "--config.optimizer.lr=0.0005"))
    run.checkpointer.close()
    assert run.restored_step == 4
    assert "optimizer.lr" in caplog.text and "train.steps: 4 -> 8" in caplog.text
    assert list((run_dir / "checkpoints").iterdir()), "a refused resume deletes nothing"


@pytest.mark.parametrize("key", ["max_bad_steps", "spike_sigma", "spike_warmup"])
def test_negative_guard_settings_are_config_errors(tmp_path: Path, key: str) -> None:

    with pytest.raises(ConfigError, match=f"train.{key}"):
        validate(_tiny(tmp_path, 4, f"--config.train.{key}=-1"), 8, 1)


def _host(tree) -> list[np.ndarray]:
    return [np.array(x) for x in jax.tree.leaves(jax.device_get(tree))]


def test_nan_batch_is_not_applied_and_is_counted(trained_run: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    shutil.copytree(trained_run, run_dir)
    run = loop.setup(_tiny(run_dir, 8))
    run.checkpointer.close()
    batches = iter(run.train_data)
    batches.set_state(run.data_state)
    local = next(batches)
    bad = dict(local, weights=np.where(np.arange(local["weights"].size) == 3, np.nan, 1.0)
               .reshape(local["weights"].shape).astype(np.float32))  # fmt: skip
    before = _host((run.state.params, run.state.opt_state))
    state, metrics = run.train_step(run.state, loop._global_batch(bad, run.mesh))
    assert float(metrics["skipped"]) == 1.0 and int(metrics["nonfinite_total"]) == 1
    after = _host((state.params, state.opt_state))
    same = [np.array_equal(a, b) for a, b in zip(before, after, strict=True)]
    assert all(same), "a NaN step changed the parameters or optimizer state"
    assert int(state.step) == 5  # the step (and its batch) is consumed, not retried
    state, metrics = run.train_step(state, loop._global_batch(local, run.mesh))
    assert float(metrics["skipped"]) == 0.0 and int(metrics["bad_in_a_row"]) == 0
    assert int(metrics["nonfinite_total"]) == 1, "the count survives good steps"


def test_bad_steps_in_a_row_stop_the_run_keeping_the_last_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = loop._global_batch
    calls = {"n": 0}

    def poisoned(local, mesh):
        calls["n"] += 1
        if calls["n"] >= 4:  # steps 4, 5, 6, ...: every batch has a NaN weight
            local = dict(local, weights=np.full_like(local["weights"], np.nan))
        return real(local, mesh)

    monkeypatch.setattr(loop, "_global_batch", poisoned)
    run_dir = tmp_path / "run"
    cfg = _tiny(run_dir, 12, "--config.train.checkpoint_every=2", "--config.train.max_bad_steps=3")
    with pytest.raises(BadSteps, match=r"3 steps in a row were skipped") as err:
        loop.train(cfg)
    assert "train.max_bad_steps=3" in str(err.value) and "checkpoint" in str(err.value)
    skipped = {r["step"]: r["skipped"] for r in read_metrics(run_dir, "train")}
    assert skipped[3] == 0 and skipped[4] == skipped[5] == skipped[6] == 1
    # Stopped where the third skip was read (log_every=1: step 6), before saving step 6.
    steps = Checkpointer(run_dir / "checkpoints", keep=3, every=0, use_async=False).all_steps()
    assert steps == [2, 4]


def test_spike_guard_skips_a_loss_far_above_the_running_mean() -> None:
    import jax.numpy as jnp
    import ml_collections

    cfg = ml_collections.ConfigDict({"spike_sigma": 4.0, "spike_warmup": 20})
    guard = guard_lib.init_guard()
    rng = np.random.default_rng(0)
    for loss in 3.0 + 0.05 * rng.standard_normal(30):
        ok, guard = guard_lib.judge(cfg, guard, jnp.float32(loss), jnp.float32(1.0))
        assert bool(ok)
    ok, spiked = guard_lib.judge(cfg, guard, jnp.float32(5.0), jnp.float32(1.0))
    assert not bool(ok) and int(spiked["spikes_total"]) == 1
    assert int(spiked["nonfinite_total"]) == 0 and int(spiked["bad_in_a_row"]) == 1
    ok, _ = guard_lib.judge(cfg, spiked, jnp.float32(3.02), jnp.float32(1.0))
    assert bool(ok)
    ok, _ = guard_lib.judge(cfg, guard, jnp.float32(3.0), jnp.float32(jnp.inf))
    assert not bool(ok)


@pytest.mark.slow
def test_checkpoint_restores_on_other_device_counts_and_layouts(tmp_path: Path) -> None:
    """Saved on 8 devices (fsdp=8), restored on 4 (data=2 x tensor=2) and on 1: the
    parameters, optimizer state and next batch are identical."""
    run_dir = tmp_path / "run"
    common = [
        *TINY, f"--config.train.run_dir={run_dir}", "--config.train.steps=3",
        "--config.train.checkpoint_every=3",
    ]  # fmt: skip
    meshes = {
        8: ["--config.mesh.data=1", "--config.mesh.fsdp=8"],
        4: ["--config.mesh.data=2", "--config.mesh.tensor=2"],
        1: ["--config.mesh.data=1"],
    }

    def worker(devices: int, *first: str) -> subprocess.Popen:
        out = tmp_path / f"{devices}.npz"
        args = [sys.executable, str(WORKERS / "topology.py"), str(out), *first, CONFIG]
        return subprocess.Popen(
            [*args, *common, *meshes[devices]], env=_env(devices), stderr=subprocess.PIPE,
            stdout=subprocess.DEVNULL, text=True,
        )  # fmt: skip

    def finish(proc: subprocess.Popen) -> None:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]

    finish(worker(8, "--train"))
    procs = [worker(4), worker(1)]
    for proc in procs:
        finish(proc)
    saved = np.load(tmp_path / "8.npz")
    assert int(saved["restored_step"]) == 3 and int(saved["devices"]) == 8
    for devices in (4, 1):
        other = np.load(tmp_path / f"{devices}.npz")
        assert int(other["devices"]) == devices
        assert sorted(other.files) == sorted(saved.files)
        for name in saved.files:
            if name != "devices":
                np.testing.assert_array_equal(other[name], saved[name], err_msg=name)
    assert any(n.startswith("state/opt_state") for n in saved.files)
    assert any(n.startswith("batch/") for n in saved.files)


def test_checkpoints_command_lists_inspects_and_exports(
    trained_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    assert cli.main(["checkpoints", "list", str(trained_run), "--verify"]) == 0
    out = capsys.readouterr().out
    assert "2" in out and "4" in out and out.count("ok") == 2

    assert cli.main(["checkpoints", "inspect", str(trained_run), "--step", "2"]) == 0
    out = capsys.readouterr().out
    assert "params" in out and "opt_state" in out and "float32" in out
    assert "model.d_model" in out and "32" in out

    exported = tmp_path / "params"
    assert cli.main(["checkpoints", "export", str(trained_run), str(exported)]) == 0
    capsys.readouterr()
    from jaxformer.train.checkpoint_inspect import load_exported

    params, meta = load_exported(exported)
    assert meta["step"] == 4 and meta["config"]["model"]["d_model"] == 32
    run = loop.setup(_tiny(trained_run, 4))
    run.checkpointer.close()
    want = {"/".join(map(str, p)): np.asarray(v) for p, v in _flat(run.state.params)}
    assert sorted(params) == sorted(want)
    for name, value in want.items():
        np.testing.assert_array_equal(params[name], value, err_msg=name)

    # A damaged checkpoint is reported, not hidden.
    files = [p for p in (trained_run / "checkpoints/2/state").rglob("*") if p.is_file()]
    broken = tmp_path / "broken"
    shutil.copytree(trained_run, broken)
    victim = max(files, key=lambda p: p.stat().st_size).relative_to(trained_run)
    (broken / victim).unlink()
    assert cli.main(["checkpoints", "list", str(broken), "--verify"]) == 2
    out = capsys.readouterr().out
    assert "damaged" in out


def _flat(tree):
    from flax import nnx

    pure = nnx.to_pure_dict(tree)
    leaves = jax.tree_util.tree_flatten_with_path(pure)[0]
    return [(tuple(getattr(k, "key", getattr(k, "idx", k)) for k in p), v) for p, v in leaves]


def test_goodput_counts_work_after_the_last_checkpoint_as_lost(tmp_path: Path) -> None:
    from jaxformer.train.goodput import LEDGER, Goodput

    # The dead attempt logged 100 s of totals at step 50; its last checkpoint (step 30)
    # was saved when the totals were 70 s: 30 s and 20 steps were lost and are redone.
    seconds = {"startup": 10.0, "compile": 5.0, "step": 50.0, "checkpoint": 5.0}
    (tmp_path / LEDGER).write_text(
        json.dumps({"step": 50, "total": 100.0, "updated_at": time.time() - 4.0})
    )
    goodput = Goodput(tmp_path)
    redone = goodput.resume({"seconds": seconds, "restart_gap": 0.0, "restarts": 0}, 30)
    assert redone == 20
    assert goodput.seconds["lost"] == pytest.approx(30.0)
    assert goodput.total == pytest.approx(100.0)
    assert goodput.restarts == 1 and 4.0 <= goodput.restart_gap < 60.0
    metrics = goodput.metrics()
    assert metrics["goodput"] == pytest.approx(0.5)
    assert metrics["lost_fraction"] == pytest.approx(0.3)
    goodput.write_ledger(31)
    assert json.loads((tmp_path / LEDGER).read_text())["restarts"] == 1
