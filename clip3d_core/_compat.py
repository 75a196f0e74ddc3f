"""Import-time fixes for running the pinned wheels on CPU-only machines (the one place for them).

1. torchvision 0.28.0 on PyPI is a CUDA build. On CPU torch its compiled ops library fails to
   load, and `import torchvision` (hence open_clip and timm) then dies in
   `torchvision/_meta_registrations.py` with "operator torchvision::nms does not exist". Defining
   the `torchvision::nms` and `torchvision::qnms` schemas through `torch.library` first lets the
   import succeed; the ops themselves are never called by clip3d. Where the library loads (a
   matching CUDA install) nothing is defined.
2. spconv 2.3.8's autograd functions call `torch.cuda.current_stream()` unconditionally in
   backward (traveller59/spconv issue #366), which raises on CPU torch. Its
   `get_current_stream` is made to return 0 (the null stream, which spconv's CPU path ignores)
   when CUDA is unavailable.
3. spconv 2.3.8's CPU `scatter_add` (GatherCPU::scatter_add, used by every sparse conv forward and
   backward on CPU) runs an OpenMP loop whose lambda captures its row pointers by reference, so the
   threads share them: a data race (undefined behaviour) that can add rows into the wrong output
   rows. This wheel's compiled code keeps the pointers in registers and we have not seen a wrong
   row in trials (bit-identical outputs and gradients at 1 and 2 threads), but nothing guarantees
   that: on CPU-only torch it is replaced by torch's `index_put_(accumulate=True)` and spconv's
   Python gather-mm-scatter path is selected (its C++ path calls the kernel directly). Measured
   cost: none (small model, 30k points, 2 threads: 0.89 s either way).

All are no-ops where not needed and idempotent.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import torch

log = logging.getLogger(__name__)

_TORCHVISION_SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}
_torchvision_lib: torch.library.Library | None = None  # kept alive: dropping it unregisters the defs
_applied = False


def _torchvision_ops_load() -> bool:
    """True when torchvision's compiled ops library loads into this torch."""
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return True  # nothing to fix: torchvision absent
    libs = sorted(Path(next(iter(spec.submodule_search_locations))).glob("_C*.so"))
    if not libs:
        return False
    try:
        torch.ops.load_library(str(libs[0]))
    except (OSError, RuntimeError) as exc:
        log.debug("torchvision ops do not load on this torch (%s); defining schemas", exc)
        return False
    return True


def _define_torchvision_schemas() -> None:
    global _torchvision_lib
    if _torchvision_lib is not None or _torchvision_ops_load():
        return
    lib = torch.library.Library("torchvision", "FRAGMENT")  # kept alive in a module global
    for name, schema in _TORCHVISION_SCHEMAS.items():
        if not hasattr(torch.ops.torchvision, name):
            lib.define(schema)
    _torchvision_lib = lib


def _patch_spconv_stream() -> None:
    if torch.cuda.is_available() or importlib.util.find_spec("spconv") is None:
        return
    # The function is defined in cppcore and imported by name into ops and hash.
    import spconv.pytorch.cppcore as cppcore
    import spconv.pytorch.hash as spconv_hash
    import spconv.pytorch.ops as spconv_ops

    def get_current_stream() -> int:
        return 0

    for module in (cppcore, spconv_ops, spconv_hash):
        module.get_current_stream = get_current_stream


def _patch_spconv_scatter() -> None:
    if torch.cuda.is_available() or importlib.util.find_spec("spconv") is None:
        return
    import spconv.pytorch.ops as spconv_ops
    from spconv.core_cc.csrc.sparse.all import SpconvOps

    def scatter_add_cpu(out, inp, inds) -> None:  # tv.Tensor arguments, CPU, float dtypes
        n = int(inds.dim(0))
        if n == 0:
            return
        target = torch.from_numpy(out.numpy_view())
        rows = torch.from_numpy(inp.numpy_view())[:n]
        target.index_put_((torch.from_numpy(inds.numpy_view()).long(),), rows, accumulate=True)

    SpconvOps.scatter_add_cpu = staticmethod(scatter_add_cpu)
    spconv_ops.SPCONV_CPP_GEMM = False


def apply() -> None:
    """Apply the fixes once; safe to call many times."""
    global _applied
    if _applied:
        return
    _define_torchvision_schemas()
    _patch_spconv_stream()
    _patch_spconv_scatter()
    _applied = True
