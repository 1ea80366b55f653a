"""The errors comm/ raises (afsplit/errors.py re-exports the user-facing ones).

``InputError`` is the base of every error a user's input can cause (a bad config key, topology,
placement or statistics file): its message is one line naming the file/field and the fix, and the
CLI prints it as-is. ``CommError`` is a communication step that failed at run time: a peer died,
stopped answering or disagreed; its message names the rank.
"""


class InputError(Exception):
    """Caused by user input; the message is one line, shown as-is."""


class ConfigError(InputError):
    """A YAML config, override, topology, placement or statistics file is invalid."""


class CommError(RuntimeError):
    """A communication step failed: a peer died, stopped answering or disagreed with this rank.

    ``peer`` is the global rank blamed, when one is (the launcher names it in its one error line)."""

    def __init__(self, message: str, peer: int | None = None):
        super().__init__(message)
        self.peer = peer
