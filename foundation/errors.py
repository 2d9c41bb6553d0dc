"""Domain exceptions.

Flows tell bad input (never retried, the message names the fix) from a flaky service (retried)
by these types. Every message names the thing to change: the field, the file, the row. Errors of one
stage only (a failed gate, a missed parity threshold) are defined in that stage's module, as
subclasses of `SftflowError`.
"""

from __future__ import annotations

from pydantic import BaseModel


class SftflowError(Exception):
    """Base class: an error the user can act on. The CLI prints the message without a traceback."""


class ConfigError(SftflowError):
    """A configuration value or command-line option is invalid."""


class DropError(SftflowError):
    """A drop cannot be read at all (no such path, unsupported file, unsafe drop id)."""


class DropRejectedError(SftflowError):
    """A drop was read, but too many of its rows failed validation; no dataset version was written.

    `report` is the drop report (a `foundation.artifacts.DropReport`) that explains why; it is also on
    disk under the drop's directory in the workspace.
    """

    def __init__(self, message: str, report: BaseModel):
        super().__init__(message)
        self.report = report


class DatasetError(SftflowError):
    """The workspace's dataset lineage is inconsistent with the request (e.g. a changed split ratio)."""


class NotFoundError(SftflowError):
    """A named thing (run, dataset version, model, version) is not in the workspace; the message lists
    what is there or how to list it."""


class WorkspaceError(SftflowError):
    """The workspace cannot be used by this version of sftflow: written by an incompatible version, or a
    file in it is not what this version reads."""
