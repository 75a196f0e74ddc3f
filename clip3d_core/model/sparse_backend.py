"""Which sparse-convolution library runs the U-Net: the one place that chooses.

``spconv``: traveller59/spconv 2.x (`spconv` CPU build, or `spconv-cuXXX` for one CUDA version).
``spconv_triton``: spconv-triton, the same API and `state_dict` written in Triton (GPU only, any
CUDA torch that ships Triton). Checkpoints are interchangeable: the U-Net's parameter names and
shapes do not depend on the backend (tests/test_runtime.py, tests/test_gpu.py).

The choice: an explicit name (`RuntimeOptions.backend`, `clip3d bench --backend`), else the
environment variable ``CLIP3D_SPARSE_BACKEND``, else "auto": spconv where its CUDA build is
installed, spconv-triton where only it can run (CUDA torch, Triton importable), else spconv (the CPU
build: on CPU nothing changes). `check_device` says whether a backend can run on a device.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import logging
import os
from types import ModuleType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

BACKENDS = ("spconv", "spconv_triton")
AUTO = "auto"
ENV_VAR = "CLIP3D_SPARSE_BACKEND"
_MODULES = {"spconv": "spconv.pytorch", "spconv_triton": "spconv_triton.pytorch"}


class SparseBackendError(RuntimeError):
    """The requested sparse-convolution backend is unknown, not installed or cannot run here."""


@functools.cache
def _import_error(module_name: str) -> str | None:
    """None when ``module_name`` imports, else why not (not installed, or a broken install such as
    a CUDA build whose runtime libraries are missing: reported, never a crash at model build)."""
    top = module_name.split(".")[0]
    if importlib.util.find_spec(top) is None:
        return f"{top.replace('_', '-')} is not installed"
    try:
        importlib.import_module(module_name)
    except Exception as exc:  # ImportError, OSError from a shared library, RuntimeError...
        log.warning("%s is installed but does not import: %s", module_name, exc)
        return f"{module_name} does not import: {type(exc).__name__}: {exc}"[:300]
    return None


@functools.cache
def spconv_has_cuda() -> bool:
    """True when the installed `spconv` is a CUDA build (`spconv-cuXXX`), not the CPU wheel."""
    if _import_error("spconv.pytorch") is not None:
        return False
    from spconv.cppconstants import CPU_ONLY_BUILD

    return not CPU_ONLY_BUILD


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def available() -> dict[str, str | None]:
    """Each backend -> None when it is installed and imports here, else why not. (Where it can run
    is `check_device`'s business: spconv-triton builds models on CPU but runs them on GPUs.)"""
    out: dict[str, str | None] = {"spconv": _import_error("spconv.pytorch")}
    if importlib.util.find_spec("spconv_triton") is None:
        out["spconv_triton"] = "spconv-triton is not installed (make GPU=triton)"
    elif importlib.util.find_spec("triton") is None:
        out["spconv_triton"] = "spconv-triton needs Triton (it comes with CUDA builds of torch)"
    else:
        out["spconv_triton"] = _import_error("spconv_triton.pytorch")
    return out


def resolve(name: str | None = None) -> str:
    """The backend to use: ``name`` if given, else $CLIP3D_SPARSE_BACKEND, else the automatic
    choice (spconv's CUDA build; else spconv-triton where CUDA is available; else spconv). Raises
    `SparseBackendError` for an unknown name or a backend that is not installed."""
    requested = name or os.environ.get(ENV_VAR) or AUTO
    if requested not in (*BACKENDS, AUTO):
        raise SparseBackendError(f"sparse backend {requested!r} is not one of {(*BACKENDS, AUTO)}")
    status = available()
    if requested == AUTO:
        if spconv_has_cuda():
            return "spconv"
        if status["spconv_triton"] is None and _cuda_available():
            return "spconv_triton"
        if status["spconv"] is None:
            return "spconv"
        raise SparseBackendError(f"no sparse-convolution backend is installed: {status}")
    if status[requested] is not None:
        raise SparseBackendError(f"sparse backend {requested!r} cannot be used: {status[requested]}")
    return requested


def check_device(backend: str, device: torch.device) -> None:
    """Raise `SparseBackendError` when ``backend`` cannot run on ``device`` (spconv-triton has no
    CPU kernels; spconv's CPU wheel has no CUDA ones)."""
    if device.type == "cpu" and backend == "spconv_triton":
        raise SparseBackendError("spconv-triton runs on GPUs only: use backend spconv on CPU")
    if device.type == "cuda" and backend == "spconv" and not spconv_has_cuda():
        raise SparseBackendError(
            "the installed spconv is the CPU build: install spconv-cuXXX (make CUDA=cu126) or "
            "spconv-triton (make GPU=triton, backend spconv_triton) for CUDA"
        )


def for_device(device: torch.device, requested: str | None = None, current: str | None = None) -> str:
    """The backend to run on ``device``: ``requested`` (or $CLIP3D_SPARSE_BACKEND) when given, which
    must run there; else ``current`` (a model's) when it runs there; else the automatic choice or
    another installed backend that does (a CPU run on a spconv-triton GPU machine takes spconv)."""
    explicit = requested or os.environ.get(ENV_VAR)
    if explicit:
        backend = resolve(explicit)
        check_device(backend, device)
        return backend
    status = available()
    try:
        automatic = [resolve()]
    except SparseBackendError:
        automatic = []
    installed = [b for b in BACKENDS if status[b] is None]
    for backend in [*([current] if current else []), *automatic, *installed]:
        try:
            check_device(backend, device)
        except SparseBackendError:
            continue
        return backend
    raise SparseBackendError(f"no installed sparse backend runs on {device}: {status}")


def module(backend: str) -> ModuleType:
    """The `pytorch` module (the spconv.pytorch API) of a backend name `resolve` returned."""
    if backend not in _MODULES:
        raise SparseBackendError(f"sparse backend {backend!r} is not one of {BACKENDS}")
    return importlib.import_module(_MODULES[backend])


def set_tf32(backend: str, enabled: bool) -> None:
    """TF32 inside the sparse convolutions (off by default in both libraries). Both read the flag
    from their top-level `constants` module at call time."""
    importlib.import_module(f"{backend}.constants").SPCONV_ALLOW_TF32 = bool(enabled)
