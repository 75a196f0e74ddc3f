"""The prepared GPU check (benchmarks/gpu/): its CPU dry run end to end, the report's ratios and
targets, and which carried wheels it installs."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks" / "gpu"))

import report  # noqa: E402
import wheels_to_install  # noqa: E402


def case(tag: str, backend: str, precision: str, total: float | None, **kw) -> dict:
    r = {"tag": tag, "config": kw.get("config", "small"), "points": kw.get("points", 120000),
         "cameras": kw.get("cameras", 0), "backend": backend, "precision": precision, "tf32": False,
         "compile": False, **({"head": kw["head"]} if "head" in kw else {})}
    if total is None:
        r["error"] = "SparseBackendError: cannot run here"
    else:
        r["stages_ms"] = {"total": {"median": total, "p90": total * 1.1}}
    return r


def test_ratios_pair_cases_of_one_run_only() -> None:
    results = [
        case("a", "spconv", "fp32", 12.0), case("a", "spconv_triton", "fp32", 8.0),
        case("a", "spconv", "fp16", 6.0), case("a", "spconv_triton", "fp16", None),
        case("b", "spconv_triton", "fp32", 1.0),  # another run: never paired with run a's spconv
        case("a", "spconv", "fp16", 3.0, head="panoptic"),  # another model: never paired either
    ]
    by_backend = report.ratios(results, "backend")
    assert [(r["tag"], r["precision"], r["ratio"]) for r in by_backend] == [("a", "fp32", 1.5)]
    by_precision = report.ratios(results, "precision")
    assert [(r["backend"], r["ratio"]) for r in by_precision] == [("spconv", 2.0)]


def test_targets_take_the_fastest_setting() -> None:
    results = [
        case("a", "spconv", "fp32", 20.0), case("a", "spconv", "fp16", 14.0),
        case("a", "spconv", "fp16", 9.0, config="default"),  # not the small config: not this target
        case("f", "spconv", "fp16", 31.0, cameras=6, config="default"),
        case("a", "spconv", "fp32", 9.5, head="panoptic"),  # the targets are the semantic model's
    ]
    lidar, fusion = report.targets(results)
    assert lidar["measured_ms"] == 14.0 and lidar["met"] and lidar["setting"]["precision"] == "fp16"
    assert fusion["measured_ms"] == 31.0 and not fusion["met"]
    assert report.targets([])[0]["measured"] is None


def test_wheel_choice(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    names = ["spconv-2.3.8-cp312-cp312-manylinux2014_x86_64.whl", "cumm-0.7.11-cp312-cp312-x.whl",
             "spconv_triton-1.0.0-py3-none-any.whl", "pytest-9.2.0-py3-none-any.whl"]
    for n in names:
        (tmp_path / n).touch()
    picked = {p.name.split("-")[0] for p in wheels_to_install.to_install(tmp_path)}
    expected = {"spconv_triton"} if importlib.util.find_spec("spconv_triton") is None else set()
    if importlib.util.find_spec("spconv") is None:
        expected |= {"spconv", "cumm"}
    assert picked == expected  # installed distributions (pytest, spconv here) are left alone
    for n in ("spconv_cu126-2.3.8-cp312-cp312-x.whl", "cumm_cu126-0.7.11-cp312-cp312-x.whl"):
        (tmp_path / n).touch()
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in ("spconv", "cumm")
                        else real(name, *a))
    monkeypatch.setattr(wheels_to_install.md, "version", lambda name: (_ for _ in ()).throw(
        wheels_to_install.md.PackageNotFoundError(name)))
    picked = {p.name.split("-")[0] for p in wheels_to_install.to_install(tmp_path)}
    assert {"spconv_cu126", "cumm_cu126"} <= picked and not {"spconv", "cumm"} & picked


@pytest.mark.slow
def test_cpu_dry_run_of_the_gpu_check(tmp_path: Path, shared_data: Path) -> None:
    out = tmp_path / "out"
    env = {**os.environ, "PYTHON": sys.executable, "CLIP3D_WHEEL_STAGE": str(tmp_path / "stage"),
           "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        ["bash", "benchmarks/gpu/check.sh", "--device", "cpu", "--quick", "--out", str(out),
         "--budget-s", "240"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=400,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["check.log", "gpu_check.json", "gpu_check.md"]
    data = json.loads((out / "gpu_check.json").read_text())
    phases = {p["phase"]: p for p in data["phases"]}
    assert set(phases) == {"install", "pytest-gpu", "bench-lidar", "bench-fusion", "bench-compile",
                           "bench-panoptic"}
    assert phases["install"]["note"] == "0 wheels"  # nothing carried, nothing installed
    assert phases["pytest-gpu"]["rc"] == 0 and data["tests"]["counts"]["failure"] == 0
    assert data["tests"]["counts"]["skipped"] == len(data["tests"]["cases"]) >= 8  # no CUDA here
    rows = {(r["tag"], r["backend"]): r for r in data["results"]}
    lidar = rows[("lidar", "spconv")]
    assert lidar["runs"] >= 1 and lidar["stages_ms"]["total"]["median"] > 0 and lidar["voxels"] > 1000
    err = rows[("lidar", "spconv_triton")]["error"]  # reported, not fatal
    assert "not installed" in err or "GPUs only" in err, err
    fusion = rows[("fusion", "spconv")]
    assert fusion["cameras"] == 2 and fusion["stages_ms"]["image"]["median"] > 0
    assert rows[("compile", "spconv")]["compile"] and "error" not in rows[("compile", "spconv")]
    panoptic = rows[("panoptic", "spconv")]
    assert panoptic["head"] == "panoptic" and panoptic["stages_ms"]["decoder"]["median"] > 0
    assert panoptic["stages_ms"]["merge"]["median"] > 0
    md = (out / "gpu_check.md").read_text()
    assert "| lidar | semantic | small | 2000 |" in md and "| panoptic | panoptic | small | 2000 |" in md
    assert "## Targets" in md and "not measured" in md
