"""Prompt-ensemble text embeddings of a vocabulary, cached on disk per model identity and templates."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from clip3d_core.clip.loader import ClipIdentity, LoadedClip
from clip3d_core.clip.vocabulary import Vocabulary, VocabularyEntry

log = logging.getLogger(__name__)

# Street-scene phrasings (after CLIP's ImageNet ensemble): the classes seen from a car, at any range,
# partly hidden. Every template holds exactly one "{}".
DEFAULT_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "a photo of the {}.",
    "a {} in the street.",
    "a photo of a {} on the road.",
    "a {} in a driving scene.",
    "a photo of a {} taken from a car.",
    "a dashcam photo of a {}.",
    "a blurry photo of a {}.",
    "a photo of a small {}.",
    "a photo of a large {}.",
    "a cropped photo of a {}.",
    "a photo of a {} in the city.",
    "there is a {} in the scene.",
)
CACHE_FORMAT = 1
_TEXT_BATCH = 256


def name_classes(entries: Sequence[VocabularyEntry]) -> torch.Tensor:
    """[T] long: the entry of each name, names in entry order then synonym order."""
    counts = torch.tensor([len(e.synonyms) for e in entries], dtype=torch.long)
    return torch.repeat_interleave(torch.arange(len(entries)), counts)


@dataclass(frozen=True)
class NameEmbeddings:
    """One text row per name of a vocabulary: ``text`` [T, D] unit phrase vectors (every synonym of
    every entry), ``name_class`` [T] long the entry each row names. The panoptic head scores a class
    by the maximum over its names (`OpenVocabClassifier`); `class_vectors` is the one-row-per-class
    form the semantic model uses."""

    text: torch.Tensor
    name_class: torch.Tensor
    num_classes: int

    def class_vectors(self) -> torch.Tensor:
        """[C, D]: per entry, the renormalised mean of its names' rows (synonyms averaged)."""
        text = self.text
        summed = torch.zeros(self.num_classes, text.shape[1], dtype=text.dtype, device=text.device)
        return F.normalize(summed.index_add_(0, self.name_class.to(text.device), text), dim=-1)

    def to(self, device: str | torch.device) -> NameEmbeddings:
        return NameEmbeddings(self.text.to(device), self.name_class.to(device), self.num_classes)


def name_embeddings(
    entries: Sequence[VocabularyEntry], phrase_vectors: Callable[[Sequence[str]], torch.Tensor]
) -> NameEmbeddings:
    """Every name's unit phrase vector (from a text tower's `TextEncoder.encode_phrases` or a stored
    bank's `EmbeddingBank.phrase_vectors`) and the entry it names."""
    vectors = phrase_vectors([s for e in entries for s in e.synonyms])
    return NameEmbeddings(vectors, name_classes(entries), len(entries))


def combine_synonyms(
    entries: Sequence[VocabularyEntry], phrase_vectors: Callable[[Sequence[str]], torch.Tensor]
) -> torch.Tensor:
    """[C, D]: per entry, the renormalised mean of its synonyms' unit phrase vectors."""
    return name_embeddings(entries, phrase_vectors).class_vectors()


def check_templates(templates: Sequence[str]) -> tuple[str, ...]:
    templates = tuple(templates)
    if not templates:
        raise ValueError("at least one prompt template is needed")
    bad = [t for t in templates if not isinstance(t, str) or t.count("{}") != 1]
    if bad:
        raise ValueError(f"prompt templates must contain exactly one '{{}}': {bad}")
    return templates


class TextEncoder:
    """Vocabulary -> [C, D] unit vectors. A phrase's vector is the renormalised mean of its
    normalised CLIP text embeddings over the templates; a class's vector is the renormalised mean of
    its synonyms' phrase vectors (so an `EmbeddingBank` of phrases reproduces it exactly).

    With `cache_dir`, phrase vectors persist in one file per (model identity, precision, templates),
    so editing a live vocabulary only encodes the new phrases. Thread-safe: the node re-encodes off
    its processing thread.
    """

    def __init__(
        self,
        loaded: LoadedClip,
        templates: Sequence[str] = DEFAULT_TEMPLATES,
        cache_dir: str | Path | None = None,
    ) -> None:
        self.loaded = loaded
        self.templates = check_templates(templates)
        self.cache_path = None if cache_dir is None else Path(cache_dir) / f"text_{self.cache_key()}.pt"
        self._memory: dict[str, torch.Tensor] = {}
        self._lock = threading.Lock()
        if self.cache_path is not None and self.cache_path.is_file():
            self._memory.update(self._read_cache(self.cache_path))

    @property
    def identity(self) -> ClipIdentity:
        return self.loaded.identity

    def cache_key(self) -> str:
        spec = {
            "format": CACHE_FORMAT,
            "identity": self.loaded.identity.as_dict(),
            "precision": self.loaded.config.precision,
            "templates": list(self.templates),
        }
        return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:20]

    def encode(self, vocab: Vocabulary) -> torch.Tensor:
        """float32 [C, D] on CPU, unit rows, in vocabulary order."""
        return combine_synonyms(vocab.entries, self.encode_phrases)

    def encode_names(self, vocab: Vocabulary) -> NameEmbeddings:
        """One row per name (synonym) of every entry, for max-over-names scoring."""
        return name_embeddings(vocab.entries, self.encode_phrases)

    def encode_phrases(self, phrases: Sequence[str]) -> torch.Tensor:
        """float32 [len(phrases), D] on CPU: one template-ensemble unit vector per phrase."""
        with self._lock:
            missing = [p for p in dict.fromkeys(phrases) if p not in self._memory]
            if missing:
                self._memory.update(zip(missing, self._embed(missing)))
                if self.cache_path is not None:
                    try:
                        self._write_cache()
                    except OSError as exc:  # the cache only saves time; encoding still succeeded
                        log.warning("cannot write text cache %s: %s", self.cache_path, exc)
            return torch.stack([self._memory[p] for p in phrases])

    @torch.no_grad()
    def _embed(self, phrases: Sequence[str]) -> torch.Tensor:
        """Run the text tower over phrases x templates."""
        prompts = [t.format(p) for p in phrases for t in self.templates]
        log.info("encoding %d prompts for %d phrases", len(prompts), len(phrases))
        model, device = self.loaded.model, self.loaded.device
        chunks = []
        for start in range(0, len(prompts), _TEXT_BATCH):
            tokens = self.loaded.tokenizer(prompts[start : start + _TEXT_BATCH]).to(device)
            chunks.append(model.encode_text(tokens, normalize=True).float().cpu())
        per_prompt = torch.cat(chunks).view(len(phrases), len(self.templates), -1)
        return F.normalize(per_prompt.mean(1), dim=-1)

    def _read_cache(self, path: Path) -> dict[str, torch.Tensor]:
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
            if data.get("key") != self.cache_key():
                raise ValueError("cache key mismatch")
            return dict(zip(data["phrases"], data["vectors"].float()))
        except Exception as exc:  # a corrupt cache only costs a re-encode
            log.warning("ignoring unreadable text cache %s: %s", path, exc)
            return {}

    def _write_cache(self) -> None:
        path = self.cache_path
        assert path is not None
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.is_file():  # keep phrases another process added meanwhile
            for phrase, vector in self._read_cache(path).items():
                self._memory.setdefault(phrase, vector)
        phrases = list(self._memory)
        payload = {"key": self.cache_key(), "identity": self.loaded.identity.as_dict(),
                   "templates": list(self.templates), "phrases": phrases,
                   "vectors": torch.stack([self._memory[p] for p in phrases])}
        # Atomic replace: several processes may share a cache directory.
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        os.close(fd)
        try:
            torch.save(payload, tmp)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
