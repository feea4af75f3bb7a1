"""Model names as timm users type them: `vit_small` for `vit_small_patch16_224`, pretrained tags
(`vit_small_patch16_224.augreg_in21k_ft_in1k`) and `hf-hub:org/name`; unknown names get real near names."""

from __future__ import annotations

import difflib
from collections import Counter
from dataclasses import dataclass
from functools import cache

import timm

from ..errors import RRMError


@dataclass(frozen=True)
class ResolvedName:
    """The name timm builds, and a one-line note when it differs from what was typed."""

    name: str
    note: str | None = None


@cache
def _pretrained_tags() -> Counter:
    """Architecture -> how many pretrained tags timm has for it (how established a variant is)."""
    return Counter(tag.split(".", 1)[0] for tag in timm.list_pretrained())


def near_names(name: str, limit: int = 5) -> list[str]:
    """Real timm names near `name`: prefix matches, then wildcard matches of its parts, then close spellings."""
    base = name.split(".", 1)[0]
    found = timm.list_models(f"{base}*") + timm.list_models(f"*{base}*")
    parts = [part for part in base.split("_") if part]
    if len(parts) > 1:
        found += timm.list_models("*" + "*".join(parts) + "*")
    found += difflib.get_close_matches(base, timm.list_models(), n=limit, cutoff=0.6)
    tags = _pretrained_tags()
    unique = list(dict.fromkeys(found))
    return sorted(unique[: limit * 4], key=lambda model: (-tags[model], len(model)))[:limit]


def _family_member(base: str) -> str | None:
    """The model timm means by a family name such as `vit_small`: of the `vit_small_*` models, the one with the
    fewest extra name parts (plain before `clip` / `dinov2` variants), then the most pretrained tags, the shortest."""
    members = timm.list_models(f"{base}_*")
    if not members:
        return None
    tags = _pretrained_tags()
    return min(members, key=lambda model: (model[len(base) + 1:].count("_"), -tags[model], len(model)))


def resolve_model_name(name: str, flag: str = "--student", log=None) -> str:
    """`name` as timm builds it (`log` gets a line when that is another name); `RRMError` naming real near names
    when timm has no such model or tag."""
    resolved = resolve(name, flag)
    if resolved.note and log is not None:
        log(resolved.note)
    return resolved.name


def resolve(name: str, flag: str = "--student") -> ResolvedName:
    """`name` as timm builds it, with a note when that is another name; see `resolve_model_name`."""
    if name.startswith(("hf-hub:", "hf_hub:", "local-dir:")):
        return ResolvedName(name)
    base, _, tag = name.partition(".")
    if base not in timm.list_models():
        member = _family_member(base)
        if member is None:
            near = near_names(base)
            raise RRMError(f"timm has no model '{name}' (near: {', '.join(near) or 'none'}); fix {flag} "
                           "(see timm.list_models())")
        count = len(timm.list_models(f"{base}_*"))
        note = (f"{flag} {name}: timm's {member}{'.' + tag if tag else ''} (of {count} {base}_* models, the plainest "
                "and most pretrained; give a full name to choose another)")
        return ResolvedName(f"{member}.{tag}" if tag else member, note)
    if tag and f"{base}.{tag}" not in timm.list_pretrained(f"{base}.*"):
        tags = [known.split(".", 1)[1] for known in timm.list_pretrained(f"{base}.*")]
        raise RRMError(f"timm has no pretrained tag '{tag}' for {base} (tags: {', '.join(tags) or 'none'}); fix {flag}")
    return ResolvedName(name)
