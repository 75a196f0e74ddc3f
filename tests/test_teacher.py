"""Teachers: the simulated teacher's construction, degradations and accuracy; the real CLIP wrapper;
per-point targets feeding pseudo labels and the MCFA losses."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from clip3d_core.clip import (
    DenseClipEncoder,
    EmbeddingBank,
    TextEncoder,
    Vocabulary,
    load_clip,
    tiny_clip_config,
)
from clip3d_core.config import from_dict, to_dict
from clip3d_core.data import Frame
from clip3d_core.data.synthetic import SyntheticConfig, SyntheticWorldDataset
from clip3d_core.data.synthetic.teacher import (
    DEFAULT_CONFUSIONS,
    SimulatedTeacher,
    SimulatedTeacherConfig,
    calibrate_noise_sigma,
    confusion_matrix,
)
from clip3d_core.geometry import PinholeCamera, project_points
from clip3d_core.losses import semantic_alignment_loss, spatial_alignment_loss
from clip3d_core.pseudo_labels import (
    label_quality,
    mask_classes,
    merge_labels,
    point_pseudo_labels,
)
from clip3d_core.teacher import (
    ClipTeacher,
    PointTargets,
    Teacher,
    TeacherError,
    TeacherOutput,
    frame_point_targets,
)

# Optical frame of a camera looking along LiDAR +x: x_cam = -y, y_cam = -z, z_cam = x.
T_FRONT = np.array([[0, -1, 0, 0], [0, 0, -1, 0], [1, 0, 0, 0], [0, 0, 0, 1]], dtype=np.float64)
NAMES = ("road", "car", "truck", "bus", "pole")


def wall_frame(
    class_names, regions, *, h=64, w=96, frame_id="wall-0", depth=10.0, step=1, instances=None
) -> Frame:
    """One camera facing a wall of points at `depth`, one point per `step`-th pixel, labelled like
    the pixel it projects to. `regions`: (class, r0, r1, c0, c1) rectangles painted in order."""
    labels = np.full((h, w), -1, dtype=np.int64)
    for cls, r0, r1, c0, c1 in regions:
        labels[r0:r1, c0:c1] = cls
    cam = PinholeCamera("CAM_FRONT", np.array([[50.0, 0, w / 2], [0, 50.0, h / 2], [0, 0, 1]]), w, h, T_FRONT)
    v, u = np.mgrid[0:h:step, 0:w:step].reshape(2, -1)
    x_cam, y_cam = (u - w / 2) / 50.0 * depth, (v - h / 2) / 50.0 * depth
    xyz = np.stack([np.full_like(x_cam, depth), -x_cam, -y_cam, np.zeros_like(x_cam)], 1)
    inst = instances if instances is not None else np.zeros((h, w), dtype=np.int64)
    return Frame(points=xyz.astype(np.float32), labels=labels[v, u], instances=inst[v, u],
                 images=[np.zeros((h, w, 3), np.uint8)], cameras=[cam], class_names=tuple(class_names),
                 frame_id=frame_id, pixel_labels=[labels], pixel_instances=[inst]).validate()


def clean(**kw) -> SimulatedTeacherConfig:
    return SimulatedTeacherConfig(**{"noise": 0.0, "confusion_prob": 0.0, "patch_size": 8, **kw})


TEXT = F.normalize(torch.randn(len(NAMES), 16, generator=torch.Generator().manual_seed(0)), dim=1)


# ------------------------------------------------------------------ construction of the features


def test_clean_teacher_reproduces_class_text_and_area_mixing():
    # road on the top half, a car block aligned on patches, a pole 3 px wide inside one patch column.
    frame = wall_frame(NAMES, [(0, 0, 64, 0, 96), (1, 32, 48, 16, 40), (4, 0, 32, 64, 67)])
    out = SimulatedTeacher(clean())(frame, TEXT)
    assert isinstance(out, TeacherOutput) and out.embed_dim == 16 and len(out.features) == 1
    feats, grid = out.features[0], out.grids[0]
    assert grid.grid_hw == (8, 12) and grid.image_hw == (64, 96) and feats.shape == (16, 8, 12)
    torch.testing.assert_close(feats.norm(dim=0), torch.ones(8, 12))
    torch.testing.assert_close(feats[:, 0, 0], TEXT[0])  # pure road
    torch.testing.assert_close(feats[:, 4, 2], TEXT[1])  # pure car
    # Pole patch column 8 (pixels 64..71): 3 px pole, 5 px road -> normalise(3/8 pole + 5/8 road).
    torch.testing.assert_close(feats[:, 1, 8], F.normalize(3 / 8 * TEXT[4] + 5 / 8 * TEXT[0], dim=0))
    majority = SimulatedTeacher(clean(mixing="majority"))(frame, TEXT).features[0]
    torch.testing.assert_close(majority[:, 1, 8], TEXT[0])  # the thin pole vanishes into the road


def test_confusion_matrix_from_names():
    m = confusion_matrix(("Road", "car", "Truck", "bus", "traffic-sign", "pole"),
                         {"truck": "car", "bus": "truck", "traffic sign": "pole", "trailer": "truck"}, 0.25)
    assert m[2, 1] == 0.25 and m[2, 2] == 0.75 and m[3, 2] == 0.25 and m[4, 5] == 0.25
    assert m[0, 0] == 1.0 and m[1, 1] == 1.0  # no rule: identity; "trailer" absent: skipped
    torch.testing.assert_close(m.sum(1), torch.ones(6, dtype=torch.float64))


def test_full_confusion_shows_partner_class_without_chaining():
    frame = wall_frame(NAMES, [(0, 0, 64, 0, 96), (2, 0, 32, 0, 48), (3, 32, 64, 0, 48)])
    cfg = clean(confusion_prob=1.0, confusions={"truck": "car", "bus": "truck"})
    feats = SimulatedTeacher(cfg)(frame, TEXT).features[0]
    torch.testing.assert_close(feats[:, 0, 0], TEXT[1])  # truck shown as car
    torch.testing.assert_close(feats[:, 6, 0], TEXT[2])  # bus shown as truck (not car)
    torch.testing.assert_close(feats[:, 0, 10], TEXT[0])  # road untouched


def _truck_blocks() -> tuple[list, np.ndarray]:
    regions, inst = [(0, 0, 64, 0, 96)], np.zeros((64, 96), dtype=np.int64)
    for k in range(12):  # twelve 16 x 16 trucks, each its own instance, each 2 x 2 patches
        r, c = 16 * (k // 6) + 16, 16 * (k % 6)
        regions.append((2, r, r + 16, c, c + 16))
        inst[r:r + 16, c:c + 16] = k + 1
    return regions, inst


def test_instance_level_confusion_is_consistent_per_object():
    regions, inst = _truck_blocks()
    shown_car = 0
    for seed in range(4):
        frame = wall_frame(NAMES, regions, instances=inst, frame_id=f"trucks-{seed}")
        feats = SimulatedTeacher(clean(confusion_prob=0.5, seed=seed))(frame, TEXT).features[0]
        for k in range(12):
            r, c = 2 * (k // 6) + 2, 2 * (k % 6)
            block = feats[:, r:r + 2, c:c + 2].reshape(16, 4).t()
            assert torch.allclose(block, block[:1].expand(4, -1))  # one decision per object
            shown_car += bool(torch.allclose(block[0], TEXT[1]))
    assert 12 <= shown_car <= 36  # about half of 48 objects
    # Per-patch confusion splits objects.
    frame = wall_frame(NAMES, regions, instances=inst)
    feats = SimulatedTeacher(clean(confusion_prob=0.5, confusion_unit="patch"))(frame, TEXT).features[0]
    blocks = [feats[:, 2 * (k // 6) + 2:2 * (k // 6) + 4, 2 * (k % 6):2 * (k % 6) + 2].reshape(16, 4).t()
              for k in range(12)]
    assert any(not torch.allclose(b, b[:1].expand(4, -1)) for b in blocks)


def test_deterministic_per_seed_and_frame():
    regions, inst = _truck_blocks()
    frame = wall_frame(NAMES, regions, instances=inst)
    cfg = SimulatedTeacherConfig(patch_size=8, seed=3)
    a = SimulatedTeacher(cfg)(frame, TEXT).features[0]
    assert torch.equal(a, SimulatedTeacher(cfg)(frame, TEXT).features[0])
    reseeded = SimulatedTeacher(SimulatedTeacherConfig(patch_size=8, seed=4))(frame, TEXT).features[0]
    assert not torch.equal(a, reseeded)
    other = wall_frame(NAMES, regions, instances=inst, frame_id="wall-1")
    assert not torch.equal(a, SimulatedTeacher(cfg)(other, TEXT).features[0])


def test_simulated_teacher_rejects_bad_inputs():
    frame = wall_frame(NAMES, [(0, 0, 64, 0, 96)])
    with pytest.raises(TeacherError, match="one row per class"):
        SimulatedTeacher()(frame, TEXT[:3])
    frame.pixel_labels = None
    with pytest.raises(TeacherError, match="pixel"):
        SimulatedTeacher()(frame, TEXT)
    for bad in (dict(noise=1.0), dict(confusion_prob=1.5), dict(patch_size=0), dict(mixing="max"),
                dict(confusion_unit="object")):
        with pytest.raises(TeacherError):
            SimulatedTeacher(SimulatedTeacherConfig(**bad))


def test_config_from_dict_round_trip():
    cfg = from_dict(SimulatedTeacherConfig, {"noise": 0.1, "confusions": {"bus": "car"}, "seed": 2})
    assert cfg.confusions == {"bus": "car"} and cfg.validate().noise == 0.1
    assert from_dict(SimulatedTeacherConfig, to_dict(cfg)) == cfg
    assert SimulatedTeacherConfig().confusions == DEFAULT_CONFUSIONS


@pytest.mark.parametrize("kind", ["random512", "correlated32"])
def test_noise_calibration_hits_the_error_rate(kind):
    g = torch.Generator().manual_seed(1)
    if kind == "random512":
        text = torch.randn(17, 512, generator=g)
    else:  # like a random tiny text tower: embeddings crowded around one direction
        text = torch.randn(1, 32, generator=g) + 0.15 * torch.randn(17, 32, generator=g)
    tn = F.normalize(text, dim=1)
    y = torch.arange(17).repeat(600)
    for target in (0.1, 0.4):
        sigma = calibrate_noise_sigma(text, target)
        noisy = tn[y] + sigma * torch.randn(len(y), text.shape[1], generator=g)
        error = float(((noisy @ tn.t()).argmax(1) != y).float().mean())
        assert abs(error - target) < 0.025, (kind, target, error)
    assert calibrate_noise_sigma(text, 0.0) == 0.0
    with pytest.raises(TeacherError, match="chance"):
        calibrate_noise_sigma(text, 16 / 17)


# ------------------------------------------------------------------ per-point targets


def test_point_targets_patch_ids_sampling_and_cat():
    frame = wall_frame(NAMES, [(0, 0, 64, 0, 96), (1, 32, 48, 16, 40)], step=4)
    behind = np.array([[-5.0, 0.0, 0.0, 0.0]], dtype=np.float32)  # behind the camera: no pixel
    frame.points = np.concatenate([frame.points, behind])
    frame.labels = np.concatenate([frame.labels, [-1]])
    frame.instances = None
    teacher = SimulatedTeacher(SimulatedTeacherConfig(patch_size=8, noise=0.2))
    out, bil = frame_point_targets(teacher, frame, TEXT)
    cam, uv = project_points(torch.from_numpy(frame.points[:, :3]), frame.cameras).first_visible()
    near = out.point_targets(cam, uv, sampling="nearest")
    n = frame.num_points
    assert bil.visible[:-1].all() and not bil.visible[-1] and bil.patch_index[-1] == -1
    assert torch.equal(near.patch_index[:-1], out.grids[0].pixel_to_patch(uv[:-1]))
    assert torch.equal(near.features[:-1], out.patch_features()[near.patch_index[:-1]])
    assert torch.equal(bil.features[-1], torch.zeros(16)) and bil.features.shape == (n, 16)
    torch.testing.assert_close(bil.features[:-1].norm(dim=1), torch.ones(n - 1))
    # A point at a patch centre reads that patch's feature under bilinear sampling too.
    centre = (uv[:, 0] % 8 == 4) & (uv[:, 1] % 8 == 4)
    assert bool(centre.any())
    torch.testing.assert_close(bil.features[centre], near.features[centre], atol=1e-5, rtol=0)
    both = PointTargets.cat([bil, near])
    p = out.patch_features().shape[0]
    assert both.patch_features.shape[0] == 2 * p and both.features.shape[0] == 2 * n
    assert both.patch_index[n - 1] == -1 and torch.equal(both.patch_index[n:-1], near.patch_index[:-1] + p)
    with pytest.raises(TeacherError):
        out.point_targets(cam, uv, sampling="cubic")


# ------------------------------------------------------------------ accuracy on the synthetic world


@pytest.fixture(scope="module")
def synthetic():
    ds = SyntheticWorldDataset(SyntheticConfig.surround(seed=0), length=2)
    frames = [ds[i] for i in range(2)]
    proj = [project_points(torch.from_numpy(f.points[:, :3]), f.cameras).first_visible() for f in frames]
    loaded = load_clip(tiny_clip_config())
    tiny_text = TextEncoder(loaded).encode(Vocabulary.from_strings(list(frames[0].class_names)))
    return frames, proj, tiny_text


def _accuracy(frames, proj, text, cfg) -> float:
    teacher = SimulatedTeacher(cfg)
    hits = total = 0
    for frame, (cam, uv) in zip(frames, proj):
        t = teacher(frame, text).point_targets(cam, uv)
        pseudo = point_pseudo_labels(t.features, t.visible, text).labels
        q = label_quality(pseudo, torch.from_numpy(frame.labels))
        hits += q["accuracy"] * q["coverage"] * q["points"]
        total += q["coverage"] * q["points"]
    return hits / total


@pytest.mark.parametrize("text_kind", ["tiny_clip", "random512"])
def test_accuracy_falls_with_noise_and_confusion_and_defaults_in_band(synthetic, text_kind):
    frames, proj, tiny_text = synthetic
    text = tiny_text if text_kind == "tiny_clip" else torch.randn(len(frames[0].class_names), 512)
    by_noise = [_accuracy(frames, proj, text, SimulatedTeacherConfig(noise=v)) for v in (0.0, 0.3, 0.6)]
    by_conf = [_accuracy(frames, proj, text, SimulatedTeacherConfig(confusion_prob=v)) for v in (0.0, 0.8)]
    assert by_noise[0] > by_noise[1] + 0.05 > by_noise[2] + 0.1, by_noise
    assert by_conf[0] > by_conf[1] + 0.03, by_conf
    assert 0.5 <= by_noise[1] <= 0.85, by_noise  # the defaults (noise 0.3, confusion 0.3)
    perfect = _accuracy(frames, proj, text, SimulatedTeacherConfig(noise=0.0, confusion_prob=0.0))
    assert perfect > 0.9  # what remains is patch blur at boundaries and projection parallax


def test_zero_shot_labels_and_losses_from_the_simulated_teacher(synthetic):
    frames, proj, text = synthetic
    frame, (cam, uv) = frames[0], proj[0]
    names = frame.class_names
    unseen = [names.index(n) for n in ("truck", "pedestrian", "traffic sign")]
    targets = SimulatedTeacher()(frame, text).point_targets(cam, uv)
    gt_full = torch.from_numpy(frame.labels)
    gt = mask_classes(gt_full, unseen)
    pseudo = point_pseudo_labels(targets.features, targets.visible, text, restrict_to=unseen)
    merged = merge_labels(gt, pseudo.labels)
    seen_pts = gt >= 0
    assert torch.equal(merged[seen_pts], gt_full[seen_pts])
    filled = (gt < 0) & (merged >= 0)
    assert bool(filled.any()) and bool(torch.isin(merged[filled], torch.tensor(unseen)).all())
    # Most pseudo-labelled unseen points are right (truck/pedestrian/sign are also confused with seen
    # classes; restriction drops those rather than mislabelling).
    assert label_quality(merged[filled], gt_full[filled])["accuracy"] > 0.5
    # 3D features equal to the teacher's align better than random ones, under both MCFA losses.
    vis = targets.visible
    aligned, rand = targets.features[vis], torch.randn(int(vis.sum()), text.shape[1])
    for feats in (aligned, rand):
        assert torch.isfinite(semantic_alignment_loss(feats, merged[vis], targets.features[vis]))
    labels = merged[vis]
    assert semantic_alignment_loss(aligned, labels, aligned) < semantic_alignment_loss(rand, labels, aligned)
    idx, patches = targets.patch_index[vis], targets.patch_features
    assert spatial_alignment_loss(aligned, idx, patches) < spatial_alignment_loss(rand, idx, patches)


def test_real_clip_text_embeddings(shared_data):
    """Detic's released CLIP text embeddings: classes 0.74-0.93 cosine apart. The calibrated noise
    gives the requested patch error and errors land on semantically close classes."""
    names = ("car", "truck", "bus", "person", "bicycle", "motorcycle", "pole", "traffic light", "street sign")
    bank = EmbeddingBank.from_detic(shared_data / "clip_text_embeddings", "lvis")
    text = bank.lookup(Vocabulary.from_strings(list(names)))
    h, w = 144, 192  # 18 x 24 patches of 8 px; patch column k is all class k % 9
    regions = [(k % len(names), 0, h, 8 * k, 8 * k + 8) for k in range(24)]
    teacher = SimulatedTeacher(SimulatedTeacherConfig(patch_size=8, noise=0.3, confusion_prob=0.0))
    preds, gts = [], []
    for i in range(3):
        frame = wall_frame(names, regions, h=h, w=w, step=8, frame_id=f"real-{i}")  # one point per patch
        cam, uv = project_points(torch.from_numpy(frame.points[:, :3]), frame.cameras).first_visible()
        t = teacher(frame, text).point_targets(cam, uv, sampling="nearest")
        preds.append(point_pseudo_labels(t.features, t.visible, text).labels)
        gts.append(torch.from_numpy(frame.labels))
    pred, gt = torch.cat(preds), torch.cat(gts)
    acc = label_quality(pred, gt)["accuracy"]
    assert abs(acc - 0.7) < 0.06, acc
    # Errors favour close classes: the true/wrong class cosine beats the mean true/other cosine.
    wrong = pred != gt
    sims = text @ text.t()
    mean_other = (sims.sum(1) - 1.0) / (len(names) - 1)
    assert float((sims[gt[wrong], pred[wrong]] - mean_other[gt[wrong]]).mean()) > 0.01


# ------------------------------------------------------------------ real CLIP wrapper


def test_clip_teacher_with_tiny_random_clip():
    loaded = load_clip(tiny_clip_config())
    teacher = ClipTeacher(DenseClipEncoder(loaded))
    assert isinstance(teacher, Teacher) and isinstance(SimulatedTeacher(), Teacher)
    rng = np.random.default_rng(0)
    frame = wall_frame(NAMES, [(0, 0, 64, 0, 96)])
    small = PinholeCamera("CAM_SMALL", np.array([[30.0, 0, 32], [0, 30.0, 24], [0, 0, 1]]), 64, 48, T_FRONT)
    frame.images = [rng.integers(0, 255, (hw[0], hw[1], 3), dtype=np.uint8) for hw in ((64, 96), (48, 64))]
    frame.cameras = [frame.cameras[0], small]
    text = TextEncoder(loaded).encode(Vocabulary.from_strings(list(NAMES)))
    out, targets = frame_point_targets(teacher, frame, text)
    assert [g.image_hw for g in out.grids] == [(64, 96), (48, 64)]
    for f, g in zip(out.features, out.grids):
        assert f.shape == (32, *g.grid_hw)
        torch.testing.assert_close(f.norm(dim=0), torch.ones(g.grid_hw))
    assert targets.visible.all() and targets.patch_features.shape[0] == sum(
        g.grid_hw[0] * g.grid_hw[1] for g in out.grids)
    alone = teacher(type("F", (), {"images": frame.images[1:], "cameras": frame.cameras[1:]})(), text)
    torch.testing.assert_close(alone.features[0], out.features[1])  # batching by size changes nothing
    with pytest.raises(TeacherError, match="D="):
        teacher(frame, torch.randn(5, 512))
