"""Runtime options and the sparse-backend choice, on CPU: backend selection, interchangeable
weights across backends, reused host buffers, timers that synchronise the segmenter's own device,
fp16 inference, in-place compilation. The same paths on a GPU: tests/test_gpu.py."""

from __future__ import annotations

import copy
import importlib.util
from typing import ClassVar

import numpy as np
import pytest
import torch

import clip3d_core  # noqa: F401  (compat fixes before spconv)
from clip3d_core import Segmenter
from clip3d_core import runtime as runtime_module
from clip3d_core.clip import ClipIdentity, Vocabulary
from clip3d_core.model import Clip3DNet, ModelConfig, sparse_backend
from clip3d_core.runtime import HostBuffers, Runtime, RuntimeOptionError, RuntimeOptions, StageTimer

D = 16
CFG = ModelConfig.small(embed_dim=D, voxel_size=0.4)


def cloud(n: int = 4000, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    ground = np.column_stack([rng.uniform(-20, 20, (n // 2, 2)), rng.normal(-1.7, 0.05, n // 2)])
    boxes = rng.uniform([-20, -20, -1.7], [20, 20, 1.5], (n - n // 2, 3))
    return np.column_stack([np.concatenate([ground, boxes]), rng.uniform(0, 1, n)]).astype(np.float32)


def segmenter(model: Clip3DNet, runtime: RuntimeOptions | None = None) -> Segmenter:
    seg = Segmenter(model, ClipIdentity("test", "random:0", D), runtime=runtime)
    vocab = Vocabulary.from_strings([f"class {i}" for i in range(8)], version=1)
    seg.swap_vocabulary(vocab, torch.randn(len(vocab), D, generator=torch.Generator().manual_seed(1)))
    return seg


@pytest.fixture(scope="module")
def model() -> Clip3DNet:
    torch.manual_seed(0)
    net = Clip3DNet(CFG).eval()
    with torch.no_grad():  # non-trivial BN statistics, so precision differences would show
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm1d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
    return net


# ---------------------------------------------------------------------- backend choice
def fake_status(
    monkeypatch: pytest.MonkeyPatch, spconv_cuda: bool, triton: bool, spconv: bool = True, cuda: bool = True
) -> None:
    monkeypatch.setattr(sparse_backend, "spconv_has_cuda", lambda: spconv_cuda)
    monkeypatch.setattr(sparse_backend, "_cuda_available", lambda: cuda)
    monkeypatch.setattr(
        sparse_backend,
        "available",
        lambda: {
            "spconv": None if spconv else "spconv is not installed",
            "spconv_triton": None if triton else "not installed",
        },
    )


def test_automatic_backend_prefers_spconv_cuda_then_triton_then_cpu_spconv(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(sparse_backend.ENV_VAR, raising=False)
    fake_status(monkeypatch, spconv_cuda=True, triton=True)
    assert sparse_backend.resolve() == "spconv"
    fake_status(monkeypatch, spconv_cuda=False, triton=True)
    assert sparse_backend.resolve() == "spconv_triton"
    fake_status(monkeypatch, spconv_cuda=False, triton=True, cuda=False)  # installed, but no GPU
    assert sparse_backend.resolve() == "spconv"
    fake_status(monkeypatch, spconv_cuda=False, triton=False)
    assert sparse_backend.resolve() == "spconv"
    fake_status(monkeypatch, spconv_cuda=False, triton=False, spconv=False)
    with pytest.raises(sparse_backend.SparseBackendError, match="no sparse-convolution backend"):
        sparse_backend.resolve()


def test_backend_setting_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_status(monkeypatch, spconv_cuda=False, triton=True)
    monkeypatch.setenv(sparse_backend.ENV_VAR, "spconv")
    assert sparse_backend.resolve() == "spconv"
    assert sparse_backend.resolve("spconv_triton") == "spconv_triton"  # an explicit name wins
    monkeypatch.setenv(sparse_backend.ENV_VAR, "minkowski")
    with pytest.raises(sparse_backend.SparseBackendError, match="not one of"):
        sparse_backend.resolve()
    fake_status(monkeypatch, spconv_cuda=False, triton=False)
    with pytest.raises(sparse_backend.SparseBackendError, match="cannot be used: not installed"):
        sparse_backend.resolve("spconv_triton")
    with pytest.raises(RuntimeOptionError, match="backend"):
        RuntimeOptions(backend="spconv-cu126")


def test_the_backend_for_a_device(monkeypatch: pytest.MonkeyPatch) -> None:
    """A GPU machine with the CPU spconv and spconv-triton (make GPU=triton): CPU runs take spconv,
    CUDA runs spconv-triton, whatever the model was built with; an explicit choice must fit."""
    monkeypatch.delenv(sparse_backend.ENV_VAR, raising=False)
    fake_status(monkeypatch, spconv_cuda=False, triton=True)
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert sparse_backend.for_device(cpu, current="spconv_triton") == "spconv"
    assert sparse_backend.for_device(cuda, current="spconv") == "spconv_triton"
    assert sparse_backend.for_device(cuda) == "spconv_triton"
    with pytest.raises(sparse_backend.SparseBackendError, match="GPUs only"):
        sparse_backend.for_device(cpu, requested="spconv_triton")
    monkeypatch.setenv(sparse_backend.ENV_VAR, "spconv")
    with pytest.raises(sparse_backend.SparseBackendError, match="CPU build"):
        sparse_backend.for_device(cuda, current="spconv_triton")
    monkeypatch.delenv(sparse_backend.ENV_VAR)
    fake_status(monkeypatch, spconv_cuda=False, triton=True, spconv=False)
    with pytest.raises(sparse_backend.SparseBackendError, match="no installed sparse backend runs on cpu"):
        sparse_backend.for_device(cpu)


def test_a_broken_install_is_a_reason_not_a_crash(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """E.g. spconv-cu126 on a machine without its CUDA runtime: the backend is reported unusable."""
    pkg = tmp_path / "clip3d_broken_backend"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("raise OSError('libcudart.so.12: cannot open shared object file')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    why = sparse_backend._import_error("clip3d_broken_backend")
    assert why is not None and "does not import: OSError: libcudart.so.12" in why
    assert sparse_backend._import_error("clip3d_no_such_backend") == "clip3d-no-such-backend is not installed"
    assert sparse_backend.available()["spconv"] is None  # the real one here imports


def test_on_this_cpu_machine_nothing_changes() -> None:
    if torch.cuda.is_available():
        pytest.skip("a CPU-only check")
    assert Clip3DNet(CFG).backbone.backend == "spconv"
    with pytest.raises(sparse_backend.SparseBackendError, match="GPUs only"):
        sparse_backend.check_device("spconv_triton", torch.device("cpu"))
    if not sparse_backend.spconv_has_cuda():
        with pytest.raises(sparse_backend.SparseBackendError, match="CPU build"):
            sparse_backend.check_device("spconv", torch.device("cuda"))


def test_unet_parameter_names_are_the_spconv_layout(model: Clip3DNet) -> None:
    """Checkpoints written before the backend switch (spconv SparseSequential containers) keep
    loading: same names, spconv's [out, k, k, k, in] weight layout."""
    state = model.backbone.state_dict()
    b = CFG.backbone
    assert state["stem.0.weight"].shape == (b.stem_channels, 3, 3, 3, b.in_channels)
    for key in ("stem.1.running_var", "down.0.0.weight", "down.0.1.bias", "encoder.0.0.conv1.weight",
                "encoder.0.0.bn2.weight", "up.0.0.weight", "decoder.0.0.proj.0.weight",
                "decoder.0.0.proj.1.running_mean"):
        assert key in state, key
    assert state["down.0.0.weight"].shape == (b.channels[0], 2, 2, 2, b.stem_channels)


@pytest.mark.skipif(
    importlib.util.find_spec("spconv_triton") is None or importlib.util.find_spec("triton") is None,
    reason="spconv-triton (and Triton) not installed: make GPU=triton",
)
def test_both_backends_have_the_same_parameters() -> None:
    a = Clip3DNet(CFG, backend="spconv").state_dict()
    b = Clip3DNet(CFG, backend="spconv_triton").state_dict()
    assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in b.items()}


def test_a_model_is_rebuilt_on_the_requested_backend_with_its_weights(
    monkeypatch: pytest.MonkeyPatch, model: Clip3DNet
) -> None:
    """The rebuild path (checkpoint of one backend, runtime on another) with a stand-in second
    backend that is spconv again under another name: the same weights give the same labels."""
    monkeypatch.setitem(sparse_backend._MODULES, "other", "spconv.pytorch")
    monkeypatch.setattr(sparse_backend, "BACKENDS", (*sparse_backend.BACKENDS, "other"))
    monkeypatch.setattr(sparse_backend, "available",
                        lambda: {"spconv": None, "spconv_triton": "not installed", "other": None})
    monkeypatch.setattr(sparse_backend, "check_device", lambda *a: None)
    pts = cloud()
    ref = segmenter(model).segment(pts)
    seg = segmenter(model, RuntimeOptions(backend="other"))
    assert seg.model is not model and seg.model.backbone.backend == "other"
    out = seg.segment(pts)
    assert np.array_equal(out.labels, ref.labels)
    np.testing.assert_allclose(out.scores, ref.scores, atol=1e-5)


# ---------------------------------------------------------------------- precision and compile
def test_fp16_inference_on_cpu_matches_fp32(model: Clip3DNet) -> None:
    pts = cloud(6000)
    ref = segmenter(model).segment(pts)
    seg = segmenter(copy.deepcopy(model), RuntimeOptions(precision="fp16"))  # cast in place
    assert seg.model.dtype == torch.float16 and seg.model.temperature.dtype == torch.float32
    out = seg.segment(pts)
    assert out.scores.dtype == np.float32 and np.array_equal(out.valid, ref.valid)
    agree = (out.labels == ref.labels)[ref.valid].mean()
    assert agree >= 0.99, agree
    with pytest.raises(RuntimeOptionError, match="bf16 needs a CUDA device"):
        Runtime(RuntimeOptions(precision="bf16"), torch.device("cpu"))
    with pytest.raises(RuntimeOptionError, match="precision"):
        RuntimeOptions(precision="int8")


def test_compiled_dense_parts_keep_names_and_labels(model: Clip3DNet) -> None:
    pts = cloud()
    ref = segmenter(model).segment(pts)
    names = set(model.state_dict())
    # "eager" runs torch.compile's graph capture without a C++ toolchain or minutes of inductor.
    seg = segmenter(copy.deepcopy(model), RuntimeOptions(compile=True, compile_backend="eager"))
    assert set(seg.model.state_dict()) == names  # compiled in place: checkpoints unchanged
    assert seg.model.head._compiled_call_impl is not None
    out = seg.segment(pts)
    assert np.array_equal(out.labels, ref.labels)


# ---------------------------------------------------------------------- buffers and timers
def test_host_buffers_grow_once_then_are_reused() -> None:
    buffers = HostBuffers(torch.device("cpu"), pin=False)
    a = buffers.staging("points", (1000, 4), torch.float32)
    assert a.shape == (1000, 4) and a.dtype == torch.float32 and buffers.allocations == 1
    a.fill_(3.0)
    for n in (900, 1000, 1024):  # 16 KiB buffer: all fit, same memory
        b = buffers.staging("points", (n, 4), torch.float32)
        assert b.data_ptr() == a.data_ptr()
    assert buffers.allocations == 1
    buffers.staging("points", (1025, 4), torch.float32)  # grows to the next power of two
    assert buffers.allocations == 2 and buffers._buffers["points"].numel() == 32768
    c = buffers.staging("labels", (10,), torch.int32)  # keys do not share memory
    assert buffers.allocations == 3 and c.data_ptr() != a.data_ptr()


def test_uploads_on_cpu_are_zero_copy_and_downloads_plain() -> None:
    buffers = HostBuffers(torch.device("cpu"), pin=True)  # pinning means nothing without CUDA
    assert not buffers.pin
    arr = np.arange(12, dtype=np.float32).reshape(3, 4)
    t = buffers.upload("points", arr)
    assert t.data_ptr() == arr.ctypes.data
    stacked = buffers.upload("images", [np.zeros((2, 2, 3), np.uint8), np.ones((2, 2, 3), np.uint8)])
    assert stacked.shape == (2, 2, 2, 3) and int(stacked[1].sum()) == 12
    out = buffers.download({"a": torch.tensor([1, 2], dtype=torch.int32)})
    assert out["a"].tolist() == [1, 2]
    assert buffers.allocations == 0


def test_uploads_to_a_device_go_through_the_reused_staging_buffers() -> None:
    """The staging path (CUDA's) with the meta device standing in for a GPU: shapes, dtypes and
    staged bytes are right, an empty cloud is fine, and steady frames allocate nothing."""
    buffers = HostBuffers(torch.device("meta"), pin=True)
    assert not buffers.pin  # page-locked memory only for CUDA
    rng = np.random.default_rng(0)
    for n in (1000, 700, 0, 1000):
        pts = rng.normal(size=(n, 4)).astype(np.float32)
        out = buffers.upload("points", pts[:, :4])
        assert out.device.type == "meta" and out.shape == (n, 4) and out.dtype == torch.float32
        staged = buffers._buffers["points"][: pts.nbytes].view(torch.float32).view(n, 4)
        assert np.array_equal(staged.numpy(), pts)
    images = [rng.integers(0, 256, (6, 8, 3), dtype=np.uint8) for _ in range(3)]
    out = buffers.upload("images", images)
    assert out.shape == (3, 6, 8, 3) and out.dtype == torch.uint8
    assert np.array_equal(buffers._buffers["images"][: 3 * 144].view(3, 6, 8, 3).numpy(), np.stack(images))
    assert buffers.allocations == 2  # one per key


class FakeEvent:
    recorded: ClassVar[list[object]] = []

    def __init__(self, enable_timing: bool = False) -> None:
        self.t = len(FakeEvent.recorded)

    def record(self, stream: object) -> None:
        FakeEvent.recorded.append(stream)

    def elapsed_time(self, other: FakeEvent) -> float:
        return 10.0 * (other.t - self.t)


def test_timers_synchronise_the_segmenters_own_device(monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[torch.device] = []
    streams: list[torch.device] = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: synced.append(device))
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: streams.append(device) or device)
    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    dev = torch.device("cuda:1")  # not the current device (0): a sync of the wrong one times nothing

    timer = StageTimer(dev, sync=True)
    timer.lap("backbone")
    times = timer.total()
    assert synced and all(d == dev for d in synced) and len(synced) == 3
    assert set(times) == {"backbone", "total"}

    synced.clear()
    FakeEvent.recorded = []
    timer = StageTimer(dev, sync=False)  # events on the device's stream, one sync at the end
    timer.lap("voxelise")
    timer.lap("backbone")
    assert not synced
    times = timer.total()
    assert synced == [dev] and streams and all(s == dev for s in streams)
    assert times["voxelise"] == 10.0 and times["backbone"] == 10.0 and "total" in times


def test_cpu_runtime_has_no_streams_and_segmenter_timings_add_up(model: Clip3DNet) -> None:
    rt = Runtime(RuntimeOptions(image_stream=True, pinned=True), torch.device("cpu"))
    assert rt._image_stream is None and not rt.buffers.pin
    with rt.image_stream():
        pass
    rt.join_image_stream(torch.zeros(1))
    out = segmenter(model).segment(cloud())
    t = out.timings_ms
    assert t["total"] >= t["voxelise"] + t["backbone"] + t["classify"] - 1e-6
    assert runtime_module.PRECISIONS["fp16"] == torch.float16
