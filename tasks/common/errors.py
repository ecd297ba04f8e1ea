"""User-facing errors: anything a user can cause ends in one clear sentence, not a traceback.

``train.py`` and ``eval.py`` catch :class:`UserError` and print ``error: <message>``, exiting with
status 2. Errors raised inside DataLoader worker processes come back wrapped in PyTorch's
"Caught ... in DataLoader worker process" text; :func:`user_message` recovers the original sentence.
"""
from __future__ import annotations


class UserError(Exception):
    """An error the user can fix (a path, a name, a config value); the message says how."""


class DataError(UserError):
    """The dataset is missing, malformed or holds an unreadable file."""


class ConfigError(UserError):
    """A config value or name is invalid."""


class NonFiniteLossError(UserError):
    """The training loss became NaN or infinite; the last good checkpoint is kept."""


def user_message(exc: BaseException) -> str:
    """The one-sentence message of ``exc``, unwrapping DataLoader worker re-raises."""
    text = str(exc).strip()
    if "Original Traceback" in text:
        last = text.splitlines()[-1]
        # "tasks.common.errors.DataError: <message>"
        name = type(exc).__name__
        marker = f"{name}: "
        text = last.split(marker, 1)[1] if marker in last else last
    return text
