"""Connecting the processes of a multi-host run: ``jax.distributed.initialize``.

Every process (one per host, or one per GPU) runs the same ``jaxformer train`` with the
same config. Before anything touches a device, :func:`initialize` decides from the
``distributed`` config section and the environment whether this is one of several
processes and, if so, connects them through JAX's coordinator service:

- Clusters JAX understands (SLURM ``srun``, Open MPI ``mpirun``, Cloud TPU VMs, GKE TPU
  pods, Kubernetes indexed Jobs) need no settings: JAX reads the coordinator, the process
  count and this process's id from the environment.
- Anywhere else, ``distributed.coordinator_address`` / ``num_processes`` / ``process_id``
  (or ``$JAX_COORDINATOR_ADDRESS`` / ``$JAX_NUM_PROCESSES`` / ``$JAX_PROCESS_ID``, which is
  what ``launch/local.sh --processes N`` and the Kubernetes template set) say it.

On CPU the processes exchange collectives through gloo. Processes other than 0 log only
warnings, so the terminal shows one progress line; metrics and TensorBoard come from
process 0 (``train/logs.py``) and checkpoints from every process (Orbax, each its shards).
"""

from __future__ import annotations

import logging
import os
import secrets
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import jax
import ml_collections
import numpy as np

from jaxformer.errors import ConfigError

log = logging.getLogger("jaxformer")

ENV_COORDINATOR = "JAX_COORDINATOR_ADDRESS"  # also read by jax.distributed itself
ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "JAX_PROCESS_ID"


@dataclass(frozen=True)
class Settings:
    """What :func:`initialize` passes to ``jax.distributed.initialize`` (None: JAX detects)."""

    start: bool
    coordinator_address: str | None
    num_processes: int | None
    process_id: int | None
    timeout: int
    reason: str


def _env_int(environ: Mapping[str, str], name: str, key: str) -> int | None:
    text = environ.get(name, "").strip()
    if not text:
        return None
    try:
        return int(text)
    except ValueError:
        raise ConfigError(
            f"environment variable {name}={text!r} (config key '{key}') must be an integer"
        ) from None


def detect_cluster(environ: Mapping[str, str]) -> str | None:
    """The multi-process launcher this process was started by, from its environment only.

    Only launchers that JAX can read the whole setup from count, and only when they started
    more than one process; a single-task ``srun`` stays a single-process run.
    """

    def count(name: str) -> int:
        try:
            return int(environ.get(name, "1"))
        except ValueError:
            return 1

    slurm = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")
    if all(name in environ for name in slurm) and count("SLURM_NTASKS") > 1:
        return "slurm"
    if "OMPI_MCA_orte_hnp_uri" in environ and count("OMPI_COMM_WORLD_SIZE") > 1:
        return "ompi"
    hosts = environ.get("TPU_PROCESS_ADDRESSES") or environ.get("TPU_WORKER_HOSTNAMES") or ""
    if len([h for h in hosts.split(",") if h.strip()]) > 1 or count("MEGASCALE_NUM_SLICES") > 1:
        return "tpu"
    return None


def settings(
    dist_cfg: ml_collections.ConfigDict, environ: Mapping[str, str] | None = None
) -> Settings:
    """Resolves the ``distributed`` config section against the environment; checks values.

    Config keys win over environment variables. With ``initialize = "auto"`` the system
    starts when more than one process is asked for, a coordinator is named, or a
    multi-process cluster launcher is detected; ``always`` starts it regardless (JAX then
    detects what is unset, as on a Cloud TPU VM); ``never`` keeps one process.
    """
    environ = os.environ if environ is None else environ
    address = dist_cfg.coordinator_address.strip() or environ.get(ENV_COORDINATOR, "").strip()
    num = dist_cfg.num_processes or _env_int(
        environ, ENV_NUM_PROCESSES, "distributed.num_processes"
    )
    pid = dist_cfg.process_id
    if pid == -1:
        pid = _env_int(environ, ENV_PROCESS_ID, "distributed.process_id")
    timeout = int(dist_cfg.initialization_timeout)

    if num is not None and num < 1:
        raise ConfigError(f"config key 'distributed.num_processes' must be >= 1, got {num}")
    if pid is not None and pid < 0:
        raise ConfigError(f"config key 'distributed.process_id' must be >= 0 or -1, got {pid}")
    if num is not None and pid is not None and pid >= num:
        raise ConfigError(
            f"config key 'distributed.process_id' ({pid}) must be below "
            f"distributed.num_processes ({num})"
        )
    if address:
        host, sep, port = address.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(
                f"config key 'distributed.coordinator_address' ({address!r}) must be "
                "HOST:PORT, e.g. 10.0.0.1:1234 (the address of process 0)"
            )
    if timeout < 1:
        raise ConfigError(
            f"config key 'distributed.initialization_timeout' must be >= 1, got {timeout}"
        )

    mode = dist_cfg.initialize
    cluster = detect_cluster(environ)
    if mode == "never":
        start, reason = False, "distributed.initialize=never"
    elif mode == "always":
        start, reason = True, "distributed.initialize=always"
    elif num is not None:
        start, reason = num > 1, f"{num} processes asked for"
    elif address:
        start, reason = True, f"coordinator {address} given"
    elif cluster is not None:
        start, reason = True, f"{cluster} launcher detected"
    else:
        start, reason = False, "a single process"
    return Settings(start, address or None, num, pid, timeout, reason)


def _use_gloo_on_cpu() -> None:
    """Cross-process collectives on CPU need an implementation; gloo ships with jaxlib.

    jax 0.10 calls the option ``jax_cpu_collectives_implementation`` and already defaults
    to gloo; setting it keeps CPU runs working under releases that default to none, and
    leaves a user's explicit choice (``mpi``) alone. GPUs and TPUs ignore it.
    """
    if jax.config.jax_cpu_collectives_implementation in (None, "", "none"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")


def initialize(cfg: ml_collections.ConfigDict) -> bool:
    """Starts ``jax.distributed`` if the config or environment asks for several processes.

    Must run before anything else uses JAX (``jaxformer train`` calls it first thing in
    ``train.loop.setup``); returns whether this run is multi-process. Idempotent.
    """
    if jax.distributed.is_initialized():
        return True
    plan = settings(cfg.distributed)
    if not plan.start:
        return False
    _use_gloo_on_cpu()
    try:
        jax.distributed.initialize(
            coordinator_address=plan.coordinator_address,
            num_processes=plan.num_processes,
            process_id=plan.process_id,
            initialization_timeout=plan.timeout,
        )
    except ValueError as err:  # JAX found no cluster to fill in what the config leaves unset
        raise ConfigError(
            f"cannot start the distributed system ({plan.reason}): {err} Set config keys "
            "'distributed.coordinator_address', 'distributed.num_processes' and "
            f"'distributed.process_id' (or ${ENV_COORDINATOR}, ${ENV_NUM_PROCESSES}, "
            f"${ENV_PROCESS_ID}), or launch under SLURM, MPI, a TPU VM or Kubernetes"
        ) from err
    except RuntimeError as err:
        if "before any JAX" not in str(err):
            raise
        raise ConfigError(
            "a multi-process run was asked for "
            f"({plan.reason}) but JAX was already used in this process; call "
            "jaxformer.parallel.distributed.initialize(cfg) before anything else touches JAX, "
            "or set distributed.initialize=never"
        ) from err
    if jax.process_index() != 0:
        # One terminal voice: the other processes report only warnings and errors.
        log.setLevel(logging.WARNING)
    log.info(
        "distributed: process %d of %d (%s), %d local of %d devices",
        jax.process_index(),
        jax.process_count(),
        plan.reason,
        jax.local_device_count(),
        jax.device_count(),
    )
    return True


def num_slices(devices: Sequence[jax.Device] | None = None) -> int:
    """How many TPU slices the devices span (1 on GPU, CPU and single-slice TPU)."""
    devices = jax.devices() if devices is None else devices
    return len({getattr(d, "slice_index", 0) for d in devices})


def check_shared_directory(path: Path, key: str = "train.run_dir", wait_s: float = 10.0) -> None:
    """Raises unless every process sees the files process 0 writes under ``path``.

    Orbax has each process write its shards and process 0 finalise the step directory, so
    a run directory on each host's local disk would give checkpoints no host can restore.
    Process 0 writes a marker; the others look for it (waiting out NFS attribute caches).
    """
    if jax.process_count() == 1:
        return
    from jax.experimental import multihost_utils

    token = secrets.randbits(62) if jax.process_index() == 0 else 0
    token = int(multihost_utils.broadcast_one_to_all(np.int64(token)))
    marker = Path(path) / f".jaxformer_shared_check_{token}"
    if jax.process_index() == 0:
        marker.write_text("written by process 0 to check that every process sees it\n")
    multihost_utils.sync_global_devices("jaxformer: shared directory marker written")
    deadline = time.monotonic() + wait_s
    while not marker.exists() and time.monotonic() < deadline:
        time.sleep(0.5)
    seen = np.asarray(multihost_utils.process_allgather(np.int32(marker.exists())))
    if jax.process_index() == 0:
        marker.unlink(missing_ok=True)
    blind = [int(i) for i in np.flatnonzero(seen == 0)]
    if blind:
        raise ConfigError(
            f"config key '{key}' ({path}) is not shared between hosts: process(es) {blind} "
            "do not see the files process 0 writes there. A multi-host run needs a directory "
            "every host mounts (NFS, Lustre, Filestore, a gcsfuse bucket)"
        )
