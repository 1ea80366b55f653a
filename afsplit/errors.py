"""User-facing error types.

Every error a user can cause (a bad config key, a corrupt checkpoint, a bad request) is raised as
an :class:`AfsplitError` whose message is one line naming the file/field/request and the fix.
The CLI prints that line and exits non-zero instead of showing a traceback.
"""


class AfsplitError(Exception):
    """Base class for errors caused by user input; the message is shown as-is."""


class ConfigError(AfsplitError):
    """A YAML config, override or topology is invalid."""


class CheckpointError(AfsplitError):
    """A model directory is missing files, has corrupt files or tensors that disagree with config.json."""


class RequestError(AfsplitError):
    """One request is invalid (empty prompt, too long, bad sampling parameters, malformed JSONL)."""
