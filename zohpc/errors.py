"""Errors a user can cause. Each is reported as one line and exit code 2 on every rank."""

EXIT_USER_ERROR = 2


def one_line(text) -> str:
    """``text`` (a message or an exception) with its white space folded: fit for a one-line error."""
    return " ".join(str(text).split())


def describe(exc: BaseException) -> str:
    """An exception as a short phrase for a one-line error: its type and first line
    (``sys.exit(3)`` for a SystemExit)."""
    if isinstance(exc, SystemExit):
        return f"sys.exit({exc.code!r})"
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


# What a user's code (a plug-in's import, factory, model, objective, metrics) may raise: any
# exception, and also sys.exit, which on one rank alone would leave the others waiting in a
# collective; caught where zohpc calls that code and reported as one line (exit 2 everywhere).
PLUGIN_FAILURES = (Exception, SystemExit)


class UserError(Exception):
    """Bad input (config, path, file, shape, value): one clear line, exit code 2."""


class ConfigError(UserError):
    """A config key, type or value is wrong."""


class DataError(UserError):
    """A data file is missing, malformed or inconsistent."""


class CheckpointError(UserError):
    """A checkpoint or mask file is missing, foreign, truncated or corrupted."""


EXIT_PREEMPTED = 75  # EX_TEMPFAIL: checkpoint written after SIGTERM/SIGUSR1; the job template requeues
