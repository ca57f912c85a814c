"""User-facing errors: each is one line that names the culprit and what to do; and the
value checks that raise `ConfigError` (`check_one_of`, `check_positive`, `check_fraction`),
shared by the parts' configs and the schema.

`vitexp.train` (and the other entry points) print them as `error: <message>` and exit
non-zero without a traceback; HYDRA_FULL_ERROR=1 shows the traceback.

An error from outside this module counts as the user's when it has an `exit_code` too:
`vitexp.models.NotApplicableCell` (a paper N/A cell), which the models package defines
itself so that it imports nothing of vitexp.
"""

from typing import Any


class VitexpError(Exception):
    """A problem the user can fix (bad config, missing data, unusable checkpoint)."""

    exit_code = 2


class ConfigError(VitexpError):
    """A config value that is wrong, or a combination that cannot work."""


class DataError(VitexpError):
    """Missing, empty, mismatched or corrupt data."""


class CheckpointError(VitexpError):
    """A checkpoint that is missing, broken, untrusted or of another architecture."""


class Diverged(VitexpError, FloatingPointError):
    """The training loss became NaN or infinite; no checkpoint is written from that state."""

    exit_code = 3


class Interrupted(VitexpError):
    """The run stopped for a signal (SIGTERM, preemption, Ctrl-C) after saving its checkpoint."""

    exit_code = 143  # 128 + SIGTERM, what a shell reports for a terminated process

    def __init__(self, message: str, exit_code: int | None = None) -> None:
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code  # 130 = 128 + SIGINT for Ctrl-C


class Terminated(KeyboardInterrupt):
    """SIGTERM where nothing stops gracefully (before a training step has finished, outside
    `trainer.fit`): raised like Ctrl-C's KeyboardInterrupt, so that the run says what it kept
    and exits 143 instead of vanishing (SIGTERM's default)."""


def is_user_error(err: BaseException) -> bool:
    """A problem the user can fix: printed as one line, exit with its own code."""
    return isinstance(err, VitexpError) or isinstance(getattr(err, "exit_code", None), int)


# --- value checks ---------------------------------------------------------------------------
def check_one_of(key: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}={value!r} is not allowed; choose one of {', '.join(allowed)}")


def check_positive(key: str, value: float | int | None, allow_zero: bool = False) -> None:
    if value is None:
        return
    if value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"{key}={value!r} must be {bound}")


def check_fraction(key: str, value: float, low: float = 0.0, high: float = 1.0) -> None:
    if not low <= value < high:
        raise ConfigError(f"{key}={value!r} must be in [{low}, {high})")
