"""The project's user-facing errors: a mistake in what the user asked for or gave them (a config key, a
path, a corpus, a shard set, a model directory), with a message that says what to change.

`asr-dist` prints these in one line and exits 2; any other exception is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A mistake the user can fix; the message names the file, key or item and what to do."""


class InvalidValue(UserError, ValueError):
    """A value the user gave (a setting, a file's content) that cannot be used."""


class PathNotFound(UserError, FileNotFoundError):
    """A path the user named that does not exist, or is not what it should be."""


class TrainingError(RuntimeError):
    """The run cannot go on (a diagnosis, not a traceback)."""
