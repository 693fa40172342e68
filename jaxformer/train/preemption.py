"""Preemption: every process stops at the same step, saves, and exits with ``EXIT_PREEMPTED``.

Schedulers give notice before they take machines away: SLURM, Kubernetes and GCE send
SIGTERM and wait a grace period. In a multi-process run JAX's preemption service
(started by ``jax.distributed.initialize``) catches the signal on whichever process gets
it and tells the others through the coordinator, and
``multihost_utils.reached_preemption_sync_point(step)`` turns true on every process at the
same step, so all of them write their shards of one checkpoint. A single process has no
coordinator: a Python SIGTERM handler sets a flag that the loop reads between steps.

Exit code 75 (``EX_TEMPFAIL``: try again later) tells a launcher that the run stopped
cleanly with a checkpoint at its last step and should be started again; launch/ uses it.
"""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType
from typing import Any

import jax

log = logging.getLogger("jaxformer")


class PreemptionWatcher:
    """Answers, between steps, whether this run has been asked to stop."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None
        self._coordinated = jax.process_count() > 1
        if not self._coordinated and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, signum: int, frame: FrameType | None) -> None:
        if not self.requested:
            log.warning("SIGTERM received: saving a checkpoint after this step, then exiting")
        self.requested = True

    def should_stop(self, step: int) -> bool:
        """True on every process at the same step once any of them got the notice."""
        if self._coordinated:
            from jax.experimental import multihost_utils

            self.requested = multihost_utils.reached_preemption_sync_point(step)
        return self.requested

    def close(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None
