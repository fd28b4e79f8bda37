"""The user errors of training: what the command line prints as one line without a traceback."""


class ConfigError(ValueError):
    """A bad training configuration; the message names the key."""


class DataError(ValueError):
    """Bad training data; the message names the file and line."""
