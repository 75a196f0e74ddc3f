"""How inference runs on its device (not what it computes): precision, sparse backend, TF32,
torch.compile, the CLIP image encoder's own CUDA stream, reused pinned host buffers, stage timers.

`Segmenter(..., runtime=RuntimeOptions(precision="fp16", tf32=True))` is the one user. Every option
has a CPU meaning or is a no-op there (no streams, no pinned memory), so the same code path runs in
CPU tests and on the vehicle's GPU::

    RuntimeOptions()                                   # fp32, default backend, eager: as before
    RuntimeOptions(precision="fp16", compile=True)     # the fast GPU setting (measure with clip3d bench)

Precision is applied by casting the networks explicitly, not by autocast: spconv (and spconv-triton)
keep eval-mode sparse convolutions in fp32 under autocast. Voxelisation, the text embeddings and the
final cosine classifier stay in float32 (`Clip3DNet.dtype`).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from clip3d_core.model import Clip3DNet, sparse_backend
from clip3d_core.model.panoptic import PanopticNet

log = logging.getLogger(__name__)

PRECISIONS: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class RuntimeOptionError(ValueError):
    """A runtime option that cannot work on this device or install."""


@dataclass(frozen=True)
class RuntimeOptions:
    """``backend``: sparse-conv library (None: `sparse_backend.resolve`'s choice; a model built with
    another backend is rebuilt with its weights, checkpoints being interchangeable). ``precision``:
    fp32 | fp16 | bf16 for the 3D network and the CLIP image tower. ``tf32``: allow TF32 in float32
    matrix products and sparse convs (a process-wide torch setting; False leaves it as it is).
    ``compile``: torch.compile the dense parts (point MLP, projection head, fusion gate, ViT blocks)
    in place, so parameter names do not change. ``image_stream``: run the CLIP image encoder on its
    own CUDA stream, overlapping the 3D backbone. ``pinned``: stage host<->device copies in reused
    page-locked buffers. ``stage_sync``: synchronise the device at every stage boundary (exact
    per-stage wall times but no overlap); default: CUDA events, one synchronisation per frame."""

    backend: str | None = None
    precision: str = "fp32"
    tf32: bool = False
    compile: bool = False
    compile_backend: str = "inductor"
    image_stream: bool = True
    pinned: bool = True
    stage_sync: bool = False

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise RuntimeOptionError(f"precision {self.precision!r} not one of {tuple(PRECISIONS)}")
        if self.backend is not None and self.backend not in (*sparse_backend.BACKENDS, sparse_backend.AUTO):
            raise RuntimeOptionError(f"backend {self.backend!r} not one of {sparse_backend.BACKENDS}")

    @property
    def dtype(self) -> torch.dtype:
        return PRECISIONS[self.precision]


class StageTimer:
    """Stage times in ms, charged to the right device.

    CPU: host clock. CUDA with ``sync``: `torch.cuda.synchronize(device)` at each boundary (the
    segmenter's device, not the current one). CUDA without: a CUDA event per boundary on the
    device's current stream, read after one synchronisation in `total`; ``total`` is always host
    wall time from construction to a synchronised end (the latency a caller sees).
    """

    def __init__(self, device: torch.device, sync: bool = False) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        self.sync = sync
        self.times: dict[str, float] = {}
        self._stages: list[str] = []
        self._events: list[torch.cuda.Event] = []
        self._start = self._last = self._now()
        if self.cuda and not sync:
            self._events.append(self._record())

    def _record(self) -> torch.cuda.Event:
        event = torch.cuda.Event(enable_timing=True)
        event.record(torch.cuda.current_stream(self.device))
        return event

    def _now(self) -> float:
        if self.cuda and self.sync:
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def lap(self, stage: str) -> None:
        if self.cuda and not self.sync:
            self._events.append(self._record())
            self._stages.append(stage)
            return
        now = self._now()
        self.times[stage] = (now - self._last) * 1e3
        self._last = now

    def total(self) -> dict[str, float]:
        if self.cuda:
            torch.cuda.synchronize(self.device)
        end = time.perf_counter()
        for stage, (a, b) in zip(self._stages, zip(self._events, self._events[1:])):
            self.times[stage] = float(a.elapsed_time(b))
        self.times["total"] = (end - self._start) * 1e3
        return self.times


class HostBuffers:
    """Reused host staging buffers for host<->device copies, one per key (points, images, labels...).

    A buffer grows to the next power of two of the largest request and is then reused, so steady
    frames allocate no host memory. With ``pin`` (CUDA) the buffers are page-locked and copies run
    asynchronously; before a buffer is overwritten, the copy that last read it has finished (its
    event). On a CPU device nothing is staged: uploads are zero-copy views of the arrays.
    """

    def __init__(self, device: torch.device, pin: bool) -> None:
        self.device = device
        self.pin = pin and device.type == "cuda"
        self.allocations = 0  # host buffers allocated so far (tests: steady frames add none)
        self._buffers: dict[str, torch.Tensor] = {}
        self._events: dict[str, torch.cuda.Event] = {}

    def staging(self, key: str, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        """A [shape] view of ``key``'s buffer (contents undefined), grown if it is too small."""
        numel = int(np.prod(shape))
        nbytes = numel * torch.empty((), dtype=dtype).element_size()
        buf = self._buffers.get(key)
        if buf is None or buf.numel() < nbytes:
            size = 1 << max(nbytes - 1, 1).bit_length()
            buf = torch.empty(size, dtype=torch.uint8, pin_memory=self.pin)
            self._buffers[key] = buf
            self.allocations += 1
        event = self._events.pop(key, None)
        if event is not None:
            event.synchronize()  # the last async copy out of/into this buffer is done
        return buf[:nbytes].view(dtype).view(*shape)

    def _mark(self, key: str) -> None:
        if self.pin:
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(self.device))
            self._events[key] = event

    def upload(self, key: str, arrays: np.ndarray | Sequence[np.ndarray]) -> torch.Tensor:
        """One array, or same-shape arrays stacked on a new first axis, as a tensor on the device."""
        single = isinstance(arrays, np.ndarray)
        if self.device.type == "cpu":
            return torch.from_numpy(np.ascontiguousarray(arrays) if single else np.stack(arrays))
        first = arrays if single else arrays[0]
        dtype = torch.from_numpy(np.empty(0, first.dtype)).dtype
        view = self.staging(key, first.shape if single else (len(arrays), *first.shape), dtype)
        host = view.numpy()
        if single:
            host[...] = arrays  # one copy from the caller's memory into the staging buffer
        else:
            for i, a in enumerate(arrays):
                host[i] = a
        out = view.to(self.device, non_blocking=self.pin)
        self._mark(key)
        return out

    def download(self, tensors: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
        """Tensors -> host arrays with one synchronisation. The arrays are views of the staging
        buffers: valid until the next `download` of the same key (copy what you keep)."""
        if self.device.type == "cpu":
            return {k: t.detach().numpy() for k, t in tensors.items()}
        out = {}
        for key, t in tensors.items():
            view = self.staging(key, t.shape, t.dtype)
            view.copy_(t, non_blocking=self.pin)
            out[key] = view.numpy()
        torch.cuda.current_stream(self.device).synchronize()
        return out


class Runtime:
    """`RuntimeOptions` applied on one device: prepares the networks and serves buffers, the image
    stream and timers to the segmenter."""

    def __init__(self, options: RuntimeOptions, device: torch.device) -> None:
        self.options = options
        self.device = device
        self.cuda = device.type == "cuda"
        if options.precision == "bf16" and not self.cuda:
            # spconv's CPU build has no bf16 kernels (KeyError deep inside spconv); fp16 does run.
            raise RuntimeOptionError("bf16 needs a CUDA device: spconv's CPU build has no bf16 kernels")
        self.buffers = HostBuffers(device, options.pinned)
        self._image_stream = torch.cuda.Stream(device) if self.cuda and options.image_stream else None

    @property
    def dtype(self) -> torch.dtype:
        return self.options.dtype

    # ------------------------------------------------------------------ networks
    def prepare_model(self, model: Clip3DNet | PanopticNet) -> Clip3DNet | PanopticNet:
        """The model on the device, in eval mode, on the requested backend and precision (its
        cosine classifier stays float32), dense parts compiled when asked (not for a
        `PanopticNet`, whose query decoder is left eager); TF32 set."""
        if isinstance(model, PanopticNet) and self.dtype != torch.float32:
            raise RuntimeOptionError(f"precision {self.options.precision}: panoptic models run in fp32 only")
        current = model.backbone.backend
        backend = sparse_backend.for_device(self.device, self.options.backend, current)
        if backend != current:
            rebuilt = type(model)(model.cfg, backend=backend)
            rebuilt.load_state_dict(model.state_dict(), strict=True)  # same names on every backend
            log.info("model moved from the %s backend to %s for %s", current, backend, self.device)
            model = rebuilt
        model = model.to(self.device, self.dtype).eval()
        model.classifier.float()
        if self.options.tf32 and self.cuda:
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
            sparse_backend.set_tf32(model.backbone.backend, True)
        if self.options.compile and isinstance(model, PanopticNet):
            log.warning("compile: not applied to the panoptic decoder (runs eagerly)")
        elif self.options.compile:
            parts: list[nn.Module] = [model.point_mlp, model.head]
            if model.fusion is not None:
                parts.append(model.fusion)
            for part in parts:  # point counts change every frame: dynamic shapes
                part.compile(backend=self.options.compile_backend, dynamic=True)
        return model

    def prepare_dense(self, dense: nn.Module) -> nn.Module:
        """The CLIP image encoder on the device at the runtime's precision; its transformer blocks
        compiled when asked (camera image sizes are fixed: static shapes)."""
        dense = dense.to(self.device, self.dtype)
        if self.options.compile:
            for block in dense.visual.transformer.resblocks:
                block.compile(backend=self.options.compile_backend)
        return dense

    # ------------------------------------------------------------------ streams and timers
    @contextlib.contextmanager
    def image_stream(self) -> Iterator[None]:
        """Work issued inside runs on the image stream (after what the main stream issued so far);
        `join_image_stream` makes the main stream wait for it. A no-op without CUDA or when off."""
        if self._image_stream is None:
            yield
            return
        self._image_stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self._image_stream):
            yield

    def join_image_stream(self, *tensors: torch.Tensor) -> None:
        """The main stream waits for the image stream; ``tensors`` made there are marked as used by
        the main stream so the caching allocator does not hand their memory back too early."""
        if self._image_stream is None:
            return
        main = torch.cuda.current_stream(self.device)
        main.wait_stream(self._image_stream)
        for t in tensors:
            t.record_stream(main)

    def timer(self) -> StageTimer:
        return StageTimer(self.device, sync=self.options.stage_sync)
