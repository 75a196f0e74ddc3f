"""The one inference API: a point cloud (+ optional camera images) -> a label and score per point.

Used by the ROS node, `clip3d segment`, `clip3d bench` and offline bag labelling::

    seg = Segmenter.from_checkpoint("model.pt", vocabulary=["car", "road", "person|pedestrian"])
    result = seg.segment(points)             # points: float [N, >=3] (x, y, z, intensity, ...)
    result.labels, result.scores             # uint16 [N] (65535 = unlabelled), float32 [N]
    result.instances                         # uint32 [N] for panoptic checkpoints (0 = none/stuff)

Guarantees: exactly one output per input point, in input order; non-finite or out-of-range points
are unlabelled (65535) with score 0 and ``valid`` False. ``scores`` are the softmax probability of
the chosen class over the current vocabulary at the model's temperature (so they depend on the
vocabulary: a one-class vocabulary always scores 1).

Panoptic checkpoints (`PanopticNet`) run through `predictor.predict_panoptic` instead: ``instances``
holds an instance id per point (0 = none / stuff; ids 1..K per frame, not tracked across frames),
``scores`` the sigmoid class score of the point's segment, and a vocabulary entry is a thing class
when one of its names is among the checkpoint's thing names (`PanopticInfo.things`). Their text is
one row per name (`text_embeddings` [T, D], from the checkpoint's per-phrase bank or the text tower)
and an entry scores the maximum over its names ("person|pedestrian": the better-matching one).

The text side is swappable while frames are processed: `encode_vocabulary` (slow, any thread, no
state change) then `swap_vocabulary` (instant, under a lock); each `segment` call reads one
consistent (vocabulary, text embeddings) pair at its start.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from clip3d_core.checkpoint import CheckpointError, load_checkpoint
from clip3d_core.clip import (
    ClipConfig,
    ClipIdentity,
    EmbeddingBank,
    TextEncoder,
    Vocabulary,
    VocabularyError,
    load_clip,
)
from clip3d_core.clip.dense import DenseClipEncoder
from clip3d_core.clip.text import name_classes
from clip3d_core.geometry import PinholeCamera
from clip3d_core.labels import UNLABELLED
from clip3d_core.model import Clip3DNet, ModelConfig
from clip3d_core.model.panoptic import PanopticInfo, PanopticNet
from clip3d_core.predictor import CameraFeatures, predict, predict_panoptic
from clip3d_core.runtime import Runtime, RuntimeOptions
from clip3d_core.teacher import CameraView, ClipTeacher, TeacherOutput, attach_points

log = logging.getLogger(__name__)

CHECKPOINT_BANK = "checkpoint"  # embedding_bank value: the text bank stored in the checkpoint itself
VocabularyLike = Vocabulary | Sequence[str]


class SegmenterInputError(ValueError):
    """Points, images or cameras handed to `Segmenter.segment` are malformed or inconsistent."""


@dataclass
class SegmentationResult:
    """Per input point (input order): ``labels`` uint16 index into ``vocabulary`` (65535 =
    unlabelled), ``scores`` float32 softmax probability of that label (0 where invalid), ``valid``
    (finite and inside the model's range). ``timings_ms``: voxelise, backbone, [image], classify,
    total (panoptic: voxelise, [image], backbone, decoder, merge, classify, total). ``features``
    [N, D] float32 only when asked for (``return_features=True``). ``instances`` uint32 [N] for
    panoptic models only (0 = none / stuff; None otherwise)."""

    labels: np.ndarray
    scores: np.ndarray
    vocabulary: Vocabulary
    valid: np.ndarray
    timings_ms: dict[str, float] = field(default_factory=dict)
    features: np.ndarray | None = None
    instances: np.ndarray | None = None

    def class_counts(self) -> dict[str, int]:
        """Points per class name (classes without points omitted), plus "unlabelled"."""
        counts = np.bincount(
            self.labels[self.labels != UNLABELLED].astype(np.int64), minlength=len(self.vocabulary)
        )
        out = {n: int(c) for n, c in zip(self.vocabulary.names, counts) if c}
        out["unlabelled"] = int((self.labels == UNLABELLED).sum())
        return out


class _ImageFeatures:
    """Fusion input of one `segment` call: the image tower starts on its own stream once the points
    are voxelised (overlapping the 3D network), then its features are sampled at each valid point's
    first visible camera (`attach_points`, the training teacher's code path)."""

    def __init__(self, teacher: ClipTeacher, runtime: Runtime, view: CameraView, text: torch.Tensor,
                 xyz: torch.Tensor) -> None:
        self.teacher, self.runtime, self.view, self.text, self.xyz = teacher, runtime, view, text, xyz
        self.encoded: TeacherOutput | None = None

    def start(self) -> None:
        with self.runtime.image_stream():
            self.encoded = self.teacher(self.view, self.text)

    def features(self, valid: torch.Tensor) -> CameraFeatures:
        assert self.encoded is not None
        self.runtime.join_image_stream(*self.encoded.features)
        pt = attach_points(self.encoded, self.xyz, self.view.cameras, select=valid)
        return CameraFeatures(pt.features, pt.visible)


def thing_mask(vocabulary: Vocabulary, things: Sequence[str]) -> np.ndarray:
    """[C] bool: entries with a name among ``things`` (case-insensitive) get instance ids."""
    known = {t.casefold() for t in things}
    return np.array([any(s.casefold() in known for s in e.synonyms) for e in vocabulary.entries])


@dataclass(frozen=True)
class _VocabState:
    """The installed vocabulary, its unit text rows on the device and, for panoptic models, its
    [C] bool thing classes and [T] long class of each text row (`name_classes`), all on the device."""

    vocabulary: Vocabulary
    text: torch.Tensor
    thing: torch.Tensor | None = None
    name_class: torch.Tensor | None = None


class Segmenter:
    """A trained `Clip3DNet` (or `PanopticNet` with its ``panoptic`` info) plus the text embeddings
    of the current vocabulary.

    Build with `from_checkpoint`. ``text_source`` (a `TextEncoder` or an `EmbeddingBank`) is needed
    only to encode new vocabularies; ``dense`` (a `DenseClipEncoder`) only for fusion models fed
    images. ``score_threshold``: labels scoring below it become unlabelled (score kept).
    ``runtime`` (`RuntimeOptions`): precision, sparse backend, TF32, compile, streams, buffers.
    """

    def __init__(
        self,
        model: Clip3DNet | PanopticNet,
        identity: ClipIdentity,
        *,
        panoptic: PanopticInfo | None = None,
        text_source: TextEncoder | EmbeddingBank | None = None,
        dense: DenseClipEncoder | None = None,
        vocabulary: VocabularyLike | None = None,
        device: str | torch.device = "cpu",
        score_threshold: float | None = None,
        image_short_side: int | None = None,
        runtime: RuntimeOptions | None = None,
    ) -> None:
        if isinstance(model, PanopticNet) != (panoptic is not None):
            raise ValueError("a PanopticNet is served with its PanopticInfo, a Clip3DNet without")
        self.panoptic = panoptic
        self.model_cfg: ModelConfig = model.cfg.model if isinstance(model, PanopticNet) else model.cfg
        if identity.embed_dim != self.model_cfg.embed_dim:
            raise ValueError(f"model embed_dim {self.model_cfg.embed_dim} != CLIP {identity} embed_dim")
        self.device = torch.device(device)
        self.runtime = Runtime(runtime or RuntimeOptions(), self.device)
        self.model = self.runtime.prepare_model(model)
        self.identity = identity
        self.text_source = text_source
        self.dense = None if dense is None else self.runtime.prepare_dense(dense)
        # CLIP features at points come from the training teacher's code path (`attach_points`).
        self.teacher = None if self.dense is None else ClipTeacher(
            self.dense, short_side=image_short_side, upload=self.runtime.buffers.upload)
        self.score_threshold = score_threshold
        self._lock = threading.Lock()
        # On CUDA frames share the runtime's staging buffers and streams: one frame at a time.
        self._frame_lock = threading.Lock() if self.runtime.cuda else contextlib.nullcontext()
        self._versions = itertools.count(1)
        self._state: _VocabState | None = None
        self._warned_columns = False
        if vocabulary is not None:
            self.set_vocabulary(vocabulary)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_checkpoint(
        cls,
        path: str | Path,
        device: str | torch.device = "cpu",
        clip: ClipConfig | None = None,
        embedding_bank: str | Path | EmbeddingBank | None = None,
        *,
        vocabulary: VocabularyLike | None = None,
        score_threshold: float | None = None,
        text_cache_dir: str | Path | None = None,
        image_short_side: int | None = None,
        runtime: RuntimeOptions | None = None,
    ) -> Segmenter:
        """Load a checkpoint and what its text/image side needs.

        ``clip`` overrides the checkpoint's CLIP config (e.g. a local weights file on the vehicle);
        its identity must match the checkpoint's (`CheckpointError` otherwise). With
        ``embedding_bank`` the text tower is not used: vocabulary names are looked up in the bank
        (same identity required); ``embedding_bank="checkpoint"`` (`CHECKPOINT_BANK`) takes the bank
        the checkpoint stores (its training vocabulary's phrases), so a non-fusion model runs with
        no CLIP weights at all. CLIP is loaded only where needed (text tower without a bank, image
        tower for fusion models). ``vocabulary`` defaults to the checkpoint's, if it stored one.
        """
        ckpt = load_checkpoint(path)
        model = ckpt.build_model(device)
        fusion = ckpt.model_config.fusion if ckpt.panoptic is None else ckpt.panoptic.head.reads_camera
        bank = None
        if embedding_bank == CHECKPOINT_BANK:
            if ckpt.text_bank is None:
                raise CheckpointError(f"{path} stores no text embedding bank: give a bank file or use CLIP")
            bank = ckpt.text_bank
        elif embedding_bank is not None:
            bank = (
                embedding_bank
                if isinstance(embedding_bank, EmbeddingBank)
                else EmbeddingBank.load(embedding_bank)
            )
            ckpt.check_identity(bank.identity, f"the embedding bank {embedding_bank}")
        loaded = None
        if bank is None or fusion:
            loaded = load_clip(clip or ckpt.clip_config, device)
            ckpt.check_identity(loaded.identity, "the CLIP loaded")
        elif clip is not None:
            log.warning("CLIP config %s not used: text comes from the embedding bank and the model has "
                        "no fusion", clip.model_name)
        text_source = bank if bank is not None else TextEncoder(loaded, cache_dir=text_cache_dir)
        # A fusion model reads CLIP features made the way its training teacher made them.
        dense = DenseClipEncoder(loaded, ckpt.dense.last_block) if fusion else None
        if image_short_side is None:
            image_short_side = ckpt.dense.short_side
        if vocabulary is None and ckpt.vocabulary is not None:
            vocabulary = ckpt.vocabulary
        log.info(
            "segmenter from %s: CLIP %s, text from %s, fusion %s, panoptic %s",
            path,
            ckpt.identity,
            "embedding bank" if bank is not None else "text tower",
            fusion,
            ckpt.panoptic is not None,
        )
        return cls(
            model,
            ckpt.identity,
            panoptic=ckpt.panoptic,
            text_source=text_source,
            dense=dense,
            vocabulary=vocabulary,
            device=device,
            score_threshold=score_threshold,
            image_short_side=image_short_side,
            runtime=runtime,
        )

    # ------------------------------------------------------------------ vocabulary
    @property
    def vocabulary(self) -> Vocabulary | None:
        state = self._state
        return None if state is None else state.vocabulary

    @property
    def text_embeddings(self) -> torch.Tensor | None:
        """[C, D] one row per vocabulary entry (synonyms averaged); panoptic models: [T, D] one row
        per name, entries' synonyms in order (a class scores the maximum over its names)."""
        state = self._state
        return None if state is None else state.text

    def _embed_text(self, vocab: Vocabulary) -> torch.Tensor:
        source = self.text_source
        if source is None:
            raise VocabularyError("this segmenter has no text encoder or embedding bank; use swap_vocabulary")
        bank = isinstance(source, EmbeddingBank)
        if self.panoptic is not None:  # the bank stores one vector per phrase: names serve as well
            return (source.lookup_names(vocab) if bank else source.encode_names(vocab)).text
        return source.lookup(vocab) if bank else source.encode(vocab)

    def check_vocabulary(self, names: VocabularyLike) -> None:
        """Raise `VocabularyError` unless `encode_vocabulary(names)` would succeed, without running
        the text tower: valid entries and, with an embedding bank, every phrase in the bank (so a
        live change can be rejected up front instead of failing later on another thread)."""
        vocab = names if isinstance(names, Vocabulary) else Vocabulary.from_strings(names)
        if self.text_source is None or isinstance(self.text_source, EmbeddingBank):
            self._embed_text(vocab)  # a table lookup

    def encode_vocabulary(self, names: VocabularyLike) -> tuple[Vocabulary, torch.Tensor]:
        """Build and embed a new vocabulary (with the next version number) without installing it.
        Thread-safe; may take a while with the text tower, so call it off the processing thread."""
        version = next(self._versions)
        vocab = (  # a Vocabulary is already parsed (the node validates a live change once)
            Vocabulary(names.entries, version=version)
            if isinstance(names, Vocabulary)
            else Vocabulary.from_strings(names, version=version)
        )
        return vocab, self._embed_text(vocab)

    def swap_vocabulary(self, vocabulary: Vocabulary, text: torch.Tensor | np.ndarray) -> bool:
        """Install ``(vocabulary, text [C, D])`` atomically. An encoding older than the installed one
        (lower version, e.g. two re-encodes finishing out of order) is dropped: returns False."""
        text = self._check_text(vocabulary, text)
        with self._lock:
            current = self._state
            if current is not None and vocabulary.version < current.vocabulary.version:
                log.warning(
                    "dropping stale vocabulary v%d (v%d installed)", vocabulary.version,
                    current.vocabulary.version,
                )
                return False
            self._state = self._vocab_state(vocabulary, text)
        log.info("vocabulary v%d: %d classes", vocabulary.version, len(vocabulary))
        return True

    def set_vocabulary(self, names: VocabularyLike) -> Vocabulary:
        """Encode and install a vocabulary; only the text side changes (the 3D network is untouched)."""
        vocab, text = self.encode_vocabulary(names)
        self.swap_vocabulary(vocab, text)
        return vocab

    def _vocab_state(self, vocabulary: Vocabulary, text: torch.Tensor) -> _VocabState:
        """Everything a frame derives from the vocabulary, made once per vocabulary (not per frame)."""
        if self.panoptic is None:
            return _VocabState(vocabulary, text)
        thing = torch.from_numpy(thing_mask(vocabulary, self.panoptic.things)).to(self.device)
        return _VocabState(vocabulary, text, thing, name_classes(vocabulary.entries).to(self.device))

    def _check_text(self, vocabulary: Vocabulary, text: torch.Tensor | np.ndarray) -> torch.Tensor:
        d = self.model_cfg.embed_dim
        rows = len(vocabulary) if self.panoptic is None else sum(len(e.synonyms) for e in vocabulary.entries)
        text = torch.as_tensor(text)
        if text.ndim != 2 or text.shape != (rows, d):
            raise VocabularyError(
                f"text embeddings must be [{rows}, {d}], got {tuple(text.shape)}"
            )
        if not bool(torch.isfinite(text).all()):
            raise VocabularyError("text embeddings contain NaN/inf")
        return F.normalize(text.detach().float(), dim=-1).to(self.device)

    # ------------------------------------------------------------------ inputs
    def _points(self, points: np.ndarray) -> np.ndarray:
        arr = np.asarray(points)
        if arr.ndim != 2 or arr.shape[1] < 3:
            raise SegmenterInputError(f"points must be [N, >=3] (x, y, z, ...), got shape {arr.shape}")
        if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
            raise SegmenterInputError(f"points must be numeric, got dtype {arr.dtype}")
        c = self.model_cfg.backbone.in_channels
        arr = arr[:, :c].astype(np.float32, copy=False)
        if arr.shape[1] < c:  # e.g. xyz-only clouds for a model trained with intensity
            if not self._warned_columns:
                log.warning("points have %d columns, the model takes %d: padding with zeros", arr.shape[1], c)
                self._warned_columns = True
            arr = np.pad(arr, ((0, 0), (0, c - arr.shape[1])))
        return np.ascontiguousarray(arr)

    @staticmethod
    def _check_images(images: Sequence[np.ndarray] | None, cameras: Sequence[PinholeCamera] | None) -> None:
        if images is None and cameras is None:
            return
        if images is None or cameras is None or len(images) != len(cameras):
            raise SegmenterInputError(
                f"images and cameras must be given together, one camera per image "
                f"(got {None if images is None else len(images)} images, "
                f"{None if cameras is None else len(cameras)} cameras)"
            )
        for i, (img, cam) in enumerate(zip(images, cameras)):
            if not isinstance(img, np.ndarray) or img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
                desc = f"{img.dtype} {img.shape}" if isinstance(img, np.ndarray) else type(img).__name__
                raise SegmenterInputError(f"image {i}: expected uint8 HxWx3 RGB, got {desc}")
            cam.validate()  # CalibrationError (a ValueError) naming the problem
            if img.shape[:2] != (cam.height, cam.width):
                raise SegmenterInputError(
                    f"image {i} is {img.shape[1]}x{img.shape[0]} but camera {cam.name!r} is "
                    f"{cam.width}x{cam.height} (use PinholeCamera.scaled for resized images)"
                )

    # ------------------------------------------------------------------ inference

    def segment(
        self,
        points: np.ndarray,
        images: Sequence[np.ndarray] | None = None,
        cameras: Sequence[PinholeCamera] | None = None,
        vocabulary: VocabularyLike | None = None,
        *,
        score_threshold: float | None = None,
        return_features: bool = False,
    ) -> SegmentationResult:
        """Label every point. ``images``/``cameras`` (one camera per image, calibrated for that image
        size) are used by fusion models only; others ignore them. ``vocabulary`` labels this call
        with another vocabulary (encoded now, not installed); ``score_threshold`` overrides the
        segmenter's."""
        if vocabulary is not None:
            vocab = (
                vocabulary
                if isinstance(vocabulary, Vocabulary)
                else Vocabulary.from_strings(vocabulary)
            )
            state = self._vocab_state(vocab, self._check_text(vocab, self._embed_text(vocab)))
        else:
            state = self._state  # one consistent vocabulary state for the whole call
            if state is None:
                raise VocabularyError("no vocabulary set: call set_vocabulary() or pass vocabulary=")
        vocab, text, thing, name_class = state.vocabulary, state.text, state.thing, state.name_class
        pts = self._points(points)
        self._check_images(images, cameras)
        has_images = images is not None and len(images) > 0  # a list or one stacked [M, H, W, 3] array
        use_images = has_images and self.dense is not None
        if has_images and self.dense is None:
            log.debug("images ignored: the model has no fusion")
        threshold = self.score_threshold if score_threshold is None else score_threshold

        rt = self.runtime
        with self._frame_lock, torch.inference_mode():
            watch = rt.timer()
            x = rt.buffers.upload("points", pts)
            camera = None
            if use_images:
                assert self.teacher is not None and images is not None and cameras is not None
                camera = _ImageFeatures(self.teacher, rt, CameraView(images, cameras), text, x[:, :3])
            if self.panoptic is None:
                pred = predict(self.model, x, text, camera=camera, score_threshold=threshold, lap=watch.lap)
            else:
                assert thing is not None and name_class is not None
                pred = predict_panoptic(self.model, x, text, thing, min_points=self.panoptic.min_points,
                                        instance_gap=self.panoptic.instance_gap,
                                        name_class=name_class, camera=camera, score_threshold=threshold,
                                        features=return_features,
                                        lap=watch.lap)[0]
            outputs = {"valid": pred.valid, "label": pred.labels.to(torch.int32),
                       "score": pred.scores.float()}
            if "instances" in pred.extras:
                outputs["instance"] = pred.extras["instances"].to(torch.int32)
            host = rt.buffers.download(outputs)
            valid = host["valid"].copy()
            labels = np.where(host["label"] >= 0, host["label"], UNLABELLED).astype(np.uint16)
            scores = host["score"].copy()
            instances = host["instance"].astype(np.uint32) if "instance" in host else None
            features = pred.features.float().cpu().numpy() if return_features else None
            watch.lap("classify")
            timings = watch.total()
        return SegmentationResult(
            labels=labels,
            scores=scores,
            vocabulary=vocab,
            valid=valid,
            timings_ms=timings,
            features=features,
            instances=instances,
        )
