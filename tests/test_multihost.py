"""Multi-host training for real: separate processes joined by jax.distributed over gloo.

Two processes with two simulated CPU devices each (``launch/local.sh --processes 2``)
train the same tiny run as one process with four devices: the losses agree, the
checkpoint the two processes wrote (each its own shards) restores in one process, and
training continues there as if it had never stopped. The launches go through
``launch/local.sh``, so the script users run is the one tested.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import TINY_CLI

from jaxformer.config import MESH_AXES, ConfigError, base_config, check_schema
from jaxformer.parallel import distributed
from jaxformer.train.logs import read_metrics
from jaxformer.train.validation import validate

ROOT = Path(__file__).resolve().parent.parent
LAUNCH = ROOT / "launch" / "local.sh"
RTOL = 1e-5
TIMEOUT_S = 150  # per launch: a hung collective fails the test instead of hanging CI

TINY = [
    *TINY_CLI,
    "--config.model.dropout=0.1",
    "--config.train.log_every=1",
    "--config.train.eval_every=4",
    "--config.train.eval_batches=2",
    "--config.train.checkpoint_every=4",
    "--config.train.tensorboard=False",
    "--config.optimizer.schedule=constant",
    "--config.optimizer.warmup_steps=0",
    "--config.optimizer.lr=0.003",
]
# Four devices either way: fsdp 4 in one process, or fsdp 2 per process x 2 processes
# over "DCN", which shards every parameter across both processes.
ONES = dict.fromkeys(MESH_AXES, 1)
ONE_PROCESS_MESH = ["--config.mesh.data=1", "--config.mesh.fsdp=4"]
TWO_PROCESS_MESH = ["--config.mesh.data=1", "--config.mesh.fsdp=2", "--config.mesh.dcn_fsdp=2"]


def _start(run_dir: Path, steps: int, launcher: list[str], mesh: list[str]) -> subprocess.Popen:
    """Starts launch/local.sh in its own process group (so a hang can kill every child).

    Output goes to a file, not a pipe, so launches running side by side never block on a
    full pipe while the test waits on the other one.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "SLURM_", "TPU_"))}
    # conftest's 8 simulated devices are for this process; local.sh sets the children's.
    env["XLA_FLAGS"] = " ".join(
        f for f in env.get("XLA_FLAGS", "").split() if "device_count" not in f
    )
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    args = [
        str(LAUNCH), *launcher, str(ROOT / "configs/default.py"), *TINY, *mesh,
        f"--config.train.run_dir={run_dir}", f"--config.train.steps={steps}",
    ]  # fmt: skip
    log = run_dir.parent / f"{run_dir.name}-{steps}.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            args, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    proc.log = log  # type: ignore[attr-defined]
    return proc


def _finish(proc: subprocess.Popen, deadline: float) -> str:
    """Waits for a launch until ``deadline`` and returns its output; kills it on a hang."""
    try:
        proc.wait(timeout=max(deadline - time.monotonic(), 1.0))
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        out = proc.log.read_text()  # type: ignore[attr-defined]
        pytest.fail(f"{' '.join(proc.args)} hung; killed after {TIMEOUT_S}s:\n{out[-4000:]}")
    out = proc.log.read_text()  # type: ignore[attr-defined]
    assert proc.returncode == 0, f"{' '.join(proc.args)} failed:\n{out[-4000:]}"
    return out


def _metric(run_dir: Path, split: str, name: str = "loss") -> dict[int, float]:
    records = read_metrics(run_dir, split)
    steps = [r["step"] for r in records]
    assert len(steps) == len(set(steps)), f"{split} steps logged twice (by two processes?)"
    return {r["step"]: r[name] for r in records}


def _assert_close(got: dict[int, float], want: dict[int, float], what: str) -> float:
    worst = 0.0
    for step, value in got.items():
        rel = abs(value - want[step]) / abs(want[step])
        assert rel < RTOL, f"{what} step {step}: {value} vs {want[step]} (rel {rel:.1e})"
        worst = max(worst, rel)
    return worst


@pytest.mark.slow
def test_two_processes_train_like_one_and_checkpoint_restores_in_one(tmp_path: Path) -> None:
    start = time.perf_counter()
    one, two = tmp_path / "one_process", tmp_path / "two_processes"
    # Side by side: each process compiles on one core, so this halves the wall time on two.
    reference_run = _start(one, 6, ["--cpu_devices", "4"], ONE_PROCESS_MESH)
    two_run = _start(two, 4, ["--processes", "2", "--cpu_devices", "2"], TWO_PROCESS_MESH)
    deadline = time.monotonic() + TIMEOUT_S
    out = _finish(two_run, deadline)
    _finish(reference_run, deadline)
    # The two processes really were two, each loading half of every global batch.
    assert "4 cpu devices in 2 process(es)" in out
    assert "4 sequences loaded per process" in out
    info = json.loads((two / "run_info.json").read_text())
    assert info["mesh"] == {**ONES, "fsdp": 4}
    assert info["mesh_dcn"] == {**ONES, "fsdp": 2}

    reference = _metric(one, "train")
    two_train = _metric(two, "train")
    assert sorted(two_train) == [1, 2, 3, 4] and sorted(_metric(two, "eval")) == [0, 4]
    worst = _assert_close(two_train, reference, "train loss")
    for name in ("loss", "accuracy", "bits_per_byte"):
        got, want = _metric(two, "eval", name), _metric(one, "eval", name)
        worst = max(worst, _assert_close(got, want, f"eval {name}"))
    assert two_train[4] < two_train[1]  # it trained, so the comparison means something

    # Parameters are sharded over both processes, so both wrote shards of step 4.
    state_dir = two / "checkpoints" / "4" / "state"
    for process in (0, 1):
        shards = state_dir / f"ocdbt.process_{process}"
        assert shards.is_dir() and any(p.is_file() for p in shards.rglob("*")), process

    # One process, four devices, same run directory: resumes at step 4 and continues.
    resume = _start(two, 6, ["--cpu_devices", "4"], ONE_PROCESS_MESH)
    assert "resumed from checkpoint at step 4" in _finish(resume, time.monotonic() + TIMEOUT_S)
    resumed = _metric(two, "train")
    assert sorted(resumed) == [1, 2, 3, 4, 5, 6]
    worst = max(worst, _assert_close({s: resumed[s] for s in (5, 6)}, reference, "resumed"))
    print(f"worst relative loss difference {worst:.1e}; {time.perf_counter() - start:.0f}s")


def _dist(**values: object):
    cfg = base_config()
    for key, value in values.items():
        cfg.distributed[key] = value
    return check_schema(cfg).distributed


def test_single_process_needs_no_distributed_system() -> None:
    plan = distributed.settings(_dist(), environ={})
    assert not plan.start
    # A one-task srun is still one process.
    slurm = {k: "1" for k in ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_PROCID")}
    slurm |= {"SLURM_NTASKS": "1", "SLURM_LOCALID": "0"}
    assert not distributed.settings(_dist(), environ=slurm).start
    assert distributed.settings(_dist(), environ={**slurm, "SLURM_NTASKS": "4"}).start
    assert not distributed.settings(_dist(initialize="never"), {"JAX_NUM_PROCESSES": "2"}).start


def test_config_keys_win_over_environment() -> None:
    environ = {
        "JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234",
        "JAX_NUM_PROCESSES": "4",
        "JAX_PROCESS_ID": "3",
    }
    plan = distributed.settings(_dist(), environ)
    assert (plan.start, plan.coordinator_address, plan.num_processes, plan.process_id) == (
        True, "10.0.0.1:1234", 4, 3,
    )  # fmt: skip
    plan = distributed.settings(_dist(num_processes=2, process_id=1), environ)
    assert (plan.num_processes, plan.process_id) == (2, 1)
    # always: whatever is unset is left to JAX's cluster detection (a Cloud TPU VM).
    plan = distributed.settings(_dist(initialize="always"), environ={})
    assert plan.start and plan.coordinator_address is None and plan.num_processes is None


@pytest.mark.parametrize(
    ("values", "environ", "key"),
    [
        ({"num_processes": 2, "process_id": 2}, {}, "distributed.process_id"),
        ({"num_processes": -3}, {}, "distributed.num_processes"),
        ({"coordinator_address": "10.0.0.1"}, {}, "distributed.coordinator_address"),
        ({}, {"JAX_NUM_PROCESSES": "two"}, "distributed.num_processes"),
        ({"initialization_timeout": 0}, {}, "distributed.initialization_timeout"),
    ],
)
def test_bad_distributed_settings_name_the_key(values, environ, key) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        distributed.settings(_dist(**values), environ)


def _mesh_config(**mesh: int):
    cfg = base_config()
    cfg.train.global_batch = 64
    for key, value in mesh.items():
        cfg.mesh[key] = value
    return check_schema(cfg)


def test_dcn_sizes_multiply_with_ici_sizes() -> None:
    # 2 processes x 4 devices: data 4 within each, 2 across.
    cfg = _mesh_config(data=-1, dcn_data=2)
    assert validate(cfg, num_devices=8, process_count=2) == {**ONES, "data": 8}
    cfg = _mesh_config(data=1, fsdp=-1, dcn_data=2)
    assert validate(cfg, num_devices=8, process_count=2) == {**ONES, "data": 2, "fsdp": 4}
    # 4 TPU slices of 16 chips, 4 hosts each: DCN spans the slices, not the processes.
    cfg = _mesh_config(data=1, fsdp=16, dcn_data=4)
    assert validate(cfg, 64, process_count=16, num_slices=4)["fsdp"] == 16


@pytest.mark.parametrize(
    ("mesh", "devices", "processes", "slices", "match"),
    [
        ({"dcn_data": 2}, 8, 1, 1, r"'mesh\.dcn_data'.*multiply to 2 but the run has 1"),
        ({"dcn_data": 3}, 8, 3, 1, r"'mesh\.dcn_data'.*does not divide the 8 devices"),
        ({"data": 8, "dcn_data": 2}, 8, 2, 1, r"4 devices per slice/process.*'mesh\.data'"),
        ({"data": 16}, 16, 4, 2, r"span 2 TPU slices.*'mesh\.dcn_data'"),
        ({"dcn_tensor": 0}, 8, 1, 1, r"'mesh\.dcn_tensor' must be >= 1"),
    ],
)
def test_bad_dcn_sizes_name_the_keys(mesh, devices, processes, slices, match) -> None:
    with pytest.raises(ConfigError, match=match):
        validate(_mesh_config(**mesh), devices, process_count=processes, num_slices=slices)


def _child_with_process_id(launcher_pid: int, process_id: int) -> int:
    """The pid of the ``jaxformer train`` child of launch/local.sh with this JAX process id."""
    children = subprocess.run(
        ["pgrep", "-P", str(launcher_pid)], capture_output=True, text=True
    ).stdout.split()
    for pid in children:
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"JAX_PROCESS_ID={process_id}".encode() in environ:
            return int(pid)
    raise AssertionError(f"no child with JAX_PROCESS_ID={process_id} among {children}")


@pytest.mark.slow
def test_sigterm_to_one_process_stops_all_at_one_step_with_a_checkpoint(tmp_path: Path) -> None:
    """The preemption notice reaches one host; every host saves the same step and exits 75."""
    run, steps = tmp_path / "run", 24
    only_preemption = ["--config.train.checkpoint_every=1000", "--config.train.eval_every=0"]
    two = ["--processes", "2", "--cpu_devices", "2"]
    proc = _start(run, steps, two, TWO_PROCESS_MESH + only_preemption)
    deadline = time.monotonic() + TIMEOUT_S
    while not (run / "metrics.jsonl").exists() or not read_metrics(run, "train"):
        assert proc.poll() is None and time.monotonic() < deadline, proc.log.read_text()[-3000:]
        time.sleep(0.2)
    os.kill(_child_with_process_id(proc.pid, 1), signal.SIGTERM)  # not process 0
    proc.wait(timeout=TIMEOUT_S)
    out = proc.log.read_text()
    assert proc.returncode == 75, out[-4000:]
    stopped = max(_metric(run, "train"))
    assert stopped < steps
    checkpoints = sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit())
    assert checkpoints == [stopped], (checkpoints, stopped)
    for process in (0, 1):  # both wrote their shards of that one step
        assert (run / "checkpoints" / str(stopped) / "state" / f"ocdbt.process_{process}").is_dir()

    resumed = _finish(_start(run, steps, two, TWO_PROCESS_MESH + only_preemption), deadline + 60)
    assert f"resumed from checkpoint at step {stopped}" in resumed
    assert sorted(_metric(run, "train")) == list(range(1, steps + 1))
