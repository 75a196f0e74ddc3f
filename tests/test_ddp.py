"""Two CPU processes under torchrun (gloo, env:// on localhost) train the tiny configs (semantic and
panoptic, one engine): both ranks must end with identical weights that moved away from the
initialisation. `run_two_ranks` is also the two-GPU NCCL check (tests/test_gpu.py)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

WORKER = textwrap.dedent(
    """
    import os, sys
    import clip3d_core  # noqa: F401  (compat shims first)
    import torch
    from clip3d_core.training import load_train_config, make_trainer

    out, backend = sys.argv[1], sys.argv[2]
    cfg = load_train_config(sys.argv[3], sys.argv[4:])
    trainer = make_trainer(cfg, out_dir=out)
    rank = trainer.info.rank
    assert trainer.info.world_size == 2 and trainer.info.backend == backend, trainer.info
    assert isinstance(trainer.model, torch.nn.parallel.DistributedDataParallel)
    init = {k: v.detach().clone() for k, v in trainer.bare.state_dict().items()}
    result = trainer.fit()
    torch.save({"init": init, "final": trainer.bare.state_dict(), "metrics": result.metrics,
                "iterations": result.iterations}, os.path.join(out, f"rank{rank}.pt"))
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


SEMANTIC = ("synthetic_tiny.yaml", ("trainer.iterations=4", "self_training.iterations=2",
                                      "self_training.calibration_frames=2"), 6, "self_training")


def run_two_ranks(tmp_path: Path, backend: str, extra_overrides: tuple[str, ...] = (),
                  setting: tuple[str, tuple[str, ...], int, str] = SEMANTIC) -> dict:
    """torchrun two ranks of a tiny config (process group ``backend``) and check they agree.
    ``setting``: (config in training/, its overrides, total iterations, the last stage's name).
    Returns rank 0's record."""
    config, setting_overrides, iterations, last_stage = setting
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    out = tmp_path / "run"
    overrides = [
        *setting_overrides, "trainer.checkpoint_every=2", "trainer.log_every=2",
        "trainer.precise_bn_batches=1", "data.options.val_frames=2", *extra_overrides,
    ]
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--nnodes", "1",
        "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
        str(script), str(out), backend, str(REPO / "training" / config), *overrides,
    ]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    assert ranks[0]["iterations"] == ranks[1]["iterations"] == iterations
    final0, final1 = ranks[0]["final"], ranks[1]["final"]
    assert final0.keys() == final1.keys()
    for key in final0:
        assert torch.equal(final0[key], final1[key]), f"ranks disagree on {key}"
    # DDP broadcast rank 0's initial weights, so the ranks also started equal...
    for key in ranks[0]["init"]:
        assert torch.equal(ranks[0]["init"][key], ranks[1]["init"][key]), f"initial {key} differs"
    # ...and training moved them.
    init = ranks[0]["init"]
    moved = [k for k, v in final0.items() if v.is_floating_point() and not torch.equal(v, init[k])]
    assert len(moved) > len(final0) // 2, f"only {len(moved)} of {len(final0)} tensors changed"
    # Evaluation is sharded over ranks and reduced: both report the same numbers.
    assert ranks[0]["metrics"] == ranks[1]["metrics"] and last_stage in ranks[0]["metrics"]
    # Rank 0 alone wrote the run's files, including a Segmenter-loadable final model.
    assert (out / "final.pt").is_file() and (out / "checkpoints").is_dir()
    return ranks[0]


@pytest.mark.slow
def test_two_process_gloo_training_keeps_ranks_in_sync(tmp_path: Path) -> None:
    run_two_ranks(tmp_path, "gloo")


@pytest.mark.slow
def test_two_process_gloo_panoptic_training_keeps_ranks_in_sync(tmp_path: Path) -> None:
    """The panoptic setting runs on the same engine: DDP-wrapped PanopticNet, sharded frames,
    evaluation sharded and merged (the PQ metric's state summed over ranks)."""
    from clip3d_core.checkpoint import load_checkpoint
    from clip3d_core.training import load_train_config
    from clip3d_core.training.panoptic_trainer import PanopticTrainer

    record = run_two_ranks(tmp_path, "gloo", setting=(
        "synthetic_panoptic_tiny.yaml", ("trainer.iterations=4", "trainer.eval_every=2"), 4, "panoptic"))
    metrics = record["metrics"]
    assert {"panoptic", "panoptic@2"} <= set(metrics)
    assert {"pq", "pq_novel_stuff", "miou"} <= set(metrics["panoptic"])
    ckpt = load_checkpoint(tmp_path / "run" / "final.pt")
    assert ckpt.panoptic is not None and ckpt.meta["world_size"] == 2
    for key, value in record["final"].items():
        assert torch.equal(ckpt.state_dict[key], value), key
    # Two validation frames, one per rank: merged, they score as one process scoring both.
    cfg = load_train_config(REPO / "training" / "synthetic_panoptic_tiny.yaml", ["data.options.val_frames=2"])
    single = PanopticTrainer(cfg, out_dir=tmp_path / "single")
    single.load_checkpoint(tmp_path / "run" / "final.pt")
    assert single.evaluate() == pytest.approx(metrics["panoptic"], rel=1e-9, abs=1e-12)
