"""CLIP teacher: loading, dense features, patch grid, vocabulary, text embeddings, banks, CLI."""

from __future__ import annotations

import dataclasses
import hashlib
import logging

import numpy as np
import open_clip  # conftest imported clip3d_core first (torchvision schema fix)
import pytest
import torch
import torch.nn.functional as F

from clip3d_core.clip import (
    DEFAULT_TEMPLATES,
    ClipConfig,
    ClipIdentity,
    ClipLoadError,
    DenseClipEncoder,
    EmbeddingBank,
    ImageInputError,
    TextEncoder,
    Vocabulary,
    VocabularyError,
    load_clip,
    tiny_clip_config,
)
from clip3d_core.clip.bank import COCO_CLASSES
from clip3d_core.clip.dense import PatchGrid, resize_pos_embed
from clip3d_core.clip.vocabulary import name_colour
from clip3d_core.labels import DRIVING_PALETTE, MAX_CLASSES, UNLABELLED


@pytest.fixture(scope="module")
def tiny():
    return load_clip(tiny_clip_config(seed=0))


@pytest.fixture(scope="module")
def tiny_file(tiny, tmp_path_factory):
    path = tmp_path_factory.mktemp("clip") / "tiny.pt"
    torch.save(tiny.model.state_dict(), path)
    return path


def _normalise(loaded, images: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(loaded.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(loaded.image_std).view(1, 3, 1, 1)
    return (images - mean) / std


# --- loading ------------------------------------------------------------------------------------


def test_random_weights_deterministic_logged_and_leave_global_rng_alone(caplog):
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    with caplog.at_level(logging.WARNING, logger="clip3d_core.clip.loader"):
        a = load_clip(tiny_clip_config(seed=7))
    assert torch.equal(torch.rand(3), expected_next)  # caller's RNG stream untouched
    assert any("RANDOM" in r.message for r in caplog.records)
    b = load_clip(tiny_clip_config(seed=7))
    c = load_clip(tiny_clip_config(seed=8))
    sa, sb, sc = a.model.state_dict(), b.model.state_dict(), c.model.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["visual.proj"], sc["visual.proj"])
    assert a.identity == ClipIdentity("clip3d-tiny", "random:7", 32)
    assert (a.image_size, a.patch_size, a.embed_dim) == ((64, 64), 16, 32)
    assert not any(p.requires_grad for p in a.model.parameters()) and not a.model.training


@pytest.mark.parametrize(
    ("cfg", "match"),
    [
        (ClipConfig(model_name="clip3d-tiny"), "allow_random"),
        (ClipConfig(model_name="clip3d-tiny", checkpoint="/nonexistent/clip.pt"), "not found"),
        (ClipConfig(model_name="clip3d-tiny", pretrained="openai"), "unknown pretrained tag"),
        (ClipConfig(model_name="clip3d-tiny", pretrained="openai", checkpoint="x.pt"), "choose one"),
        (ClipConfig(model_name="ViT-Q-99", allow_random=True), "unknown open_clip model"),
        (ClipConfig(model_name="clip3d-tiny", allow_random=True, precision="fp8"), "precision"),
        (ClipConfig(model_name="hf-hub:org/repo", allow_random=True), "schemas"),
    ],
)
def test_load_errors_never_fall_back(cfg, match):
    with pytest.raises(ClipLoadError, match=match):
        load_clip(cfg)


def test_checkpoint_file_identity_and_outputs(tiny, tiny_file, tmp_path):
    loaded = load_clip(ClipConfig(model_name="clip3d-tiny", checkpoint=str(tiny_file)))
    digest = hashlib.sha256(tiny_file.read_bytes()).hexdigest()[:16]
    assert loaded.identity == ClipIdentity("clip3d-tiny", f"file:{digest}", 32)
    images = torch.rand(2, 3, 64, 64)
    tokens = tiny.tokenizer(["a photo of a car.", "a truck"])
    assert torch.equal(loaded.model.encode_image(images), tiny.model.encode_image(images))
    assert torch.equal(loaded.model.encode_text(tokens), tiny.model.encode_text(tokens))

    state = tiny.model.state_dict()
    state["visual.proj"] = torch.zeros(5, 5)  # wrong architecture
    bad = tmp_path / "bad.pt"
    torch.save(state, bad)
    with pytest.raises(ClipLoadError, match="does not load"):
        load_clip(ClipConfig(model_name="clip3d-tiny", checkpoint=str(bad)))


@pytest.mark.parametrize(("tag", "quick_gelu"), [("openai", True), ("laion2b_s34b_b88k", False)])
def test_pretrained_tags_get_the_activation_they_were_trained_with(monkeypatch, tag, quick_gelu):
    # OpenAI's ViT-B-16 weights need QuickGELU, which the plain config lacks (open_clip only warns).
    seen = {}

    def offline(name, **kwargs):  # records the call, then fails as it does without a network
        seen.update(kwargs, name=name)
        raise RuntimeError("no network")

    monkeypatch.setattr(open_clip, "create_model", offline)
    with pytest.raises(ClipLoadError, match="not available"):
        load_clip(ClipConfig(model_name="ViT-B/16", pretrained=tag))
    assert seen["name"] == "ViT-B-16" and seen["pretrained"] == tag and seen["force_quick_gelu"] is quick_gelu


def test_identity_dict_round_trip():
    ident = ClipIdentity("ViT-B-16", "pretrained:openai", 512)
    assert ClipIdentity.from_dict(ident.as_dict()) == ident
    assert ClipIdentity.from_dict({**ident.as_dict(), "model_name": "ViT-B/16"}) == ident  # one model
    assert ClipIdentity("ViT-B/16", "pretrained:openai", 512) == ident
    with pytest.raises(ClipLoadError):
        ClipIdentity.from_dict({"model_name": "x"})


# --- dense features -----------------------------------------------------------------------------


def test_cls_equals_encode_image_at_native_and_interpolated_sizes(tiny, tiny_file):
    enc = DenseClipEncoder(tiny)
    images = torch.rand(2, 3, 64, 64)
    out = enc(images)
    torch.testing.assert_close(out.cls, tiny.model.encode_image(_normalise(tiny, images)), atol=1e-5, rtol=0)

    # open_clip resizes the positional embedding itself when weights load at another image size
    wide = open_clip.create_model("clip3d-tiny", pretrained=str(tiny_file), force_image_size=(96, 160)).eval()
    images = torch.rand(3, 3, 96, 160)
    out = enc(images)
    torch.testing.assert_close(out.cls, wide.encode_image(_normalise(tiny, images)), atol=1e-5, rtol=0)
    assert out.features.shape == (3, 32, 6, 10)
    assert out.grid.grid_hw == (6, 10) and out.grid.input_hw == (96, 160)
    torch.testing.assert_close(out.features.norm(dim=1), torch.ones(3, 6, 10))
    pos = tiny.model.visual.positional_embedding
    assert resize_pos_embed(pos, (4, 4), (4, 4)) is pos


@pytest.mark.parametrize("mode", ["value", "maskclip"])
def test_patch_tokens_are_last_block_with_self_only_attention(tiny, mode):
    """Reference from open_clip's own modules: the last block with attention restricted to each token
    itself (diagonal mask) is exactly the value path; 'value' mode drops residual and MLP."""
    visual = tiny.model.visual
    last = visual.transformer.resblocks[-1]
    captured = {}
    handle = last.register_forward_pre_hook(lambda _m, args: captured.setdefault("x", args[0]))
    images = torch.rand(2, 3, 64, 64)
    tiny.model.encode_image(_normalise(tiny, images))
    handle.remove()
    x = captured["x"]
    n = x.shape[1]
    self_only = torch.full((n, n), float("-inf")).fill_diagonal_(0.0)
    with torch.no_grad():
        if mode == "maskclip":
            tokens = last(x, attn_mask=self_only)
        else:
            y = last.ln_1(x)
            tokens = last.attn(y, y, y, attn_mask=self_only, need_weights=False)[0]
        ref = F.normalize(visual.ln_post(tokens[:, 1:]) @ visual.proj, dim=-1)
    ref = ref.transpose(1, 2).reshape(2, 32, 4, 4)
    out = DenseClipEncoder(tiny, last_block=mode)(images)
    torch.testing.assert_close(out.features, ref, atol=1e-5, rtol=0)


def test_dense_input_errors(tiny):
    enc = DenseClipEncoder(tiny)
    with pytest.raises(ImageInputError, match="multiple of the patch"):
        enc(torch.rand(1, 3, 60, 64))
    with pytest.raises(ImageInputError, match="uint8"):
        enc.prepare([np.zeros((10, 10, 3), np.float32)])
    with pytest.raises(ImageInputError, match="differ in size"):
        enc.prepare([np.zeros((10, 10, 3), np.uint8), np.zeros((12, 10, 3), np.uint8)])
    with pytest.raises(ImageInputError, match="no images"):
        enc.prepare([])
    with pytest.raises(ValueError, match="last_block"):
        DenseClipEncoder(tiny, last_block="attn")


def test_patch_grid_maps_original_pixels_through_non_native_resize(tiny):
    enc = DenseClipEncoder(tiny)
    h, w = 375, 1242  # KITTI: wide, non-square, not a multiple of anything
    batch, (sx, sy) = enc.prepare([np.zeros((h, w, 3), np.uint8)] * 2)
    assert batch.shape == (2, 3, 64, 208)  # short side 64, aspect ~kept, multiples of 16
    out = enc(batch, image_hw=(h, w))
    grid = out.grid
    assert grid.grid_hw == (4, 13) and grid.scale == pytest.approx((sx, sy))
    # pixel i covers [i, i+1) (geometry's convention): the image spans [0, W) x [0, H)
    corners = torch.tensor([[0, 0], [w - 0.01, 0], [0, h - 0.01], [w - 0.01, h - 0.01], [w / 2, h / 2 + 1]])
    assert grid.pixel_to_patch(corners).tolist() == [0, 12, 39, 51, 2 * 13 + 6]
    first_edge = 16 / sx  # left edge of patch column 1 in original pixels
    edges = torch.tensor([[first_edge - 1e-3, 0.0], [first_edge + 1e-3, 0.0]])
    assert grid.pixel_to_patch(edges).tolist() == [0, 1]
    centres = grid.patch_centres()
    assert torch.equal(grid.pixel_to_patch(centres), torch.arange(52))
    assert grid.pixel_to_patch(centres.view(4, 13, 2)).shape == (4, 13)

    feats = out.features[1]
    flat = feats.flatten(1).T  # [52, D] in flat-index order
    torch.testing.assert_close(grid.sample(feats, centres), flat, atol=1e-5, rtol=0)
    midpoint = (centres[0] + centres[1]) / 2  # halfway between two horizontal neighbours
    torch.testing.assert_close(grid.sample(feats, midpoint[None])[0], F.normalize(flat[0] + flat[1], dim=0))


def test_resize_and_patch_lookup_agree_on_a_real_image_region(tiny):
    """A bright square drawn around a patch centre lands in that patch of the resized input."""
    enc = DenseClipEncoder(tiny)
    h, w = 900, 1600
    hw = enc.input_size((h, w))
    grid = PatchGrid(hw, (hw[0] // 16, hw[1] // 16), 16, (h, w))
    for index in (0, 17, grid.grid_hw[0] * grid.grid_hw[1] - 1):
        u, v = grid.patch_centres()[index].round().long().tolist()
        img = np.zeros((h, w, 3), np.uint8)
        img[max(v - 20, 0) : v + 20, max(u - 20, 0) : u + 20] = 255
        batch, _ = enc.prepare([img])
        hottest = int(batch[0, 0].flatten().argmax())
        row, col = divmod(hottest, hw[1])
        assert (row // 16) * grid.grid_hw[1] + col // 16 == index
        assert int(grid.pixel_to_patch(torch.tensor([u, v]))) == index


# --- vocabulary ---------------------------------------------------------------------------------


def test_vocabulary_parsing_and_colours():
    vocab = Vocabulary.from_strings([" car | automobile |Car", "truck", "traffic cone"], version=3)
    assert vocab.names == ["car", "truck", "traffic cone"]
    assert vocab.entries[0].synonyms == ("car", "automobile")
    assert len(vocab) == 3 and vocab.version == 3 and UNLABELLED == 65535
    assert vocab.index("TRUCK") == 1
    assert vocab.to_strings() == ["car|automobile", "truck", "traffic cone"]
    colours = vocab.colours
    assert colours.dtype == np.uint8 and colours.shape == (3, 3)
    other = Vocabulary.from_strings(["traffic cone", "bus", "car"])
    assert np.array_equal(other.colours[0], colours[2]) and np.array_equal(other.colours[2], colours[0])
    assert name_colour("car") == tuple(colours[0]) and name_colour("car") != name_colour("truck")
    # The usual driving classes take SemanticKITTI's colours, whatever the spelling; others hash.
    assert name_colour("Traffic-Sign") == name_colour("traffic_sign") == (255, 0, 0)
    assert name_colour("road") == (255, 0, 255) and name_colour("pedestrian") == name_colour("person")
    assert name_colour("traffic cone") not in DRIVING_PALETTE.values()
    msg = vocab.as_dict()
    assert msg["version"] == 3 and msg["entries"][0] == {
        "id": 0, "name": "car", "synonyms": ["car", "automobile"], "colour": list(colours[0])}


@pytest.mark.parametrize(
    ("strings", "match"),
    [
        ([], "empty"),
        (["car", ""], "empty vocabulary entry"),
        (["car||auto"], "empty synonym"),
        (["car|"], "empty synonym"),
        (["Car", "car|auto"], "duplicate"),
        ([f"c{i}" for i in range(MAX_CLASSES + 1)], "at most"),
        (["car", 3], "must be a string"),
        ("car", "one string"),
    ],
)
def test_vocabulary_validation(strings, match):
    with pytest.raises(VocabularyError, match=match):
        Vocabulary.from_strings(strings)
    assert len(Vocabulary.from_strings([f"c{i}" for i in range(MAX_CLASSES)])) == MAX_CLASSES


# --- text embeddings and cache ------------------------------------------------------------------


def test_text_embeddings_are_template_and_synonym_means(tiny):
    templates = ("a photo of a {}.", "a {} in the street.")
    enc = TextEncoder(tiny, templates=templates)
    out = enc.encode(Vocabulary.from_strings(["car|automobile", "truck"]))
    assert out.shape == (2, 32) and out.dtype == torch.float32
    torch.testing.assert_close(out.norm(dim=1), torch.ones(2))

    def phrase(p):
        emb = tiny.model.encode_text(tiny.tokenizer([t.format(p) for t in templates]), normalize=True)
        return F.normalize(emb.mean(0), dim=0)

    expected_car = F.normalize(phrase("car") + phrase("automobile"), dim=0)
    torch.testing.assert_close(out[0], expected_car, atol=1e-6, rtol=0)
    torch.testing.assert_close(out[1], phrase("truck"), atol=1e-6, rtol=0)
    assert 8 <= len(DEFAULT_TEMPLATES) <= 15 and all(t.count("{}") == 1 for t in DEFAULT_TEMPLATES)
    with pytest.raises(ValueError, match="exactly one"):
        TextEncoder(tiny, templates=["a photo"])


def test_text_cache_hits_skip_the_text_tower(tiny, tmp_path, monkeypatch, caplog):
    calls = []
    original = tiny.model.encode_text

    def counting(tokens, normalize=False):
        calls.append(tokens.shape[0])
        return original(tokens, normalize=normalize)

    monkeypatch.setattr(tiny.model, "encode_text", counting)
    vocab = Vocabulary.from_strings(["car|automobile", "truck"])
    first = TextEncoder(tiny, cache_dir=tmp_path).encode(vocab)
    assert sum(calls) == 3 * len(DEFAULT_TEMPLATES)

    calls.clear()
    again = TextEncoder(tiny, cache_dir=tmp_path)  # fresh process-like instance, same key
    assert torch.equal(again.encode(vocab), first) and calls == []
    again.encode(Vocabulary.from_strings(["truck", "bus"]))  # only the new phrase runs
    assert sum(calls) == len(DEFAULT_TEMPLATES)

    calls.clear()
    TextEncoder(tiny, templates=["a {}"], cache_dir=tmp_path).encode(vocab)  # other key
    assert sum(calls) == 3
    assert len(list(tmp_path.glob("text_*.pt"))) == 2

    other_model = load_clip(tiny_clip_config(seed=1))
    assert TextEncoder(other_model, cache_dir=tmp_path).cache_key() != again.cache_key()

    again.cache_path.write_bytes(b"garbage")
    calls.clear()
    with caplog.at_level(logging.WARNING):
        redo = TextEncoder(tiny, cache_dir=tmp_path).encode(vocab)
    assert torch.equal(redo, first) and sum(calls) == 3 * len(DEFAULT_TEMPLATES)
    assert any("unreadable text cache" in r.message for r in caplog.records)


# --- embedding banks ----------------------------------------------------------------------------


def test_bank_round_trip_and_lookup_equals_text_encoder(tiny, tmp_path):
    enc = TextEncoder(tiny)
    bank = EmbeddingBank.from_text_encoder(enc, ["car|automobile", "truck", "traffic cone"])
    assert bank.names == ["car", "automobile", "truck", "traffic cone"]
    path = bank.save(tmp_path / "bank.pt")
    loaded = EmbeddingBank.load(path)
    assert loaded.names == bank.names and loaded.identity == tiny.identity
    assert torch.equal(loaded.vectors, bank.vectors)

    vocab = Vocabulary.from_strings(["Truck", "automobile|car", "traffic cone"])
    torch.testing.assert_close(loaded.lookup(vocab), enc.encode(vocab), atol=1e-6, rtol=0)
    spelled = Vocabulary.from_strings(["TRUCK", "automobile|car", "traffic_cone"])  # case and '_' free
    assert torch.equal(loaded.lookup(spelled), loaded.lookup(vocab))
    with pytest.raises(VocabularyError, match="'bus'"):
        loaded.lookup(Vocabulary.from_strings(["car", "bus|coach"]))
    loaded.check_identity(tiny.identity)
    with pytest.raises(ClipLoadError, match="expects"):
        loaded.check_identity(dataclasses.replace(tiny.identity, source="random:1"))
    with pytest.raises(VocabularyError, match="not found"):
        EmbeddingBank.load(tmp_path / "missing.pt")
    torch.save({"format": "other"}, tmp_path / "other.pt")
    with pytest.raises(VocabularyError, match="not a clip3d-text-bank"):
        EmbeddingBank.load(tmp_path / "other.pt")


def test_real_detic_clip_embeddings(shared_data):
    folder = shared_data / "clip_text_embeddings"
    banks = {ds: EmbeddingBank.from_detic(folder, ds) for ds in ("lvis", "coco", "objects365")}
    assert [len(b) for b in banks.values()] == [1203, 80, 365]
    vocab = Vocabulary.from_strings(["car", "truck", "banana", "bus", "traffic light"])
    for name, bank in banks.items():
        assert bank.identity.embed_dim == 512
        torch.testing.assert_close(bank.vectors.norm(dim=1), torch.ones(len(bank)))
        car, truck, banana, bus, _ = bank.lookup(vocab)
        assert car @ truck > car @ banana + 0.05, name  # real CLIP semantics
        assert car @ bus > car @ banana, name
    # Same prompt "a {name}" in different files gives the same vector only if the name order is right.
    coco, o365, lvis = banks["coco"], banks["objects365"], banks["lvis"]
    shared = [n for n in COCO_CLASSES if n in o365]
    assert len(shared) > 60
    cos = (coco.phrase_vectors(shared) * o365.phrase_vectors(shared)).sum(1)
    assert cos.min() > 0.999
    single = [n for n in COCO_CLASSES if " " not in n and n in lvis.names]
    cos = (coco.phrase_vectors(single) * lvis.phrase_vectors(single)).sum(1)
    assert len(single) > 40 and cos.min() > 0.999
    assert "car" in lvis and "automobile" in lvis  # LVIS synonyms / "car_(automobile)" aliases


# --- command line -------------------------------------------------------------------------------


def test_text_bank_command(tmp_path, tiny_file, capsys):
    from clip3d_core.cli import main

    out = tmp_path / "bank.pt"
    rc = main(["text-bank", "--clip-model", "clip3d-tiny", "--allow-random", "--vocabulary", "car|automobile",
               "truck", "--out", str(out)])
    assert rc == 0 and "clip3d-tiny" in capsys.readouterr().out
    bank = EmbeddingBank.load(out)
    assert bank.identity.source == "random:0" and bank.names == ["car", "automobile", "truck"]
    assert bank.lookup(Vocabulary.from_strings(["car|automobile"])).shape == (1, 32)

    rc = main(["text-bank", "--clip-model", "clip3d-tiny", "--clip-checkpoint", str(tiny_file),
               "--vocabulary", "truck", "--out", str(out)])
    assert rc == 0 and EmbeddingBank.load(out).identity.source.startswith("file:")
    rc = main(["text-bank", "--clip-model", "clip3d-tiny", "--clip-checkpoint", str(tmp_path / "no.pt"),
               "--vocabulary", "truck", "--out", str(tmp_path / "x.pt")])
    assert rc == 2 and not (tmp_path / "x.pt").exists()
    with pytest.raises(SystemExit):
        main(["text-bank", "--clip-model", "clip3d-tiny", "--vocabulary", "car", "--out", str(out)])
