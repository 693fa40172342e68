"""Errors a user can fix in the data config: the CLI reports them without a traceback."""


class DataError(ValueError):
    """A data setting that cannot work; the message names the config key."""


class MissingDataError(DataError, FileNotFoundError):
    """A dataset, file or tokenizer model that is not where the config says."""
