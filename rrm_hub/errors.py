"""User-facing errors: one line that says what went wrong and what to do."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import wraps
from typing import TypeVar

T = TypeVar("T")


class RRMError(Exception):
    """A problem with the user's input or environment, reported as one line naming the fix."""


class RRMLoadError(RRMError, OSError):
    """A model that could not be loaded: an `RRMError` that is also the `OSError` that transformers'
    `from_pretrained` raises, so code written for transformers catches it too."""


OFFLINE_HINT = "(HF_HUB_OFFLINE?); download it first or give a local path"


@contextmanager
def hub_errors(what: str, error: type[RRMError] = RRMError, revision: str | None = None) -> Iterator[None]:
    """Turn `huggingface_hub`'s errors while fetching `what` into one-line `error`s that say what to do."""
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        HFValidationError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        yield
    except HFValidationError:
        raise error(f"{what}: no such folder, and not a Hub id (org/name); give an existing folder or a repo id"
                    ) from None
    except (LocalEntryNotFoundError, OfflineModeIsEnabled):
        raise error(f"{what} is not in the local Hugging Face cache and the Hub cannot be reached {OFFLINE_HINT}"
                    ) from None
    except GatedRepoError:
        raise error(f"{what} is gated: accept its terms on the Hub and log in (hf auth login) or pass a token"
                    ) from None
    except RevisionNotFoundError:
        raise error(f"{what} has no revision '{revision}'; give a branch, tag or commit it has") from None
    except RepositoryNotFoundError:
        raise error(f"{what}: no such repo on the Hub, or it is private (log in with hf auth login, or pass a "
                    "token)") from None
    except EntryNotFoundError:
        raise error(f"{what}: the repo has no such file; check the id and the path") from None
    except HfHubHTTPError as err:
        raise error(f"{what} could not be fetched from the Hub ({type(err).__name__}); check the id, the path, "
                    "the revision and your token (hf auth login)") from None


def one_line(err: RRMError) -> str:
    """The error's line; an `RRMError` raised in a DataLoader worker comes back wrapped in the worker's traceback,
    whose last line is the original one."""
    message = str(err)
    if "\nOriginal Traceback" in message:
        message = message.strip().splitlines()[-1].partition(": ")[2] or message
    return message


def one_line_errors(main: Callable[..., T]) -> Callable[..., T]:
    """Run a recipe's `main`, turning an `RRMError` (or Ctrl-C) into one line on stderr and exit code 2."""

    @wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except RRMError as err:
            print(f"error: {one_line(err)}", file=sys.stderr)
            raise SystemExit(2) from None
        except KeyboardInterrupt as stop:  # training says where it saved its checkpoint (rrm_hub.train)
            print(f"interrupted: {stop.args[0] if stop.args else 'stopped by Ctrl-C; files already written are kept.'}",
                  file=sys.stderr)
            raise SystemExit(130) from None

    return wrapper
