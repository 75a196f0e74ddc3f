"""The CPU-install fixes in clip3d_core/_compat.py: torchvision imports, spconv trains on CPU."""

from __future__ import annotations

import subprocess
import sys

import torch

import clip3d_core
from clip3d_core import _compat


def test_torchvision_and_open_clip_import_in_a_fresh_interpreter() -> None:
    code = "import clip3d_core, torchvision, open_clip; print(torchvision.__version__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().startswith("0.28")


def test_apply_is_idempotent() -> None:
    _compat.apply()
    _compat.apply()
    assert hasattr(torch.ops.torchvision, "nms")
    assert clip3d_core.__version__


def test_spconv_backward_runs_on_cpu() -> None:
    import spconv.pytorch as spconv

    torch.manual_seed(0)
    coords = torch.unique(torch.randint(0, 8, (64, 3)), dim=0).int()
    coords = torch.cat([torch.zeros(len(coords), 1, dtype=torch.int32), coords], 1)
    feats = torch.randn(len(coords), 4, requires_grad=True)
    net = spconv.SparseSequential(
        spconv.SubMConv3d(4, 8, 3, indice_key="s0"), spconv.SparseConv3d(8, 8, 3, stride=2, indice_key="d1")
    )
    out = net(spconv.SparseConvTensor(feats, coords, [8, 8, 8], 1))
    out.features.square().sum().backward()
    assert feats.grad is not None and feats.grad.abs().sum() > 0
    assert all(p.grad is not None for p in net.parameters())
