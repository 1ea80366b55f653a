"""User-facing error types.

Every error a user can cause (a bad config key, a corrupt checkpoint, a bad request) is raised as
an :class:`AfsplitError` whose message is one line naming the file/field/request and the fix.
The CLI prints that line and exits non-zero instead of showing a traceback. comm/ (the layer
below) raises the same base class, so its placement and topology errors read the same way.
"""

from comm.errors import ConfigError, InputError

AfsplitError = InputError  # one base for every layer: `except AfsplitError` catches comm's input errors too

__all__ = ["AfsplitError", "ConfigError", "CheckpointError", "RequestError"]


class CheckpointError(AfsplitError):
    """A model directory is missing files, has corrupt files or tensors that disagree with config.json."""


class RequestError(AfsplitError):
    """One request is invalid (empty prompt, too long, bad sampling parameters, malformed JSONL)."""
