"""Errors a user can fix, one-line error text, and errors that say where they happened.

Everything ``ips`` raises for bad input (a config value, a file, an image, a missing extra)
is a `UserError`: the command line answers it with one line ``ips: error: ...`` and exit
status 2. Each kind is also the built-in error it refines (a `ConfigError` is a ValueError,
a `MissingFileError` a FileNotFoundError), so ``except ValueError`` keeps working. Any other
exception is a bug and keeps its traceback. This module imports nothing of the package.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input: the message says what was expected and what arrived, naming the field or
    file."""


class ConfigError(UserError, ValueError):
    """A config value, a command-line option or an argument that is not allowed."""


class InputError(UserError, ValueError):
    """A file, image, table, feature bag or checkpoint whose content does not fit."""


class MissingFileError(UserError, FileNotFoundError):
    """A file or folder that is not there."""


class MissingExtraError(UserError, ImportError):
    """An optional dependency that is not installed; the message names the extra."""


class TrainingError(UserError, FloatingPointError):
    """Training that cannot go on as configured (a loss that became NaN, say)."""


class WriteError(UserError, OSError):
    """A file that could not be written (a full disk, a file-size limit, no permission); the
    message names the path, and the file that was there before is kept."""


class InUseError(UserError, RuntimeError):
    """A run folder that a live run of another process holds; the message names its pid and
    host."""


class Stopped(Exception):
    """Training stopped early and can continue: ``last.pt`` in the run folder holds the last
    finished step and ``--resume`` goes on from it exactly. Not a UserError: the command line
    prints its one line and exits with ``exit_status``: `PREEMPTED_EXIT` after a signal
    (SIGTERM from a scheduler), 1 after a failure such as a data loader worker that died."""

    def __init__(self, message: str, *, exit_status: int = 1) -> None:
        super().__init__(message)
        self.exit_status = exit_status


PREEMPTED_EXIT = 75  # EX_TEMPFAIL: stopped by a signal; the same command with --resume goes on


def one_line(err: BaseException, limit: int | None = None) -> str:
    """The error's message on one line (its type's name when it has none); for an error
    re-raised from a `DataLoader` worker, the original error's last line."""
    text = str(err)
    if "Original Traceback" in text:
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        text = lines[-1] if lines else text
        if ": " in text and text.split(": ", 1)[0].isidentifier():
            text = text.split(": ", 1)[1]  # "ValueError: msg" -> "msg"
    text = " ".join(text.split()) or type(err).__name__
    if limit is not None and len(text) > limit:
        text = text[: limit - 3] + "..."
    return text


def located(err: BaseException, where: str) -> BaseException:
    """``err`` with ``where`` (e.g. ``labels.csv:12``) in front of its one-line message, as an
    error of the same type where that type takes a message; ``err`` itself otherwise."""
    message = one_line(err)
    if message.startswith(where):
        return err
    try:
        renamed = type(err)(f"{where}: {message}")
    except Exception:  # an exception type with another constructor
        return err
    return renamed
