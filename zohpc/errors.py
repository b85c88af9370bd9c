"""Errors a user can cause. Each is reported as one line and exit code 2 on every rank."""

EXIT_USER_ERROR = 2


def one_line(text) -> str:
    """``text`` (a message or an exception) with its white space folded: fit for a one-line error."""
    return " ".join(str(text).split())


class UserError(Exception):
    """Bad input (config, path, file, shape, value): one clear line, exit code 2."""


class ConfigError(UserError):
    """A config key, type or value is wrong."""


class DataError(UserError):
    """A data file is missing, malformed or inconsistent."""


class CheckpointError(UserError):
    """A checkpoint or mask file is missing, foreign, truncated or corrupted."""


EXIT_PREEMPTED = 75  # EX_TEMPFAIL: checkpoint written after SIGTERM/SIGUSR1; the job template requeues
