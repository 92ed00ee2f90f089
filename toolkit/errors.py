"""Errors that a user's input can cause.

The CLI and the study scripts turn every `UserError` into one line on stderr and exit code 2
(`EXIT_USER_ERROR`); anything else is a bug and keeps its traceback.
"""

EXIT_USER_ERROR = 2


def machine_error(err: OSError) -> str:
    """One line for an OSError: a read-only folder, a full disk, a missing file are the
    machine's state, not a bug."""
    return f"{err.strerror or err}" + (f" ({err.filename})" if err.filename else "")


class UserError(Exception):
    """Bad input from the user: a wrong option, a missing file, data of the wrong shape."""


class ConfigError(UserError):
    """One or more invalid options. All problems are collected and reported together."""

    def __init__(self, problems):
        self.problems = list(problems) if not isinstance(problems, str) else [problems]
        super().__init__("; ".join(self.problems))


class DataError(UserError):
    """A dataset that cannot be read or does not have the expected content."""


class StudyError(UserError):
    """A study cannot go on as asked: an unknown row, a folder holding another configuration,
    a row that failed (its one-line reason)."""


class TrainingDiverged(Exception):
    """A loss became NaN or infinite; the last good checkpoint is kept."""
