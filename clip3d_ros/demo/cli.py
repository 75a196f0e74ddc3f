"""`python -m clip3d_ros.demo` command line."""

from __future__ import annotations

import argparse
import logging
import subprocess
from pathlib import Path

from clip3d_ros import bag
from clip3d_ros.demo.config import DemoConfig
from clip3d_ros.demo.run import run_demo

log = logging.getLogger(__name__)


def main(argv: list[str] | None = None) -> int:
    import clip3d_ros.demo as package

    parser = argparse.ArgumentParser(
        prog="python -m clip3d_ros.demo", description=package.__doc__.split("\n\n")[0]
    )
    parser.add_argument("--out", type=Path, default=Path("demo_output"))
    parser.add_argument("--seconds", type=float, default=20.0, help="drive length (s of sim time)")
    parser.add_argument("--rate", type=float, default=10.0, help="sensor rate (Hz)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--storage", choices=sorted(bag.STORAGES), default="sqlite3")
    parser.add_argument("--replay-rate", type=float, default=1.0)
    parser.add_argument("--checkpoint", type=Path, default=None, help="use this model instead of training")
    parser.add_argument("--untrained", action="store_true", help="random model weights (wiring check only)")
    parser.add_argument(
        "--train-config", type=Path, default=None, help="default: training/synthetic_tiny.yaml (shipped)"
    )
    parser.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "clip3d")
    parser.add_argument("--pictures", type=int, default=4)
    parser.add_argument("--workers", type=int, default=DemoConfig.workers)
    parser.add_argument("--domain-id", type=int, default=None)
    parser.add_argument(
        "--node-threads",
        type=int,
        default=DemoConfig.node_threads,
        help="torch CPU threads of the node (unless OMP_NUM_THREADS is set)",
    )
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    shipped = {} if args.train_config is None else {"train_config": args.train_config}
    cfg = DemoConfig(
        out=args.out,
        seconds=args.seconds,
        rate_hz=args.rate,
        seed=args.seed,
        storage=args.storage,
        replay_rate=args.replay_rate,
        checkpoint=args.checkpoint,
        untrained=args.untrained,
        **shipped,
        cache_dir=args.cache_dir,
        pictures=args.pictures,
        workers=args.workers,
        domain_id=args.domain_id,
        node_threads=args.node_threads,
    )
    try:
        summary = run_demo(cfg)
    except (RuntimeError, TimeoutError, subprocess.CalledProcessError, ValueError, FileNotFoundError) as exc:
        log.error("demo failed: %s", exc)
        return 1
    print((cfg.out / "summary.md").read_text())
    print(f"demo output in {cfg.out} ({summary['runtime_s']['total']} s)")
    return 0
