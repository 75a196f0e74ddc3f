"""The CLIP teacher: model loading, dense image features, prompt-ensemble text embeddings,
the vocabulary and precomputed embedding banks."""

from clip3d_core.clip.bank import EmbeddingBank
from clip3d_core.clip.dense import DenseClipEncoder, DenseFeatures, ImageInputError, PatchGrid
from clip3d_core.clip.loader import (
    TINY_MODEL,
    ClipConfig,
    ClipIdentity,
    ClipLoadError,
    LoadedClip,
    load_clip,
    tiny_clip_config,
)
from clip3d_core.clip.text import DEFAULT_TEMPLATES, NameEmbeddings, TextEncoder
from clip3d_core.clip.vocabulary import (
    Vocabulary,
    VocabularyEntry,
    VocabularyError,
)

__all__ = [
    "DEFAULT_TEMPLATES",
    "TINY_MODEL",
    "ClipConfig",
    "ClipIdentity",
    "ClipLoadError",
    "DenseClipEncoder",
    "DenseFeatures",
    "EmbeddingBank",
    "ImageInputError",
    "LoadedClip",
    "NameEmbeddings",
    "PatchGrid",
    "TextEncoder",
    "Vocabulary",
    "VocabularyEntry",
    "VocabularyError",
    "load_clip",
    "tiny_clip_config",
]
