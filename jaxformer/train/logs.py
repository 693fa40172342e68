"""Where metrics go: a live terminal line, TensorBoard events and a JSON-lines file."""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

log = logging.getLogger("jaxformer")


class RunLogger:
    """Writes metrics from process 0; other processes keep silent.

    ``metrics.jsonl`` gets one object per logged step, ``{"step", "split", ...}``, so
    tools (plots, sweeps) can read a run without TensorBoard.
    """

    def __init__(
        self,
        run_dir: Path,
        *,
        total_steps: int,
        start_step: int,
        tensorboard: bool,
        enabled: bool = True,
    ):
        self.enabled = enabled
        self.total_steps = total_steps
        self.progress: Progress | None = None
        self.writer = None
        if not enabled:
            return
        self.jsonl = open(run_dir / "metrics.jsonl", "a")  # noqa: SIM115 - closed in close()
        if tensorboard:
            from tensorboardX import SummaryWriter

            self.writer = SummaryWriter(str(run_dir / "tensorboard"))
        if sys.stdout.isatty():
            self.progress = Progress(
                TextColumn("[bold]step {task.completed}/{task.total}"),
                BarColumn(),
                TextColumn("{task.fields[line]}"),
                TextColumn("ETA"),
                TimeRemainingColumn(),
                transient=False,
            )
            self.task = self.progress.add_task("train", total=total_steps, line="")
            self.progress.update(self.task, completed=start_step)
            self.progress.start()

    def write(self, step: int, split: str, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        record = {"step": step, "split": split, "time": time.time(), **metrics}
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        if self.writer is not None:
            for name, value in metrics.items():
                self.writer.add_scalar(f"{split}/{name}", value, step)
            self.writer.flush()
        if split == "train":
            line = (
                f"loss {metrics['loss']:.4f}  {metrics['tokens_per_sec']:,.0f} tok/s  "
                f"lr {metrics['lr']:.2e}  mfu {metrics.get('mfu', 0.0):.1%}"
            )
            skipped = metrics.get("nonfinite_total", 0) + metrics.get("spikes_total", 0)
            if skipped:
                line += f"  skipped {int(skipped)}"
            if self.progress is not None:
                self.progress.update(self.task, completed=step, line=line)
            else:
                eta = (self.total_steps - step) * metrics["step_time"]
                log.info("step %d/%d  %s  ETA %s", step, self.total_steps, line, _hms(eta))
        elif split != "goodput":  # goodput: files and TensorBoard only; summed up at the end
            shown = "  ".join(f"{k} {v:.4f}" for k, v in metrics.items())
            message = f"step {step} {split}: {shown}"
            if self.progress is not None:
                self.progress.console.print(message)
            else:
                log.info(message)

    def advance(self, step: int) -> None:
        """Moves the terminal bar every step; needs no device values, so it never syncs."""
        if self.progress is not None:
            self.progress.update(self.task, completed=step)

    def info(self, message: str) -> None:
        if not self.enabled:
            return
        if self.progress is not None:
            self.progress.console.print(message)
        else:
            log.info(message)

    def close(self) -> None:
        if not self.enabled:
            return
        if self.progress is not None:
            self.progress.stop()
        if self.writer is not None:
            self.writer.close()
        self.jsonl.close()


def _hms(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def read_metrics(run_dir: str | Path, split: str | None = None) -> list[dict[str, Any]]:
    """The records of a run's metrics.jsonl, optionally of one split."""
    path = Path(run_dir) / "metrics.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in records if split is None or r["split"] == split]
