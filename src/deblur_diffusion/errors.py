"""Errors that the command-line entry points report as a one-line message instead of a traceback.

Each one is raised where the problem is detected and names the file, folder or config key at fault.
"""


class DeblurError(Exception):
    """Base class of the errors a user can fix (bad data, bad paths, bad configuration)."""


class ImageReadError(DeblurError):
    """An image file is missing, unreadable, corrupt or of an unsupported layout."""


class DatasetLayoutError(DeblurError):
    """A dataset folder is missing or does not have the expected layout."""


class PairMismatchError(DeblurError):
    """Input and target files do not pair up (counts, names or sizes differ)."""


class ConfigError(DeblurError):
    """A configuration value is missing or invalid."""
