"""Class text vectors of the synthetic world with real CLIP's similarity structure.

The student's text bank and the simulated teacher classify against the same [C, D] class
vectors. A random tiny text tower makes them semantically arbitrary (nearly collinear, truck
nearest to tree), so which classes a teacher confuses would mean nothing. Here they come from the
real OpenAI CLIP ViT-B/32 text embeddings Detic released (prompt "a {name}", see
`../shared/data/clip_text_embeddings`, `EmbeddingBank.from_detic`):

- classes with a real name use its vector (pedestrian = "person"; riders, which SemanticKITTI
  labels together with their vehicle, are the normalised mean of "person" and the vehicle);
- surface classes have no vector there (no "road", "sidewalk", "grass", "tree", "building",
  "fence", "barrier"): each is placed by one rule, ``v = a * m + sqrt(1 - a^2) * u``, where m is
  the normalised mean of a few related real names (`SURFACE_RELATIVES`), u a unit direction
  orthogonal to every real vector and to the other surfaces' u, and a is chosen so that the
  surface's nearest-class cosine (to the real classes and the surfaces placed before it) equals
  the median nearest-neighbour cosine of the real classes.
  So a surface sits as close to its neighbours as real classes sit to theirs, leaning toward the
  objects it is seen with, and never coincides with one.

The vectors are stored in an orthonormal basis of their span (padded to ``dim`` with further
orthonormal directions), so the world stays small (D = 32 instead of 512) and every cosine is
exactly the 512-d one. Where the shared embeddings are absent, `load_text_geometry` returns None
with a logged reason and callers fall back to the text tower.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from clip3d_core.clip.bank import DETIC_IDENTITY, EmbeddingBank, phrase_key
from clip3d_core.clip.loader import ClipIdentity
from clip3d_core.data.synthetic.world import CLASS_NAMES

log = logging.getLogger(__name__)

EMBEDDINGS_DIR = "clip_text_embeddings"
# Detic vocabularies searched, in order, for a name (the three share model and prompt).
VOCABULARIES = ("lvis", "objects365", "coco")
# Class -> the real names whose normalised mean is its vector.
REAL_NAMES: dict[str, tuple[str, ...]] = {
    "car": ("car",),
    "truck": ("truck",),
    "bus": ("bus",),
    "pedestrian": ("person",),
    "bicyclist": ("person", "bicycle"),
    "motorcyclist": ("person", "motorcycle"),
    "pole": ("pole",),
    "traffic sign": ("traffic sign",),
    "traffic light": ("traffic light",),
    "traffic cone": ("traffic cone",),
}
# Surface class -> real names of things it is seen with (its vector leans toward their mean).
SURFACE_RELATIVES: dict[str, tuple[str, ...]] = {
    "road": ("car", "truck", "bus", "manhole"),
    "sidewalk": ("person", "bench", "fire hydrant", "parking meter"),
    "grass": ("potted plant", "flower"),
    "building": ("awning", "signboard", "billboard"),
    "tree": ("potted plant", "flower", "log"),
    "fence": ("sawhorse", "bench", "ladder"),
    "barrier": ("traffic cone", "sawhorse"),
}


@dataclasses.dataclass(frozen=True)
class TextGeometry:
    """Unit class vectors [C, D] in span-basis coordinates, and how each was made."""

    names: tuple[str, ...]
    vectors: np.ndarray  # [C, D] float64, unit rows
    rules: dict[str, str]
    identity: ClipIdentity

    def cosines(self) -> np.ndarray:
        return self.vectors @ self.vectors.T

    def stats(self) -> dict[str, object]:
        """Mean pairwise cosine and each class's nearest neighbour (what the issue compares)."""
        cos = self.cosines()
        c = len(self.names)
        off = cos[~np.eye(c, dtype=bool)]
        np.fill_diagonal(cos, -np.inf)
        nn = cos.argmax(1)
        return {
            "mean_pairwise_cosine": float(off.mean()),
            "nearest": {n: (self.names[j], round(float(cos[i, j]), 3))
                        for i, (n, j) in enumerate(zip(self.names, nn))},
        }

    def bank(self) -> EmbeddingBank:
        """The student's text bank: one phrase per class, no text tower needed."""
        return EmbeddingBank(list(self.names), torch.from_numpy(self.vectors).float(), self.identity)


def _real_vectors(data_dir: Path) -> dict[str, np.ndarray]:
    """Name -> unit 512-d vector of every name in the Detic vocabularies (first vocabulary wins)."""
    out: dict[str, np.ndarray] = {}
    for vocab in VOCABULARIES:
        bank = EmbeddingBank.from_detic(data_dir, vocab)
        vectors = bank.vectors.double().numpy()
        for name, row in [*((n, i) for i, n in enumerate(bank.names)), *bank.aliases.items()]:
            out.setdefault(phrase_key(name), vectors[row])
    return out


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def build_text_geometry(
    real: dict[str, np.ndarray],
    class_names: Sequence[str] = CLASS_NAMES,
    *,
    dim: int = 32,
    seed: int = 0,
) -> TextGeometry:
    """Class vectors from real name -> vector ``real`` (see the module docstring for the rules)."""
    missing = sorted({n for names in [*REAL_NAMES.values(), *SURFACE_RELATIVES.values()] for n in names}
                     - set(real))
    if missing:
        raise KeyError(f"names missing from the CLIP text embeddings: {missing}")
    unknown = [n for n in class_names if n not in REAL_NAMES and n not in SURFACE_RELATIVES]
    if unknown:
        raise KeyError(f"no text-geometry rule for classes {unknown}")
    objects = {c: _unit(np.mean([real[n] for n in REAL_NAMES[c]], 0)) for c in class_names if c in REAL_NAMES}
    obj = np.stack(list(objects.values()))
    cos = obj @ obj.T
    np.fill_diagonal(cos, -np.inf)
    target = float(np.median(cos.max(1)))  # real classes' typical nearest-neighbour cosine
    # Directions orthogonal to every real vector involved (and to each other): QR of the real
    # vectors followed by random directions; the trailing columns are orthogonal to the leading.
    used = np.stack([real[n] for names in [*REAL_NAMES.values(), *SURFACE_RELATIVES.values()] for n in names])
    surfaces = [c for c in class_names if c in SURFACE_RELATIVES]
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(np.concatenate([used.T, rng.standard_normal((used.shape[1], len(surfaces)))], 1))
    offsets = q[:, used.shape[0]:].T  # [S, 512], orthonormal, orthogonal to span(used)
    vectors, rules = {}, {}
    for c, names in REAL_NAMES.items():
        if c in objects:
            vectors[c] = objects[c]
            rules[c] = "CLIP '" + "' + '".join(names) + "'" + (" (normalised mean)" if len(names) > 1 else "")
    placed = list(obj)
    for s, u in zip(surfaces, offsets):
        # Placed one after another, so two surfaces with similar relatives (grass, tree) are held
        # apart too: the offsets are mutually orthogonal, so cos(v, placed) = a * cos(m, placed).
        m = _unit(np.mean([real[n] for n in SURFACE_RELATIVES[s]], 0))
        a = min(1.0, target / float((np.stack(placed) @ m).max()))
        vectors[s] = a * m + np.sqrt(1.0 - a * a) * u
        placed.append(vectors[s])
        rules[s] = (f"placed: {a:.3f} x mean('" + "', '".join(SURFACE_RELATIVES[s])
                    + f"') + orthogonal offset (nearest-class cosine {target:.3f})")
    full = np.stack([_unit(vectors[c]) for c in class_names])  # [C, 512]
    basis, _ = np.linalg.qr(np.concatenate([full.T, rng.standard_normal((full.shape[1], dim))], 1))
    if dim < len(class_names):
        raise ValueError(f"dim {dim} < {len(class_names)} classes: cosines would not be exact")
    coords = _unit(full @ basis[:, :dim])
    digest = hashlib.sha256(coords.astype(np.float32).tobytes()).hexdigest()[:16]
    identity = ClipIdentity(DETIC_IDENTITY.model_name, f"bank:detic-span-{digest}", dim)
    return TextGeometry(tuple(class_names), coords, rules, identity)


def load_text_geometry(data_dir: str | Path | None, class_names: Sequence[str] = CLASS_NAMES, *,
                       dim: int = 32, seed: int = 0) -> TextGeometry | None:
    """`build_text_geometry` from ``<data_dir>/clip_text_embeddings``; None (reason logged) when
    the embeddings are not there."""
    if data_dir is None:
        log.warning("text geometry: no shared data folder ($CLIP3D_SHARED_DATA / ../shared/data): "
                    "falling back to the text tower")
        return None
    folder = Path(data_dir) / EMBEDDINGS_DIR
    try:
        real = _real_vectors(folder)
    except (OSError, ValueError) as exc:
        log.warning("text geometry: real CLIP text embeddings unreadable in %s (%s): falling back to the "
                    "text tower", folder, exc)
        return None
    return build_text_geometry(real, class_names, dim=dim, seed=seed)
