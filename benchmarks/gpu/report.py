"""Merge `clip3d bench` JSON files into one report: a JSON and a markdown page with every case's
stage medians / p90 and peak memory, the ratios spconv / spconv-triton and fp32 / fp16 of the total
median (only between cases of one bench invocation: measured in one run, same machine state), and
the latency targets of issue 11 (H200: small config, 120k points, LiDAR only <= 15 ms; six-camera
fusion <= 30 ms).

    python benchmarks/gpu/report.py PARTS/*.json --json-out OUT/gpu_check.json --md-out OUT/gpu_check.md
"""

from __future__ import annotations

import argparse
import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from clip3d_core.commands.bench import markdown_table  # noqa: E402  (after the repo is on the path)

TARGETS = (  # (what, config, points, cameras, total median ms)
    ("LiDAR only, small config, 120k points", "small", 120000, 0, 15.0),
    ("six-camera fusion, 120k points", None, 120000, 6, 30.0),
)
AXES = {"backend": ("spconv", "spconv_triton"), "precision": ("fp32", "fp16")}


def _get(r: dict[str, Any], key: str) -> Any:
    """A case key; results written before `clip3d bench --head` existed are semantic."""
    return r.get(key, "semantic" if key == "head" else None)


def load(paths: list[Path]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(environments, results) of the bench files that exist (a stopped phase may have written none)."""
    envs, results = [], []
    for path in paths:
        if not path.is_file():
            continue
        data = json.loads(path.read_text())
        envs.append({"file": path.name, **data["environment"]})
        results += data["results"]
    return envs, results


def _total(r: dict[str, Any]) -> float | None:
    return None if "error" in r else r["stages_ms"]["total"]["median"]


def ratios(results: list[dict[str, Any]], axis: str) -> list[dict[str, Any]]:
    """Total-median ratio numerator / denominator of ``AXES[axis]`` for cases equal in everything
    else, within one bench invocation (same tag)."""
    num, den = AXES[axis]
    keys = ("tag", "head", "config", "points", "cameras", "backend", "precision", "tf32", "compile")
    other = [k for k in keys if k != axis]
    by_key: dict[tuple[Any, ...], dict[str, dict[str, Any]]] = {}
    for r in results:
        by_key.setdefault(tuple(_get(r, k) for k in other), {}).setdefault(r[axis], r)
    out = []
    for key, pair in by_key.items():
        a, b = pair.get(num), pair.get(den)
        if a is None or b is None or _total(a) is None or _total(b) is None or _total(b) == 0:
            continue
        out.append({**dict(zip(other, key)), f"{num}_ms": _total(a), f"{den}_ms": _total(b),
                    "ratio": round(_total(a) / _total(b), 3)})
    return out


def targets(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The fastest measured setting for each target (semantic models), and whether it meets it."""
    out = []
    for what, config, points, cameras, limit in TARGETS:
        cands = [
            r for r in results
            if _total(r) is not None and r["points"] == points and (r.get("cameras") or 0) == cameras
            and _get(r, "head") == "semantic"
            and (config is None or r["config"] == config)
        ]
        best = min(cands, key=_total, default=None)
        row: dict[str, Any] = {"target": what, "limit_ms": limit}
        if best is None:
            row["measured"] = None
        else:
            setting = {k: best.get(k) for k in ("config", "backend", "precision", "tf32", "compile")}
            row.update(measured_ms=_total(best), met=_total(best) <= limit, setting=setting)
        out.append(row)
    return out


def _ratio_table(rows: list[dict[str, Any]], axis: str) -> str:
    num, den = AXES[axis]
    if not rows:
        return f"(no pair of {num} and {den} cases that both ran)"
    other = [k for k in ("tag", "head", "config", "points", "cameras", "backend", "precision") if k != axis]
    lines = ["| " + " | ".join([*other, f"{num} ms", f"{den} ms", f"{num} / {den}"]) + " |",
             "|" + "---|" * (len(other) + 3)]
    for r in rows:
        cells = [str(r.get(k)) for k in other]
        cells += [f"{r[f'{num}_ms']:.2f}", f"{r[f'{den}_ms']:.2f}", f"{r['ratio']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown(envs: list[dict[str, Any]], results: list[dict[str, Any]], report: dict[str, Any]) -> str:
    env = envs[0] if envs else {}
    lines = [
        "# clip3d GPU check",
        "",
        f"Device: {env.get('gpu') or env.get('device', '?')}; torch {env.get('torch')} (CUDA "
        f"{env.get('torch_cuda')}), triton {env.get('triton')}, spconv {env.get('spconv')}, "
        f"spconv-triton {env.get('spconv_triton')}; sparse backends: {env.get('sparse_backends')}.",
        "Times are medians / p90 in ms of `Segmenter.segment` (random weights; "
        + ("CUDA events, one synchronisation per frame; peak MB is torch.cuda.max_memory_allocated above "
           "what the process held before the case)." if str(env.get("device", "")).startswith("cuda")
           else "host clock; peak MB is the resident-set growth: CPU figures, not GPU ones)."),
        "",
        markdown_table(results),
        "",
        "## spconv / spconv-triton (total median, same run)",
        "",
        _ratio_table(report["ratios"]["backend"], "backend"),
        "",
        "## fp32 / fp16 (total median, same run)",
        "",
        _ratio_table(report["ratios"]["precision"], "precision"),
        "",
        "## Targets (issue 11, for an H200)",
        "",
        "| target | limit ms | best measured ms | setting | met |",
        "|---|---|---|---|---|",
    ]
    for t in report["targets"]:
        if t.get("measured_ms") is None:
            lines.append(f"| {t['target']} | {t['limit_ms']:.0f} | not measured | - | - |")
        else:
            s = t["setting"]
            setting = f"{s['config']} {s['backend']} {s['precision']}" + (" compile" if s["compile"] else "")
            lines.append(f"| {t['target']} | {t['limit_ms']:.0f} | {t['measured_ms']:.2f} | {setting} | "
                         f"{'yes' if t['met'] else 'no'} |")
    return "\n".join(lines) + "\n"


def phases(path: Path | None) -> list[dict[str, Any]]:
    """check.sh's phase log: one `name<TAB>exit status<TAB>seconds<TAB>note` line per phase."""
    if path is None or not path.is_file():
        return []
    rows = [line.split("\t") for line in path.read_text().splitlines() if line.strip()]
    return [{"phase": r[0], "rc": int(r[1]), "seconds": int(r[2]), "note": r[3] if len(r) > 3 else ""}
            for r in rows]


def tests(junit: Path | None) -> dict[str, Any] | None:
    """pytest's JUnit XML -> counts, and per test its outcome and recorded properties."""
    if junit is None or not junit.is_file():
        return None
    root = ET.parse(junit).getroot()
    cases = []
    for case in root.iter("testcase"):
        outcome = next((c.tag for c in case if c.tag in ("failure", "error", "skipped")), "passed")
        row: dict[str, Any] = {"test": case.get("name"), "outcome": outcome, "s": float(case.get("time", 0))}
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                row["message"] = (child.get("message") or "")[:300]
        props = {p.get("name"): p.get("value") for p in case.iter("property")}
        if props:
            row["properties"] = props
        cases.append(row)
    counts = {o: sum(c["outcome"] == o for c in cases) for o in ("passed", "failure", "error", "skipped")}
    return {"counts": counts, "cases": cases}


def _tests_md(summary: dict[str, Any] | None, phase_rows: list[dict[str, Any]]) -> list[str]:
    lines = ["## Check phases", "", "| phase | exit | s | note |", "|---|---|---|---|"]
    lines += [f"| {p['phase']} | {p['rc']} | {p['seconds']} | {p['note']} |" for p in phase_rows]
    lines += ["", "## GPU tests (pytest -m gpu)", ""]
    if summary is None:
        return [*lines, "(no pytest report: the phase did not finish)"]
    lines += [f"counts: {summary['counts']}", "", "| test | outcome | s | detail |", "|---|---|---|---|"]
    for c in summary["cases"]:
        detail = c.get("message", "") or ", ".join(f"{k}={v}" for k, v in c.get("properties", {}).items())
        lines.append(f"| {c['test']} | {c['outcome']} | {c['s']:.1f} | {detail.replace('|', '/')[:160]} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("parts", nargs="*", type=Path, help="clip3d bench --json-out files")
    parser.add_argument("--json-out", type=Path, required=True)
    parser.add_argument("--md-out", type=Path, required=True)
    parser.add_argument("--phases", type=Path, help="check.sh's phase log (TSV)")
    parser.add_argument("--junit", type=Path, help="pytest --junitxml of the gpu tests")
    args = parser.parse_args(argv)
    envs, results = load(args.parts)
    report = {
        "environments": envs,
        "phases": phases(args.phases),
        "tests": tests(args.junit),
        "results": results,
        "ratios": {axis: ratios(results, axis) for axis in AXES},
        "targets": targets(results),
    }
    args.json_out.parent.mkdir(parents=True, exist_ok=True)
    args.json_out.write_text(json.dumps(report, indent=2))
    md = markdown(envs, results, report) + "\n" + "\n".join(_tests_md(report["tests"], report["phases"]))
    md += "\n"
    args.md_out.write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
