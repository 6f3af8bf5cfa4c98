"""One exception type for every user-facing failure.

The CLI turns an :class:`AutoDFPError` into a single ``error: ...`` line and exit code 2;
anything else is a bug and keeps its traceback.
"""


class AutoDFPError(Exception):
    """A problem with the user's input (model, checkpoint, data, strategy, paths)."""
