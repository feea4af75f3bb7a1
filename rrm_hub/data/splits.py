"""Split names as `datasets` reads them: `train`, `train[:1000]`, `train[1000:]`, `train[:10%]`."""

from __future__ import annotations

import re

import datasets

from ..errors import RRMError

_SLICED = re.compile(r"^(?P<name>[\w.-]+)\[(?P<start>-?\d*%?):(?P<stop>-?\d*%?)\]$")


def parse(spec: str, flag: str) -> tuple[str, str | None, str | None]:
    """(split name, start, stop) of `spec`; start and stop are the bounds as written (`1000`, `10%`) or None."""
    if "[" not in spec:
        return spec, None, None
    match = _SLICED.match(spec.replace(" ", ""))
    if match is None:
        raise RRMError(f"{flag} '{spec}' is not a split or a slice of one; write e.g. train, train[:1000], "
                       "train[1000:] or train[:10%]")
    return match["name"], match["start"] or None, match["stop"] or None


def _index(bound: str | None, size: int) -> int | None:
    if bound is None:
        return None
    return round(size * int(bound[:-1]) / 100) if bound.endswith("%") else int(bound)


def _chosen(size: int, start: str | None, stop: str | None) -> range:
    """The indices a slice's bounds, as written, take of a split of `size` images."""
    return range(size)[slice(_index(start, size), _index(stop, size))]


def pick(loaded: datasets.DatasetDict | datasets.IterableDatasetDict, spec: str, flag: str):
    """The split `spec` names, sliced as written; a one-line error naming the splits there are otherwise.
    A streamed split takes integer bounds only (its length may be unknown)."""
    name, start, stop = parse(spec, flag)
    if name not in loaded:
        raise RRMError(f"dataset has no split '{name}' (splits: {list(loaded)}); fix {flag}")
    split = loaded[name]
    if start is None and stop is None:
        return split
    if isinstance(split, datasets.IterableDataset):
        if any(b is not None and (b.endswith("%") or b.startswith("-")) for b in (start, stop)):
            raise RRMError(f"{flag} '{spec}': a stream is sliced by counts from its start, e.g. {name}[:1000]")
        first = int(start or 0)
        rest = split.skip(first) if first else split
        return rest.take(int(stop) - first) if stop is not None else rest
    chosen = _chosen(len(split), start, stop)
    if len(chosen) == 0:
        raise RRMError(f"{flag} '{spec}' selects no images of the {len(split)} in '{name}'; widen the slice")
    return split.select(chosen)


def rest(loaded: datasets.DatasetDict, spec: str, flag: str) -> datasets.Dataset:
    """The images of `spec`'s split (--train-split's) that its slice leaves out (`train[:1000]` -> `train[1000:]`);
    `flag` is the option that asked for them."""
    name, start, stop = parse(spec, flag)
    split = pick(loaded, name, flag)
    if start is None and stop is None:
        raise RRMError(f"--train-split '{spec}' takes every image of '{name}', so {flag} rest leaves none: slice "
                       f"it, e.g. {name}[:1000]")
    taken = _chosen(len(split), start, stop)
    left = [*range(taken.start), *range(max(taken.start, taken.stop), len(split))]
    if not left:
        raise RRMError(f"--train-split '{spec}' takes every image of '{name}', so {flag} rest leaves none; narrow "
                       "the slice")
    return split.select(left)


def stream_length(spec: str, known: int | None) -> int | None:
    """The number of images a sliced stream gives, where its split's length is `known` (or None)."""
    _, start, stop = parse(spec, "--train-split")
    first = int(start or 0)
    end = int(stop) if stop is not None else known
    if end is None:
        return None
    return max(0, min(end, known) - first) if known is not None else end - first
