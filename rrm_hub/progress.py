"""Progress bars: tqdm's on a terminal; written to a file or a pipe, one whole line at most every `LINE_EVERY`
seconds (and the last state when done), as timm's and accelerate's logs read, instead of carriage-return frames."""

from __future__ import annotations

import sys
import time

from tqdm.auto import tqdm

LINE_EVERY = 30.0


class _Lines:
    """A stream that passes whole lines and drops the carriage returns and blanks a terminal bar writes."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text: str) -> None:
        if text.strip():
            self.stream.write(text)

    def flush(self) -> None:
        self.stream.flush()


class progress(tqdm):  # noqa: N801 - used as tqdm is
    """`tqdm`, or off a terminal a log of lines."""

    def __init__(self, *args, **kwargs):
        stream = kwargs.get("file") or sys.stderr
        self.as_lines = not (hasattr(stream, "isatty") and stream.isatty())
        self.last_line, self.last_n = -float("inf"), None
        if self.as_lines:
            kwargs["file"] = _Lines(stream)
        super().__init__(*args, **kwargs)

    def display(self, msg=None, pos=None):
        if not self.as_lines:
            return super().display(msg, pos)
        if msg == "" or time.monotonic() - self.last_line < LINE_EVERY:
            return True  # the bar's clearing, or too soon after the last line
        self.fp.write(f"{(msg if msg is not None else str(self)).strip()}\n")
        self.fp.flush()
        self.last_line, self.last_n = time.monotonic(), self.n
        return True

    def close(self):
        if self.as_lines and not self.disable and self.n and self.n != self.last_n:
            self.last_line = -float("inf")
            self.display()  # the final state, once
        super().close()
