"""Domain exceptions.

Flows tell bad input (never retried, the message names the fix) from a flaky service (retried)
by these types. Every message names the thing to change: the field, the file, the row.
"""


class SftflowError(Exception):
    """Base class: an error the user can act on. The CLI prints the message without a traceback."""


class ConfigError(SftflowError):
    """A configuration value or command-line option is invalid."""


class DropError(SftflowError):
    """A drop cannot be read at all (no such path, unsupported file, unsafe drop id)."""


class DropRejectedError(SftflowError):
    """A drop was read, but too many of its rows failed validation; no dataset version was written.

    `report` is the drop report (a dict) that explains why; it is also on disk under the drop's
    directory in the workspace.
    """

    def __init__(self, message: str, report: dict):
        super().__init__(message)
        self.report = report


class DatasetError(SftflowError):
    """The workspace's dataset lineage is inconsistent with the request (e.g. a changed split ratio)."""
