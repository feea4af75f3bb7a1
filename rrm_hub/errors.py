"""User-facing errors: one line that says what went wrong and what to do."""

from __future__ import annotations

import sys
from collections.abc import Callable
from functools import wraps
from typing import TypeVar

T = TypeVar("T")


class RRMError(Exception):
    """A problem with the user's input or environment, reported as one line naming the fix."""


def one_line_errors(main: Callable[..., T]) -> Callable[..., T]:
    """Run a recipe's `main`, turning an `RRMError` (or Ctrl-C) into one line on stderr and exit code 2."""

    @wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except RRMError as err:
            print(f"error: {err}", file=sys.stderr)
            raise SystemExit(2) from None
        except KeyboardInterrupt as stop:  # training says where it saved its checkpoint (rrm_hub.train)
            print(f"interrupted: {stop.args[0] if stop.args else 'stopped by Ctrl-C; files already written are kept.'}",
                  file=sys.stderr)
            raise SystemExit(130) from None

    return wrapper
