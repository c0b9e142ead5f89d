"""Exceptions that map onto the toolkit's exit codes (docs/formats.md)."""

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 75


class SsaeError(Exception):
    exit_code = EXIT_FAILURE


class BadInput(SsaeError):
    """Bad input or usage: one clear line on stderr, exit 2, nothing half-written."""

    exit_code = EXIT_USAGE


class Interrupted(SsaeError):
    """A signal arrived; work was checkpointed and a rerun resumes."""

    exit_code = EXIT_INTERRUPTED
