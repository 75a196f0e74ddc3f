"""precompute a text embedding bank for a vocabulary (a vehicle then runs without the text tower)

Example:
  clip3d text-bank --clip-model ViT-B-16 --pretrained openai \\
      --vocabulary 'car|automobile' truck pedestrian 'traffic cone' --out bank.pt
Each synonym is stored as its own phrase; `EmbeddingBank.lookup` averages them again at run time.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--clip-model", default="ViT-B-16", help="open_clip model name")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--pretrained", metavar="TAG", help="open_clip pretrained tag (e.g. openai)")
    source.add_argument("--clip-checkpoint", metavar="FILE", help="local CLIP weights file")
    source.add_argument("--allow-random", action="store_true", help="random weights (tests/demos only)")
    parser.add_argument("--random-seed", type=int, default=0, help="seed for --allow-random")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "bf16"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--vocabulary", nargs="+", default=[], metavar="ENTRY",
                        help="entries, synonyms joined by '|' (e.g. 'car|automobile')")
    parser.add_argument("--vocabulary-file", type=Path,
                        help="text file with one entry per line ('#' starts a comment)")
    parser.add_argument("--templates-file", type=Path,
                        help="prompt templates, one per line with one '{}' (default: built-in set)")
    parser.add_argument("--cache-dir", type=Path, help="text embedding cache directory")
    parser.add_argument("--out", type=Path, required=True, help="output bank file (.pt)")


def _lines(path: Path) -> list[str]:
    lines = (line.split("#", 1)[0].strip() for line in path.read_text(encoding="utf-8").splitlines())
    return [line for line in lines if line]


def run(args: argparse.Namespace) -> int:
    from clip3d_core.clip import (
        DEFAULT_TEMPLATES,
        ClipConfig,
        ClipLoadError,
        EmbeddingBank,
        TextEncoder,
        VocabularyError,
        load_clip,
    )

    try:
        entries = list(args.vocabulary) + (_lines(args.vocabulary_file) if args.vocabulary_file else [])
        templates = _lines(args.templates_file) if args.templates_file else DEFAULT_TEMPLATES
        cfg = ClipConfig(
            model_name=args.clip_model,
            pretrained=args.pretrained,
            checkpoint=args.clip_checkpoint,
            allow_random=args.allow_random,
            random_seed=args.random_seed,
            precision=args.precision,
        )
        loaded = load_clip(cfg, device=args.device)
        encoder = TextEncoder(loaded, templates=templates, cache_dir=args.cache_dir)
        bank = EmbeddingBank.from_text_encoder(encoder, entries)
    except (ClipLoadError, VocabularyError, ValueError, OSError) as exc:
        log.error("%s", exc)
        return 2
    path = bank.save(args.out)
    print(f"{'bank':<10} {path}")
    print(f"{'model':<10} {bank.identity}")
    print(f"{'phrases':<10} {len(bank)} ({len(templates)} templates each)")
    print(f"{'entries':<10} {', '.join(entries)}")
    return 0
