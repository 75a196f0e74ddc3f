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

Both are no-ops where not needed and idempotent.
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


def apply() -> None:
    """Apply both fixes once; safe to call many times."""
    global _applied
    if _applied:
        return
    _define_torchvision_schemas()
    _patch_spconv_stream()
    _applied = True
