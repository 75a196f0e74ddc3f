"""Precomputed phrase embeddings: a vehicle labels with a fixed bank instead of running the text tower.

Phrases are matched case-insensitively with '_' read as a space, so LVIS's "traffic_light" answers
"traffic light". Synonyms of a vocabulary entry are averaged exactly as `TextEncoder` does.
"""

from __future__ import annotations

import csv
import json
import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from clip3d_core.clip.loader import ClipIdentity, ClipLoadError
from clip3d_core.clip.text import NameEmbeddings, TextEncoder, combine_synonyms, name_embeddings
from clip3d_core.clip.vocabulary import Vocabulary, VocabularyError

log = logging.getLogger(__name__)

BANK_FORMAT = "clip3d-text-bank"
BANK_FORMAT_VERSION = 1

# Detic's released CLIP text embeddings (datasets/metadata/*.npy): OpenAI ViT-B/32, prompt "a {}".
DETIC_IDENTITY = ClipIdentity(model_name="ViT-B-32", source="pretrained:openai", embed_dim=512)
DETIC_FILES = {
    "lvis": "lvis_v1_clip_a+cname.npy",
    "coco": "coco_clip_a+cname.npy",
    "objects365": "o365_clip_a+cnamefix.npy",
}
COCO_CLASSES: tuple[str, ...] = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog",
    "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag",
    "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite", "baseball bat",
    "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle", "wine glass", "cup", "fork",
    "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange", "broccoli", "carrot", "hot dog",
    "pizza", "donut", "cake", "chair", "couch", "potted plant", "bed", "dining table", "toilet", "tv",
    "laptop", "mouse", "remote", "keyboard", "cell phone", "microwave", "oven", "toaster", "sink",
    "refrigerator", "book", "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
)  # fmt: skip


def phrase_key(text: str) -> str:
    """Matching form of a phrase: case-folded, '_' as space, single spaces."""
    return " ".join(text.replace("_", " ").casefold().split())


class EmbeddingBank:
    """Phrase embeddings `vectors[i]` for `names[i]` made by CLIP `identity`, plus optional extra
    `aliases` (phrase -> row). Vectors are stored L2-normalised."""

    def __init__(
        self,
        names: Sequence[str],
        vectors: torch.Tensor,
        identity: ClipIdentity,
        aliases: dict[str, int] | None = None,
    ) -> None:
        vectors = torch.as_tensor(vectors).detach().float().cpu()
        if vectors.ndim != 2 or vectors.shape[0] != len(names):
            raise VocabularyError(f"one vector per name: {len(names)} names, vectors {tuple(vectors.shape)}")
        if vectors.shape[1] != identity.embed_dim:
            raise VocabularyError(f"bank vectors have D={vectors.shape[1]}, but identity {identity}")
        if not torch.isfinite(vectors).all() or (vectors.norm(dim=1) == 0).any():
            raise VocabularyError("bank vectors must be finite and non-zero")
        self.names = [str(n) for n in names]
        self.vectors = F.normalize(vectors, dim=-1)
        self.identity = identity
        self.aliases = dict(aliases or {})
        self._rows: dict[str, int] = {}
        for i, name in enumerate(self.names):
            key = phrase_key(name)
            if key in self._rows:
                raise VocabularyError(f"duplicate bank name {name!r}")
            self._rows[key] = i
        for alias, row in self.aliases.items():
            if not 0 <= row < len(self.names):
                raise VocabularyError(f"bank alias {alias!r} points at row {row} of {len(self.names)}")
            self._rows.setdefault(phrase_key(alias), row)  # a real name wins over an alias

    def __len__(self) -> int:
        return len(self.names)

    def __contains__(self, phrase: str) -> bool:
        return phrase_key(phrase) in self._rows

    def phrase_vectors(self, phrases: Sequence[str]) -> torch.Tensor:
        """[len(phrases), D]; `VocabularyError` naming every phrase the bank lacks."""
        missing = sorted({p for p in phrases if phrase_key(p) not in self._rows})
        if missing:
            raise VocabularyError(
                f"not in the embedding bank ({len(self)} phrases, {self.identity}): {missing}"
            )
        return self.vectors[[self._rows[phrase_key(p)] for p in phrases]]

    def lookup(self, vocab: Vocabulary) -> torch.Tensor:
        """[C, D] unit class vectors, synonyms averaged (equals `TextEncoder.encode` for its bank)."""
        return combine_synonyms(vocab.entries, self.phrase_vectors)

    def lookup_names(self, vocab: Vocabulary) -> NameEmbeddings:
        """One row per name (synonym) of every entry (max-over-names scoring): the bank stores a
        vector per phrase, so a checkpoint's bank serves this as well as `lookup`."""
        return name_embeddings(vocab.entries, self.phrase_vectors)

    def check_identity(self, identity: ClipIdentity) -> None:
        """Raise `ClipLoadError` unless the bank lives in `identity`'s embedding space."""
        if identity != self.identity:
            raise ClipLoadError(f"embedding bank made with {self.identity}, but the model expects {identity}")

    # --- construction ---------------------------------------------------------------------------

    @classmethod
    def from_text_encoder(cls, encoder: TextEncoder, names: Sequence[str]) -> EmbeddingBank:
        """Encode phrases; entries like "car|automobile" contribute each synonym as its own phrase.
        Spellings the bank matches as one phrase (`phrase_key`: "traffic_cone" and "traffic cone")
        keep the first one's vector (the nuScenes vocabularies list both)."""
        vocab = Vocabulary.from_strings(names)
        first = {phrase_key(s): s for e in reversed(vocab.entries) for s in reversed(e.synonyms)}
        phrases = list(dict.fromkeys(first[phrase_key(s)] for e in vocab.entries for s in e.synonyms))
        return cls(phrases, encoder.encode_phrases(phrases), encoder.identity)

    @classmethod
    def from_detic_npy(
        cls,
        npy_path: str | Path,
        names: Sequence[str],
        identity: ClipIdentity = DETIC_IDENTITY,
        aliases: dict[str, int] | None = None,
    ) -> EmbeddingBank:
        """Detic-style `[K, D]` (float16, unnormalised) text embeddings with their `names` in order."""
        vectors = torch.from_numpy(np.load(npy_path).astype(np.float32))
        return cls(names, vectors, identity, aliases)

    @classmethod
    def from_detic(cls, data_dir: str | Path, dataset: str) -> EmbeddingBank:
        """Detic's released embeddings in `data_dir` for "lvis" | "coco" | "objects365"."""
        data_dir = Path(data_dir)
        if dataset not in DETIC_FILES:
            raise ValueError(f"unknown Detic vocabulary {dataset!r}; one of {sorted(DETIC_FILES)}")
        aliases: dict[str, int] = {}
        if dataset == "lvis":
            names, aliases = _lvis_names(data_dir / "lvis_v1_train_cat_info.json")
        elif dataset == "objects365":
            with open(data_dir / "Objects365_names_fix.csv", encoding="utf-8", newline="") as f:
                names = [row[1].strip() for row in csv.reader(f) if row]
        else:
            names = list(COCO_CLASSES)
        return cls.from_detic_npy(data_dir / DETIC_FILES[dataset], names, DETIC_IDENTITY, aliases)

    # --- files ----------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": BANK_FORMAT,
            "format_version": BANK_FORMAT_VERSION,
            "names": list(self.names),
            "vectors": self.vectors.clone(),
            "identity": self.identity.as_dict(),
            "aliases": dict(self.aliases),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EmbeddingBank:
        if data.get("format") != BANK_FORMAT:
            raise VocabularyError(f"not a {BANK_FORMAT} (format {data.get('format')!r})")
        if int(data.get("format_version", 0)) > BANK_FORMAT_VERSION:
            raise VocabularyError(f"text bank format {data['format_version']} is newer than this code")
        return cls(data["names"], data["vectors"], ClipIdentity.from_dict(data["identity"]),
                   data.get("aliases"))

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(self.to_dict(), path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> EmbeddingBank:
        path = Path(path)
        if not path.is_file():
            raise VocabularyError(f"embedding bank file not found: {path}")
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise VocabularyError(f"cannot read embedding bank {path}: {exc}") from exc
        if not isinstance(data, dict):
            raise VocabularyError(f"{path} is not a text bank")
        return cls.from_dict(data)


def _lvis_names(cat_info: Path) -> tuple[list[str], dict[str, int]]:
    """LVIS names sorted by id, and aliases: the synonyms and the names without their
    disambiguating "(...)" ("car_(automobile)" -> "car"), dropped where ambiguous."""
    with open(cat_info, encoding="utf-8") as f:
        cats = sorted(json.load(f), key=lambda c: c["id"])
    names = [c["name"] for c in cats]
    claims: dict[str, set[int]] = {}
    for row, cat in enumerate(cats):
        for phrase in [cat["name"], *cat.get("synonyms", [])]:
            for form in {phrase, re.sub(r"_?\(.*\)$", "", phrase)}:
                if form:
                    claims.setdefault(phrase_key(form), set()).add(row)
    aliases = {key: next(iter(rows)) for key, rows in claims.items() if len(rows) == 1}
    log.debug("LVIS bank: %d names, %d unambiguous aliases", len(names), len(aliases))
    return names, aliases
