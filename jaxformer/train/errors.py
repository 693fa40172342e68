"""How a training run ends other than by finishing, and the exit codes the CLI gives them.

Kept free of JAX and Orbax imports so that the CLI can name them before starting JAX.
"""

from __future__ import annotations

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: stopped cleanly with a checkpoint; start it again
EXIT_BAD_STEPS = 3  # train.max_bad_steps skipped steps in a row


class CheckpointError(Exception):
    """No checkpoint of a run can be restored, or one that was asked for cannot."""


class Preempted(Exception):  # noqa: N818 - an event, not an error
    """The run stopped at ``step`` on a preemption notice, after saving a checkpoint."""

    def __init__(self, step: int, directory: str) -> None:
        super().__init__(
            f"preempted: saved a checkpoint at step {step} in {directory}; run the same "
            "command again to resume from it"
        )
        self.step = step


class BadSteps(Exception):  # noqa: N818 - the run's own stop, named for its cause
    """``train.max_bad_steps`` steps in a row were skipped: the run stops."""
