"""Every error a user can fix, and how a run ends other than by finishing.

The command line reports these without a traceback (exit code 2, or the codes below).
Kept free of JAX imports so that the CLI can name them before starting JAX.
"""

from __future__ import annotations

EXIT_USER_ERROR = 2  # a config, data or checkpoint the user can fix
EXIT_BAD_STEPS = 3  # train.max_bad_steps skipped steps in a row
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: stopped cleanly with a checkpoint; start it again


class ConfigError(ValueError):
    """A config that cannot run; the message names the offending key."""


class DataError(ValueError):
    """A data setting that cannot work; the message names the config key."""


class MissingDataError(DataError, FileNotFoundError):
    """A dataset, file or tokenizer model that is not where the config says."""


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
