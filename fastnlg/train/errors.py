"""The user errors of training: what the command line prints as one line without a traceback."""


class ConfigError(ValueError):
    """A bad training configuration; the message names the key."""


class DataError(ValueError):
    """Bad training data; the message names the file and line."""


class CheckpointError(RuntimeError):
    """A checkpoint that could not be written (the disk) or read back (a damaged file); the message names it."""
