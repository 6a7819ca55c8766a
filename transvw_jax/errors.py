"""User-facing errors: each carries one line that names the file or key at fault.

`main` turns them into that line on stderr and a non-zero exit code instead of a
traceback: ConfigError (a bad config file, key, value or stage) exits with 2, any other
TransVWError with 1.
"""


class TransVWError(Exception):
    """An error caused by the user's input (a file, a key, a value), not by a bug."""

    exit_code = 1
    label = "error"  # main prints "<label>: <message>"


class ConfigError(TransVWError):
    """A bad config file, config key or config value."""

    exit_code = 2


class CheckpointError(TransVWError):
    """A missing, corrupt or mismatched checkpoint or weight file."""


class DataError(TransVWError):
    """A missing, unreadable or unusable data file or directory (volumes, stores)."""


class Preempted(TransVWError):
    """The job was asked to stop (SIGTERM: a TPU preemption, a SLURM requeue) and saved a
    checkpoint first; the same command resumes it. Exits like a process ended by SIGTERM."""

    exit_code = 143
    label = "preempted"
