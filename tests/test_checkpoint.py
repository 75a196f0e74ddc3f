"""Checkpoint files: round trip, and a named `CheckpointError` for every way a file can be unusable."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import clip3d_core  # noqa: F401
from clip3d_core.checkpoint import (
    FORMAT_VERSION,
    CheckpointError,
    build_untrained_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from clip3d_core.clip import ClipIdentity, EmbeddingBank, tiny_clip_config
from clip3d_core.model import Clip3DNet, ModelConfig

D = 32
IDENTITY = ClipIdentity("clip3d-tiny", "random:0", D)  # what load_clip(tiny_clip_config()) reports
VOCAB = ["car|automobile", "road", "person|pedestrian"]


def points(n: int = 1500) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.cat(
        [
            torch.rand(n, 3, generator=g) * torch.tensor([30.0, 30.0, 3.0]) - 15.0,
            torch.rand(n, 1, generator=g),
        ],
        1,
    )


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Clip3DNet]:
    torch.manual_seed(1)
    cfg = ModelConfig.small(embed_dim=D, fusion=True)
    model = Clip3DNet(cfg)
    model.train()
    model(points())  # move BatchNorm running stats off their init so they must round-trip too
    model.eval()
    bank = EmbeddingBank(["car", "automobile", "road"], torch.randn(3, D), IDENTITY)
    path = tmp_path_factory.mktemp("ckpt") / "model.pt"
    save_checkpoint(
        path,
        model,
        cfg,
        tiny_clip_config(),
        IDENTITY,
        vocabulary=VOCAB,
        text_bank=bank,
        meta={"epoch": 7, "miou": 0.25},
    )
    return path, model


def raw(path: Path) -> dict:
    return torch.load(path, weights_only=True)


def test_round_trip_gives_identical_outputs(saved: tuple[Path, Clip3DNet]) -> None:
    path, model = saved
    ckpt = load_checkpoint(path)
    assert ckpt.model_config == model.cfg and ckpt.identity == IDENTITY
    assert ckpt.clip_config == tiny_clip_config()
    assert ckpt.vocabulary == VOCAB
    assert ckpt.meta["epoch"] == 7 and ckpt.meta["miou"] == 0.25 and "created" in ckpt.meta
    assert ckpt.text_bank is not None and ckpt.text_bank.names == ["car", "automobile", "road"]
    rebuilt = ckpt.build_model()
    assert not rebuilt.training
    pts = points()
    clip = torch.nn.functional.normalize(torch.randn(len(pts), D), dim=1)
    mask = torch.rand(len(pts)) > 0.5
    with torch.inference_mode():
        a, b = (
            model(pts, clip_features=clip, clip_mask=mask),
            rebuilt(pts, clip_features=clip, clip_mask=mask),
        )
    assert torch.equal(a.features, b.features)
    assert torch.equal(model.temperature, rebuilt.temperature)
    assert not list(path.parent.glob(".*.tmp"))  # atomic save leaves no temp file behind


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nope.pt")


def test_truncated_file(saved: tuple[Path, Clip3DNet], tmp_path: Path) -> None:
    data = saved[0].read_bytes()
    cut = tmp_path / "cut.pt"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(cut)


def test_garbage_and_empty_files(tmp_path: Path) -> None:
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"\x00not a checkpoint at all\xff" * 50)
    with pytest.raises(CheckpointError, match=r"junk\.pt is not a torch file"):
        load_checkpoint(junk)
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty"):
        load_checkpoint(empty)


class _Evil:  # any pickled class: weights_only loading must refuse it, not run it
    pass


def test_foreign_files(saved: tuple[Path, Clip3DNet], tmp_path: Path) -> None:
    bare = tmp_path / "bare.pt"
    torch.save(saved[1].state_dict(), bare)
    with pytest.raises(CheckpointError, match=r"not a clip3d checkpoint.*bare state dict"):
        load_checkpoint(bare)
    other = tmp_path / "other.pt"
    torch.save({"format": "mmdet3d", "format_version": 1}, other)
    with pytest.raises(CheckpointError, match="not a clip3d checkpoint: format='mmdet3d'"):
        load_checkpoint(other)
    pickled = tmp_path / "pickled.pt"
    torch.save({"format": "clip3d", "payload": _Evil()}, pickled)
    with pytest.raises(CheckpointError, match="pickled Python objects"):
        load_checkpoint(pickled)


def test_newer_format_version(saved: tuple[Path, Clip3DNet], tmp_path: Path) -> None:
    data = raw(saved[0])
    data["format_version"] = FORMAT_VERSION + 1
    newer = tmp_path / "newer.pt"
    torch.save(data, newer)
    with pytest.raises(CheckpointError, match=f"format version {FORMAT_VERSION + 1}, newer"):
        load_checkpoint(newer)


def test_state_dict_mismatches_are_listed(saved: tuple[Path, Clip3DNet], tmp_path: Path) -> None:
    data = raw(saved[0])
    sd = data["state_dict"]
    del sd["head.net.3.weight"]
    sd["backbone.stem.0.weight"] = torch.zeros(3, 3, 3, 3, 3)
    sd["extra.bias"] = torch.zeros(2)
    bad = tmp_path / "bad.pt"
    torch.save(data, bad)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(bad)
    msg = str(err.value)
    assert "1 missing keys: head.net.3.weight" in msg
    assert "1 unexpected keys: extra.bias" in msg
    assert "backbone.stem.0.weight: file (3, 3, 3, 3, 3) vs model" in msg

    data = raw(saved[0])
    data["model_config"]["embed_dim"] = 64  # config and weights disagree
    torch.save(data, bad)
    with pytest.raises(CheckpointError, match="shape mismatches"):
        load_checkpoint(bad)

    data = raw(saved[0])
    data["model_config"]["depth"] = 3
    torch.save(data, bad)
    with pytest.raises(CheckpointError, match=r"unknown key.*depth"):
        load_checkpoint(bad)


def test_clip_identity_mismatch(saved: tuple[Path, Clip3DNet]) -> None:
    assert load_checkpoint(saved[0], identity=IDENTITY).identity == IDENTITY
    other = ClipIdentity("clip3d-tiny", "random:1", D)
    with pytest.raises(CheckpointError, match=r"CLIP identity mismatch.*random:0.*random:1"):
        load_checkpoint(saved[0], identity=other)


def test_save_rejects_inconsistent_inputs(saved: tuple[Path, Clip3DNet], tmp_path: Path) -> None:
    model = saved[1]
    with pytest.raises(CheckpointError, match="embed_dim"):
        save_checkpoint(
            tmp_path / "x.pt",
            model,
            model.cfg,
            tiny_clip_config(),
            ClipIdentity("ViT-B-16", "pretrained:openai", 512),
        )
    with pytest.raises(CheckpointError, match="does not describe"):
        save_checkpoint(
            tmp_path / "x.pt", model, ModelConfig.small(embed_dim=D), tiny_clip_config(), IDENTITY
        )
    bank = EmbeddingBank(["car"], torch.randn(1, D), ClipIdentity("clip3d-tiny", "random:5", D))
    with pytest.raises(CheckpointError, match="text bank"):
        save_checkpoint(tmp_path / "x.pt", model, model.cfg, tiny_clip_config(), IDENTITY, text_bank=bank)
    assert not (tmp_path / "x.pt").exists()


def test_build_untrained_checkpoint(tmp_path: Path) -> None:
    path = build_untrained_checkpoint(
        tmp_path / "u.pt",
        ModelConfig.small(embed_dim=D),
        tiny_clip_config(),
        vocabulary=["car", "road"],
        seed=3,
    )
    ckpt = load_checkpoint(path)
    assert ckpt.identity == IDENTITY and ckpt.meta["untrained"] is True and ckpt.vocabulary == ["car", "road"]
    again = load_checkpoint(
        build_untrained_checkpoint(
            tmp_path / "v.pt", ModelConfig.small(embed_dim=D), tiny_clip_config(), seed=3
        )
    )
    assert all(torch.equal(ckpt.state_dict[k], again.state_dict[k]) for k in ckpt.state_dict)
    with pytest.raises(CheckpointError, match="embed_dim=32"):
        build_untrained_checkpoint(tmp_path / "w.pt", ModelConfig.small(), tiny_clip_config())
