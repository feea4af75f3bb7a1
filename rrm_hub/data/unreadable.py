"""Images that cannot be decoded (a corrupt JPEG, a truncated PNG): skipped and counted, not a crash.

Loaders decode images themselves (`decode`), so one bad file is skipped rather than ending the run: training takes
the next readable image in its place, evaluation leaves it out (`collate_readable`). Each skip is appended to a log
that the loader's worker processes share (`UnreadableImages`); more than `limit` of a split unreadable stops the run
with one line, and the run reports what it skipped (`summary`).
"""

from __future__ import annotations

import atexit
import os
import tempfile
from pathlib import Path

import datasets
from PIL import Image
from torch.utils.data import default_collate

from ..errors import RRMError

UNREADABLE = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)
"""How PIL (through `datasets`) fails on a file that is not a readable image."""
SHOWN = 3


def raw(rows: datasets.Dataset | datasets.IterableDataset, column: str):
    """`rows` with `column`'s images left undecoded ({"bytes", "path"}), for `decode`."""
    return rows.cast_column(column, datasets.Image(decode=False))


def decode(value) -> Image.Image:
    """An undecoded image value ({"bytes", "path"}) as a PIL image, fully read (so a truncated file fails here)."""
    image = datasets.Image().decode_example(value)
    image.load()
    return image


def where(value, fallback: str) -> str:
    """A name for an image in messages: its file, else `fallback` (split and index)."""
    path = value.get("path") if isinstance(value, dict) else None
    return path or fallback


class UnreadableImages:
    """The unreadable images met in one split of `total` images, logged in a file that worker processes append to;
    more than `limit` (a fraction) of them stops the run."""

    def __init__(self, split: str, total: int | None, limit: float):
        self.split, self.total, self.limit = split, total, limit
        handle, name = tempfile.mkstemp(prefix=f"rrm-hub-unreadable-{split}-", suffix=".log")
        os.close(handle)
        self.path = Path(name)
        atexit.register(self.path.unlink, missing_ok=True)

    def record(self, index: int, name: str, error: Exception) -> None:
        """Log one unreadable image (its index, name and error); refuse to go on past the limit."""
        reason = str(error).splitlines()[0][:80] if str(error) else type(error).__name__
        with open(self.path, "a") as log:  # one short write: appends from several processes do not interleave
            log.write(f"{index}\t{name}\t{reason}\n")
        self.check()

    def found(self) -> dict[int, tuple[str, str]]:
        """{index: (name, error)} of the unreadable images logged so far."""
        rows = [line.split("\t") for line in self.path.read_text().splitlines() if line.count("\t") == 2]
        return {int(index): (name, reason) for index, name, reason in rows}

    def check(self) -> None:
        found = self.found()
        if self.total and len(found) > self.limit * self.total:
            raise RRMError(f"{len(found)} of the {self.total} {self.split} images cannot be read "
                           f"({self._first(found)}): more than --max-bad-images {self.limit:g} allows; fix or remove "
                           "those files, or raise --max-bad-images")

    def summary(self) -> dict | None:
        """{"count", "first"} of what was skipped, or None."""
        found = self.found()
        if not found:
            return None
        return {"count": len(found), "first": [found[i][0] for i in sorted(found)[:SHOWN]]}

    def line(self) -> str | None:
        """One line for the run's output, or None when nothing was skipped."""
        found = self.found()
        if not found:
            return None
        return f"skipped {len(found)} unreadable {self.split} image(s) ({self._first(found)})"

    @staticmethod
    def _first(found: dict) -> str:
        first = [f"{found[i][0]}: {found[i][1]}" for i in sorted(found)[:SHOWN]]
        return "first: " + "; ".join(first) + ("; ..." if len(found) > SHOWN else "")


def collate_readable(batch: list):
    """`default_collate` of the examples that could be read (None marks one that could not)."""
    readable = [example for example in batch if example is not None]
    if not readable:
        raise RRMError(f"a whole batch of {len(batch)} images cannot be read; fix or remove those files")
    return default_collate(readable)
