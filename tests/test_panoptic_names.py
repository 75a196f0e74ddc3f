"""A class with several names scores the maximum over its names (arXiv 2401.02402's head), with one
text row per name built by one function (`clip.text.name_embeddings`) from a text tower or a stored
bank, and used by panoptic training, evaluation (`clip3d evaluate`) and the `Segmenter`."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import clip3d_core  # noqa: F401  (compat shims first)
from clip3d_core import segmenter as segmenter_module
from clip3d_core.clip import EmbeddingBank, TextEncoder, Vocabulary, load_clip, tiny_clip_config
from clip3d_core.data.panoptic import load_panoptic_split
from clip3d_core.model.panoptic import OpenVocabClassifier
from clip3d_core.segmenter import Segmenter
from clip3d_core.testing import PANOPTIC_VOCABULARY, tiny_panoptic_checkpoint
from clip3d_core.training import load_train_config
from clip3d_core.training import validation as validation_module
from clip3d_core.training.panoptic_trainer import PanopticTrainer

CONFIG = Path(__file__).resolve().parents[1] / "training" / "synthetic_panoptic_tiny.yaml"


@pytest.fixture(scope="module")
def loaded():
    return load_clip(tiny_clip_config())


def spy_on(monkeypatch, module) -> list[dict]:
    """Record the text and name classes `predict_panoptic` receives in ``module``."""
    calls: list[dict] = []
    real = module.predict_panoptic

    def spy(model, points, text, thing, **kwargs):
        calls.append({"text": text.detach().cpu(), "name_class": kwargs.get("name_class")})
        return real(model, points, text, thing, **kwargs)

    monkeypatch.setattr(module, "predict_panoptic", spy)
    return calls


def test_name_rows_from_a_text_tower_and_a_bank(loaded) -> None:
    vocab = Vocabulary.from_strings(["car|automobile", "road", "person|pedestrian|walker"])
    encoder = TextEncoder(loaded)
    names = encoder.encode_names(vocab)
    phrases = ["car", "automobile", "road", "person", "pedestrian", "walker"]
    assert torch.equal(names.text, encoder.encode_phrases(phrases))
    assert names.name_class.tolist() == [0, 0, 1, 2, 2, 2] and names.num_classes == 3
    assert torch.equal(names.class_vectors(), encoder.encode(vocab))  # the semantic rows: synonyms averaged
    bank = EmbeddingBank.from_text_encoder(encoder, vocab.to_strings())
    from_bank = bank.lookup_names(vocab)  # a checkpoint's bank holds one vector per phrase
    assert torch.equal(from_bank.name_class, names.name_class)
    assert torch.allclose(from_bank.text, names.text, atol=1e-6)  # the bank renormalises its rows
    assert torch.equal(bank.lookup(vocab), from_bank.class_vectors())
    # spellings the bank treats as one phrase (nuScenes lists both) keep the first one's vector
    spelled = Vocabulary.from_strings(["traffic_cone|traffic cone", "road"])
    both = EmbeddingBank.from_text_encoder(encoder, spelled.to_strings()).lookup_names(spelled)
    assert torch.equal(both.text[0], both.text[1]) and both.name_class.tolist() == [0, 0, 1]


def test_a_class_scores_the_cosine_of_its_best_matching_name(loaded) -> None:
    d = loaded.identity.embed_dim
    car, automobile, road = F.normalize(torch.randn(3, d, generator=torch.Generator().manual_seed(0)), dim=1)
    bank = EmbeddingBank(["car", "automobile", "road"], torch.stack([car, automobile, road]), loaded.identity)
    names = bank.lookup_names(Vocabulary.from_strings(["car|automobile", "road"]))
    head = OpenVocabClassifier(init_scale=10.0, init_bias=-4.0).requires_grad_(False)
    query = automobile.unsqueeze(0)  # a query embedding equal to the second name of class 0
    logits = head(query, names.text, names.name_class, names.num_classes)
    scale, bias = float(head.scale), float(head.bias)
    assert float(logits[0, 0]) == pytest.approx(scale * 1.0 + bias)  # cos(query, automobile) = 1
    assert float(logits[0, 1]) == pytest.approx(scale * float(automobile @ road) + bias)
    averaged = head(query, names.class_vectors())  # the synonym-averaged row scores less
    assert float(averaged[0, 0]) < float(logits[0, 0]) - 1.0


@pytest.mark.parametrize("use_bank", [False, True])
def test_segmenter_scores_every_name(tmp_path: Path, monkeypatch, loaded, use_bank: bool) -> None:
    """Text tower or a phrase bank (what checkpoints store: one vector per phrase): one row per name."""
    bank = EmbeddingBank.from_text_encoder(TextEncoder(loaded), PANOPTIC_VOCABULARY) if use_bank else None
    seg = Segmenter.from_checkpoint(tiny_panoptic_checkpoint(tmp_path / "p.pt"), embedding_bank=bank)
    vocab = seg.vocabulary
    assert vocab is not None and isinstance(seg.text_source, EmbeddingBank) == use_bank
    rows = sum(len(e.synonyms) for e in vocab.entries)
    assert rows > len(vocab) and seg.text_embeddings.shape[0] == rows
    calls = spy_on(monkeypatch, segmenter_module)
    points = torch.randn(2000, 4, generator=torch.Generator().manual_seed(1)).numpy() * 8
    seg.segment(points)
    assert calls[0]["name_class"].tolist() == [i for i, e in enumerate(vocab.entries) for _ in e.synonyms]
    phrases = [name for e in vocab.entries for name in e.synonyms]
    source = seg.text_source
    expected = source.phrase_vectors(phrases) if bank else source.encode_phrases(phrases)
    assert torch.allclose(calls[0]["text"], expected, atol=1e-6)
    if bank is None:  # a live vocabulary with a new synonym grows the rows; the network is untouched
        seg.set_vocabulary([*PANOPTIC_VOCABULARY[:-1], "vegetation|bush"])
        assert seg.text_embeddings.shape[0] == rows + 1


def test_evaluation_scores_every_name(tmp_path: Path, monkeypatch) -> None:
    vocab = list(load_panoptic_split("synthetic_b13n4").semantic.vocabulary)
    tree = vocab.index("tree")
    vocab[tree] = "tree|bush"  # the class gets a second name
    cfg = load_train_config(CONFIG, ["data.options.val_frames=1", "trainer.precise_bn_batches=0",
                                     f"vocabulary={vocab}"])
    trainer = PanopticTrainer(cfg, out_dir=tmp_path)
    assert trainer.task.names.name_class.tolist().count(tree) == 2  # training sees both names too
    calls = spy_on(monkeypatch, validation_module)
    trainer.evaluate()
    owners = calls[0]["name_class"].tolist()
    assert len(owners) == len(vocab) + 1 and owners.count(tree) == 2
    phrases = [name for entry in vocab for name in entry.split("|")]
    assert torch.equal(calls[0]["text"], trainer.bank.phrase_vectors(phrases))
