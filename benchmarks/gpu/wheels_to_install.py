"""Print the parked wheels (in the folder given) that check.sh should install: those whose
distribution is not installed here. spconv's CPU wheel and its CUDA builds (spconv-cuXXX with
cumm-cuXXX) share the import name `spconv`: a CUDA build wins, and none is installed when some
spconv already imports."""

from __future__ import annotations

import importlib.metadata as md
import importlib.util
import sys
from pathlib import Path


def to_install(folder: Path) -> list[Path]:
    dist = {w: w.name.split("-")[0] for w in sorted(folder.glob("*.whl"))}
    cuda_build = any(d.startswith("spconv_cu") for d in dist.values())
    out = []
    for wheel, name in dist.items():
        family = name.split("_cu")[0]  # spconv_cu126 -> spconv, cumm_cu126 -> cumm
        if family in ("spconv", "cumm") and (
            importlib.util.find_spec(family) is not None or (cuda_build and "_cu" not in name)
        ):
            continue
        try:
            md.version(name)
        except md.PackageNotFoundError:
            out.append(wheel)
    return out


if __name__ == "__main__":
    for wheel in to_install(Path(sys.argv[1])):
        print(wheel)
