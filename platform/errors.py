"""The error type for input a user must fix.

Jobs raise `UserError` (or one of the module errors the CLI knows:
`ConfigError`, `StorageError`, `MediaError`, `CheckpointError`) for a missing
file, an empty input folder, an unreachable endpoint, a limit exceeded. The
CLI prints its message as one line and exits with status 2; anything else
is a bug and keeps its traceback.
"""
from __future__ import annotations


class UserError(Exception):
    """An input the user must fix; the message says what is wrong and how to fix it."""
