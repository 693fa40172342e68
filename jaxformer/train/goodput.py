"""Goodput: where a run's wall time went, across restarts.

Buckets (seconds): ``startup`` (building the state, restoring, opening data), ``compile``
(the first step), ``step`` (productive training steps), ``data`` (waiting for a batch),
``eval``, ``checkpoint`` (time the loop was blocked saving) and ``lost`` (work done after
the last checkpoint of an attempt that died: it was redone). ``goodput`` is ``step`` over
the total. The loop charges each stretch of host time to one bucket as it passes
(:meth:`Goodput.charge`); since steps run asynchronously, device time is charged where
the host waits for it, which the loop arranges to be the step bucket.

Across restarts: each checkpoint's metadata holds the totals at its save, and
``goodput.json`` in the run directory the totals at the last log line. A resumed run
starts from the checkpoint's totals and adds the difference to ``lost``: the time the
dead attempt spent past its last checkpoint, which was redone. The gap between the
attempts (the process was not running) is reported as ``restart_gap`` but not counted
in the total, since no process could have used it.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

BUCKETS = ("startup", "compile", "step", "data", "eval", "checkpoint", "lost")
LEDGER = "goodput.json"


class Goodput:
    """Cumulative time per bucket for one run, over all its attempts."""

    def __init__(self, run_dir: Path, *, enabled: bool = True) -> None:
        self.path = run_dir / LEDGER
        self.enabled = enabled
        self.seconds = dict.fromkeys(BUCKETS, 0.0)
        self.restart_gap = 0.0
        self.restarts = 0
        self._last = time.perf_counter()

    def resume(self, saved: dict | None, restored_step: int) -> int:
        """Continues from a checkpoint's totals, charging what the last attempt lost;
        returns the number of steps it had run past the checkpoint (to be redone)."""
        saved = saved or {}
        ledger = self._read_ledger()
        if saved:
            self.seconds.update({k: float(v) for k, v in saved.get("seconds", {}).items()})
            self.restart_gap = float(saved.get("restart_gap", 0.0))
            self.restarts = int(saved.get("restarts", 0))
        if ledger:
            # Time past the checkpoint: lost work if steps ran after it, otherwise (a
            # preempted run) the save being finished and the process shutting down.
            after = max(0.0, ledger["total"] - sum(self.seconds.values()))
            ran_on = int(ledger.get("step", 0)) > restored_step
            self.seconds["lost" if ran_on else "checkpoint"] += after
            self.restart_gap += max(0.0, time.time() - ledger["updated_at"])
            self.restarts += 1
        return max(0, int(ledger.get("step", 0)) - restored_step) if ledger else 0

    def _read_ledger(self) -> dict:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}

    def charge(self, bucket: str) -> None:
        """Adds the time since the last charge to ``bucket``."""
        now = time.perf_counter()
        self.seconds[bucket] += now - self._last
        self._last = now

    @property
    def total(self) -> float:
        return sum(self.seconds.values())

    def state(self) -> dict:
        """What a checkpoint stores."""
        return {
            "seconds": dict(self.seconds),
            "restart_gap": self.restart_gap,
            "restarts": self.restarts,
        }

    def metrics(self) -> dict[str, float]:
        """Seconds and fractions per bucket, for the logs and TensorBoard."""
        total = max(self.total, 1e-9)
        out = {f"{k}_s": v for k, v in self.seconds.items()}
        out |= {f"{k}_fraction": v / total for k, v in self.seconds.items()}
        out |= {"goodput": self.seconds["step"] / total, "total_s": self.total}
        out |= {"restart_gap_s": self.restart_gap, "restarts": float(self.restarts)}
        return out

    def write_ledger(self, step: int) -> None:
        """Records the totals so far, for the next attempt to count what this one loses."""
        if not self.enabled:
            return
        record = {"step": step, "total": self.total, "updated_at": time.time(), **self.state()}
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(record) + "\n")
        tmp.replace(self.path)
