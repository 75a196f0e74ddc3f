"""GPU checks (marker ``gpu``; skipped without CUDA). Run by benchmarks/gpu/check.sh on a GPU
machine: `pytest -m gpu tests/test_gpu.py`.

The segmenter on CUDA matches the CPU within tolerance, both sparse backends give the same labels,
fp16 labels equal fp32 labels on >= 99.5 % of points, the image stream and pinned buffers change
nothing but speed, a training step and a two-rank NCCL DDP step run, timers wait for the right
device. Models have random weights with non-trivial BatchNorm statistics (a trained model has
larger logit margins, so label agreement here is the harder case).
"""

from __future__ import annotations

import copy
import importlib.util
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

import clip3d_core  # noqa: F401  (compat fixes before spconv)
from clip3d_core import SegmentationResult, Segmenter
from clip3d_core.clip import ClipIdentity, Vocabulary, load_clip, tiny_clip_config
from clip3d_core.clip.dense import DenseClipEncoder
from clip3d_core.commands.bench import bench_cloud, ring_cameras
from clip3d_core.model import Clip3DNet, ModelConfig, sparse_backend
from clip3d_core.runtime import RuntimeOptions, StageTimer

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

CLASSES = 20
CUDA = torch.device("cuda")


def cuda_backends() -> list[str]:
    if not torch.cuda.is_available():
        return []
    status = sparse_backend.available()
    return [b for b in sparse_backend.BACKENDS
            if status[b] is None and (b != "spconv" or sparse_backend.spconv_has_cuda())]


def with_backends(test):  # one test per backend that can run on this GPU
    backends = cuda_backends()
    params = backends or [pytest.param(None, marks=pytest.mark.skip(reason="no sparse backend runs on CUDA"))]
    return pytest.mark.parametrize("backend", params)(test)


def random_model(cfg: ModelConfig, backend: str | None = None) -> Clip3DNet:
    torch.manual_seed(0)
    net = Clip3DNet(cfg, backend=backend).eval()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm1d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
    return net


def on_backend(model: Clip3DNet, backend: str) -> Clip3DNet:
    """The same weights on another backend (checkpoints are interchangeable)."""
    net = Clip3DNet(model.cfg, backend=backend).eval()
    net.load_state_dict(model.state_dict(), strict=True)
    return net


def segmenter(model: Clip3DNet, device: torch.device, runtime: RuntimeOptions | None = None,
              dense: DenseClipEncoder | None = None) -> Segmenter:
    seg = Segmenter(model, ClipIdentity("test", "random:0", model.cfg.embed_dim), device=device,
                    runtime=runtime, dense=dense)
    vocab = Vocabulary.from_strings([f"class {i}" for i in range(CLASSES)], version=1)
    text = torch.randn(CLASSES, model.cfg.embed_dim, generator=torch.Generator().manual_seed(1))
    seg.swap_vocabulary(vocab, text)
    return seg


def segment(model: Clip3DNet, device: torch.device, points: np.ndarray,
            runtime: RuntimeOptions | None = None) -> SegmentationResult:
    return segmenter(model, device, runtime).segment(points, return_features=True)


@pytest.fixture(scope="module")
def points() -> np.ndarray:
    return bench_cloud(30000, None)[0]  # the real scan when carried, else synthetic


@pytest.fixture(scope="module")
def model() -> Clip3DNet:
    """The LiDAR-only small preset (512-d) built on CPU (the automatic backend: construction only;
    every test moves its weights onto the backend it runs)."""
    return random_model(ModelConfig.small())


def agreement(a: SegmentationResult, b: SegmentationResult) -> float:
    assert np.array_equal(a.valid, b.valid)
    return float((a.labels == b.labels)[a.valid].mean())


def test_cuda_matches_cpu(model: Clip3DNet, points: np.ndarray) -> None:
    if sparse_backend.available()["spconv"] is not None:
        pytest.skip("no CPU sparse backend installed (spconv) for the reference")
    ref = segment(on_backend(model, "spconv"), torch.device("cpu"), points)
    for backend in cuda_backends():
        out = segment(on_backend(model, backend), CUDA, points)
        err = np.abs(out.features - ref.features).max()
        assert err < 2e-3, (backend, err)
        assert agreement(out, ref) >= 0.999, backend
        np.testing.assert_allclose(out.scores, ref.scores, atol=2e-3)


def test_both_backends_give_the_same_labels(model: Clip3DNet, points: np.ndarray) -> None:
    if len(cuda_backends()) < 2:
        pytest.skip(f"both backends on CUDA needed, have {cuda_backends()} (spconv-cu126: two-call install)")
    a = segment(on_backend(model, "spconv"), CUDA, points)
    b = segment(on_backend(model, "spconv_triton"), CUDA, points)
    assert np.abs(a.features - b.features).max() < 2e-3
    assert agreement(a, b) >= 0.999


@with_backends
@pytest.mark.parametrize(("precision", "bar"), [("fp16", 0.995), ("bf16", 0.99)])
def test_half_precision_labels_equal_fp32_labels(
    model: Clip3DNet, points: np.ndarray, backend: str, precision: str, bar: float, record_property
) -> None:
    """fp16: the issue's bar (>= 99.5 % of points). bf16 keeps 8 bits of mantissa: a looser bar."""
    ref = segment(on_backend(model, backend), CUDA, points)
    out = segment(on_backend(model, backend), CUDA, points, RuntimeOptions(precision=precision))
    agree = agreement(out, ref)
    record_property("label_agreement", round(agree, 5))
    assert agree >= bar, agree
    assert np.isfinite(out.scores).all()


@with_backends
def test_frames_from_two_threads_share_the_buffers_safely(
    model: Clip3DNet, points: np.ndarray, backend: str
) -> None:
    seg = segmenter(on_backend(model, backend), CUDA)
    halves = (points[: len(points) // 2], points[len(points) // 2 :])
    serial = [seg.segment(h) for h in halves]
    results: dict[int, list[SegmentationResult]] = {0: [], 1: []}

    def worker(i: int) -> None:
        results[i] += [seg.segment(halves[i]) for _ in range(3)]

    threads = [threading.Thread(target=worker, args=(i,)) for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in (0, 1):
        for out in results[i]:
            assert agreement(out, serial[i]) >= 0.999


@with_backends
def test_image_stream_changes_nothing_but_timing(backend: str, points: np.ndarray) -> None:
    loaded = load_clip(tiny_clip_config(), CUDA)
    net = random_model(ModelConfig.small(embed_dim=loaded.embed_dim, fusion=True), backend)
    cams = ring_cameras(6, 96, 160)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (96, 160, 3), dtype=np.uint8) for _ in cams]
    outs = []
    for stream in (False, True):
        runtime = RuntimeOptions(image_stream=stream)
        seg = segmenter(copy.deepcopy(net), CUDA, runtime, DenseClipEncoder(loaded))
        outs.append(seg.segment(points, images, cams, return_features=True))
    assert "image" in outs[1].timings_ms
    np.testing.assert_allclose(outs[0].features, outs[1].features, atol=1e-5)


def test_timers_wait_for_the_segmenters_device() -> None:
    dev = torch.device("cuda", torch.cuda.device_count() - 1)  # the last GPU: not current when > 1
    a = torch.randn(4096, 4096, device=dev)
    for sync in (False, True):
        timer = StageTimer(dev, sync=sync)
        for _ in range(20):
            b = a @ a
        timer.lap("matmul")
        times = timer.total()
        assert torch.cuda.current_stream(dev).query()  # all of the device's work was waited for
        assert times["total"] >= times["matmul"] > 0.1, times  # 20 x 137 GFLOP: not a launch time
    del b


@pytest.mark.parametrize("amp", ["bf16", "off"])
def test_a_training_step_runs_on_cuda(tmp_path: Path, frame_cache: Path, amp: str) -> None:
    from clip3d_core.training import Trainer, load_train_config

    repo = Path(__file__).resolve().parents[1]
    cfg = load_train_config(str(repo / "training" / "synthetic_tiny.yaml"), [
        "trainer.device=cuda", f"trainer.amp={amp}", "trainer.iterations=3", "self_training.enabled=false",
        "trainer.checkpoint_every=3", "trainer.precise_bn_batches=1", "data.options.train_frames=4",
        "data.options.val_frames=2", f"data.options.cache_dir={frame_cache}",
    ])
    trainer = Trainer(cfg, out_dir=tmp_path / "run")
    init = {k: v.detach().clone() for k, v in trainer.bare.state_dict().items()}
    result = trainer.fit()
    final = trainer.bare.state_dict()
    assert next(trainer.bare.parameters()).is_cuda and result.iterations == 3
    assert all(torch.isfinite(v).all() for v in final.values() if v.is_floating_point())
    moved = [k for k, v in final.items() if v.is_floating_point() and not torch.equal(v, init[k])]
    assert len(moved) > len(final) // 2


def test_two_rank_ddp_step_with_nccl(tmp_path: Path) -> None:
    if torch.cuda.device_count() < 2:
        pytest.skip("two-rank NCCL needs two GPUs")
    if importlib.util.find_spec("test_ddp") is None:
        pytest.skip("tests/test_ddp.py not importable")
    from test_ddp import run_two_ranks

    run_two_ranks(tmp_path, "nccl", ("trainer.device=cuda",))


@with_backends
def test_pinned_buffers_are_reused_and_tf32_compile_keep_labels(
    model: Clip3DNet, points: np.ndarray, backend: str
) -> None:
    seg = segmenter(on_backend(model, backend), CUDA, RuntimeOptions(tf32=True, compile=True))
    first = seg.segment(points)
    allocated = seg.runtime.buffers.allocations
    assert allocated > 0 and all(b.is_pinned() for b in seg.runtime.buffers._buffers.values())
    for n in (len(points), len(points) // 2, 0):  # same size, smaller, empty: no new host buffers
        out = seg.segment(points[:n])
        assert seg.runtime.buffers.allocations == allocated and len(out.labels) == n
    ref = segment(on_backend(model, backend), CUDA, points)
    assert agreement(first, ref) >= 0.995  # TF32 products and compiled heads
