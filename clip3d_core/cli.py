"""`clip3d` command line: one sub-command per module, imported only when it runs.

Each command module defines `add_arguments(parser)` and `run(args) -> int`; its docstring's first
line is the help text. ROS-side tools live in `clip3d_ros.tools` and are imported only when
invoked, so `clip3d_core` itself never imports ROS.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

COMMANDS: dict[str, tuple[str, str]] = {
    "segment": ("clip3d_core.commands.segment", "label a cloud file (+ images), draw a bird's-eye PNG"),
    "bench": ("clip3d_core.commands.bench", "per-stage latency and peak memory of the Segmenter"),
    "text-bank": ("clip3d_core.commands.text_bank", "precompute a text embedding bank for a vocabulary"),
    "train": ("clip3d_core.commands.train", "train a model from a YAML config"),
    "evaluate": ("clip3d_core.commands.evaluate", "evaluate a checkpoint (mIoU / hIoU)"),
    "make-bag": ("clip3d_ros.tools.make_bag", "write a synthetic drive as a rosbag2"),
    "replay": ("clip3d_ros.tools.replay", "publish a rosbag2 with its original timing"),
    "label-bag": ("clip3d_ros.tools.label_bag", "label a bag's clouds offline into a new bag"),
}


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: clip3d <command> [options]", "", "commands:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "`clip3d <command> --help` for a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print(_usage(), file=sys.stderr if argv and argv[0] not in ("-h", "--help") else sys.stdout)
        return 0 if not argv or argv[0] in ("-h", "--help") else 2
    name = argv[0]
    module = importlib.import_module(COMMANDS[name][0])
    parser = argparse.ArgumentParser(prog=f"clip3d {name}", description=(module.__doc__ or "").strip())
    parser.add_argument("--log-level", default="INFO", help="logging level (DEBUG, INFO, WARNING, ...)")
    module.add_arguments(parser)
    args = parser.parse_args(argv[1:])
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    return int(module.run(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
