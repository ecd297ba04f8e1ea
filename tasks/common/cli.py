"""Command-line guards for ``train.py``/``eval.py``: unknown config names and user errors end in one sentence."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Callable, Sequence

from .errors import ConfigError, UserError, user_message

CONFIG_GROUPS = ("task", "model", "data", "grc", "trainer", "logger", "callbacks", "paths", "experiment", "debug")


def available_choices(config_dir: str | Path, group: str) -> list[str]:
    """Config names of ``group`` (sub-folders included, e.g. ``paper/table1_pvt_tiny_cached``)."""
    root = Path(config_dir) / group
    if not root.is_dir():
        return []
    return sorted(p.relative_to(root).with_suffix("").as_posix() for p in root.rglob("*.yaml"))


def check_group_overrides(argv: Sequence[str], config_dir: str | Path) -> None:
    """Raise :class:`ConfigError` for ``group=name`` arguments naming no config file of that group.

    Sweep syntax (``a,b``) is checked item by item; Hydra sweep functions (``choice(...)``,
    ``glob(...)``) and interpolations are left to Hydra.
    """
    for arg in argv:
        if arg.startswith("-") or "=" not in arg:
            continue
        key, value = arg.split("=", 1)
        key = key.lstrip("+~")
        if key not in CONFIG_GROUPS or any(c in value for c in "()[]{}$*"):
            continue
        choices = available_choices(config_dir, key)
        for item in value.split(","):
            item = item.strip().strip("'\"")
            if item and item != "null" and item not in choices:
                raise ConfigError(f"Unknown {key} '{item}'; available {key} configs: {', '.join(choices)}.")


def exit_on_user_error(fn: Callable[[], Any]) -> Any:
    """Run ``fn``; a :class:`UserError` prints ``error: <message>`` on stderr and exits with status 2."""
    try:
        return fn()
    except UserError as exc:
        print(f"error: {user_message(exc)}", file=sys.stderr, flush=True)
        sys.exit(2)
