"""The open vocabulary: class names with synonyms, label ids, stable display colours, a version."""

from __future__ import annotations

import colorsys
import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np

from clip3d_core.labels import DRIVING_PALETTE, MAX_CLASSES

SYNONYM_SEPARATOR = "|"


class VocabularyError(ValueError):
    """A vocabulary entry is malformed, duplicated or unknown."""


@dataclass(frozen=True)
class VocabularyEntry:
    """One class: its display `name` (the first synonym) and every phrasing used to embed it."""

    name: str
    synonyms: tuple[str, ...]

    @classmethod
    def parse(cls, text: str) -> VocabularyEntry:
        """`"car|automobile"` -> name "car", synonyms ("car", "automobile"); repeats dropped."""
        if not isinstance(text, str):
            raise VocabularyError(f"vocabulary entry must be a string, got {type(text).__name__}: {text!r}")
        parts = [p.strip() for p in text.split(SYNONYM_SEPARATOR)]
        if not any(parts):
            raise VocabularyError("empty vocabulary entry")
        if not all(parts):
            raise VocabularyError(f"empty synonym in vocabulary entry {text!r}")
        unique: dict[str, str] = {}
        for p in parts:
            unique.setdefault(p.casefold(), p)
        synonyms = tuple(unique.values())
        return cls(name=synonyms[0], synonyms=synonyms)

    def __str__(self) -> str:
        return SYNONYM_SEPARATOR.join(self.synonyms)


def _palette_key(name: str) -> str:
    return " ".join(name.casefold().replace("-", " ").replace("_", " ").split())


def name_colour(name: str) -> tuple[int, int, int]:
    """A colour fixed by the name alone, the same in every process and run: `DRIVING_PALETTE` for
    the usual driving classes, otherwise a hash of the name -> HSV."""
    known = DRIVING_PALETTE.get(_palette_key(name))
    if known is not None:
        return known
    h = hashlib.sha256(name.casefold().encode("utf-8")).digest()
    hue = int.from_bytes(h[:2], "little") / 65536.0
    sat = 0.55 + 0.4 * h[2] / 255.0  # saturated and bright enough to read on a dark RViz background
    val = 0.75 + 0.25 * h[3] / 255.0
    r, g, b = colorsys.hsv_to_rgb(hue, sat, val)
    return round(r * 255), round(g * 255), round(b * 255)


@dataclass(frozen=True)
class Vocabulary:
    """An ordered set of classes; label `i` means `entries[i]`. Build with `from_strings`."""

    entries: tuple[VocabularyEntry, ...]
    version: int = 0
    _by_key: dict[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.entries:
            raise VocabularyError("vocabulary is empty")
        if len(self.entries) > MAX_CLASSES:
            raise VocabularyError(f"vocabulary has {len(self.entries)} entries; at most {MAX_CLASSES}")
        by_key: dict[str, int] = {}
        for i, entry in enumerate(self.entries):
            key = entry.name.casefold()
            if key in by_key:
                raise VocabularyError(
                    f"duplicate vocabulary name {entry.name!r} (entries {by_key[key]} and {i})"
                )
            by_key[key] = i
        object.__setattr__(self, "_by_key", by_key)

    @classmethod
    def from_strings(cls, strings: Sequence[str], version: int = 0) -> Vocabulary:
        if isinstance(strings, str):  # a bare string would silently become one entry per character
            raise VocabularyError("vocabulary must be a list of strings, got one string")
        return cls(entries=tuple(VocabularyEntry.parse(s) for s in strings), version=int(version))

    @property
    def names(self) -> list[str]:
        return [e.name for e in self.entries]

    @cached_property
    def colours(self) -> np.ndarray:
        """np.uint8 [C, 3] RGB, one stable colour per name (read-only)."""
        out = np.array([name_colour(e.name) for e in self.entries], dtype=np.uint8).reshape(-1, 3)
        out.setflags(write=False)
        return out

    def index(self, name: str) -> int:
        """Label id of `name` (case-insensitive); `VocabularyError` when absent."""
        try:
            return self._by_key[name.strip().casefold()]
        except KeyError:
            raise VocabularyError(f"{name!r} is not in the vocabulary {self.names}") from None

    def to_strings(self) -> list[str]:
        """The entries as `from_strings` takes them (synonyms joined by '|')."""
        return [str(e) for e in self.entries]

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready map `{"version", "entries": [{"id", "name", "synonyms", "colour"}]}`."""
        return {
            "version": self.version,
            "entries": [
                {"id": i, "name": e.name, "synonyms": list(e.synonyms), "colour": [int(c) for c in col]}
                for i, (e, col) in enumerate(zip(self.entries, self.colours))
            ],
        }

    def __len__(self) -> int:
        return len(self.entries)

    def __iter__(self) -> Iterator[VocabularyEntry]:
        return iter(self.entries)
