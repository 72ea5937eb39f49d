"""User-facing errors: raised for mistakes a user can fix, reported as one line by the entry points."""


class SenseFlowError(ValueError):
    """Base class: a problem with the user's config, files or data, with a message saying what to fix."""


class ConfigError(SenseFlowError):
    """A config file, key or value is wrong (the message names the file and the key)."""


class DataError(SenseFlowError):
    """A dataset file or entry is wrong (the message names the entry)."""
