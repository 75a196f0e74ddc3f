"""`clip3d bench` through `Segmenter.segment`: a panoptic case times its decoder and merge as stages of
their own (the stage hooks of `predict_panoptic`), beside a semantic case of the same backbone."""

from __future__ import annotations

import json
from pathlib import Path

from clip3d_core.cli import main


def test_bench_times_the_panoptic_decoder_and_merge(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    assert main(["bench", "--head", "semantic", "panoptic", "--config", "small", "--points", "1500",
                 "--runs", "1", "--warmup", "0", "--threads", "1", "--in-process", "--json-out", str(out),
                 "--md-out", str(tmp_path / "bench.md"), "--log-level", "ERROR"]) == 0
    semantic, panoptic = json.loads(out.read_text())["results"]
    assert (semantic["head"], panoptic["head"]) == ("semantic", "panoptic")
    assert panoptic["voxels"] == semantic["voxels"] > 1000  # same cloud, same grid
    st = panoptic["stages_ms"]
    stages = ("voxelise", "backbone", "decoder", "merge", "classify")
    assert set(st) == {*stages, "total"} and all(st[s]["median"] > 0 for s in stages)
    assert sum(st[s]["median"] for s in stages) <= st["total"]["median"]
    assert "decoder" not in semantic["stages_ms"] and "decoder" not in semantic
    assert panoptic["decoder"]["num_thing_queries"] > 0 and panoptic["instances_median"] >= 0
    header, _, semantic_row, panoptic_row = (tmp_path / "bench.md").read_text().splitlines()[2:]
    assert header.split("|")[-3].strip() == "dec+merge"
    assert panoptic_row.split("|")[-3].strip().endswith("%")
    assert semantic_row.split("|")[-3].strip() == "-"  # no share for a semantic case
