"""``peace data``: dataset tools. ``peace data synth OUT`` writes the demo's synthetic dataset."""

from __future__ import annotations

import argparse
import time
from typing import Any

from peace_registry.errors import PeaceError


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser("data", help="dataset tools (synthetic demo data)")
    actions = parser.add_subparsers(dest="data_command", metavar="ACTION")
    parser.set_defaults(handler=lambda args: _usage(parser))

    synth = actions.add_parser(
        "synth",
        help="write the synthetic image/audio/text dataset as webdataset shards",
        description="Write deterministic synthetic data (shapes with captions, sounds with "
        "captions, text-only captions, zero-shot prompts) under OUT as webdataset shards with "
        "train/test splits and a manifest.json.",
    )
    synth.add_argument("out", metavar="OUT", help="output directory")
    synth.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    counts = {
        "--train-images": 2000,
        "--train-sounds": 2000,
        "--test-images": 300,
        "--test-sounds": 300,
        "--texts": 2000,
        "--image-sounds": 0,
    }
    for flag, default in counts.items():
        synth.add_argument(flag, type=int, default=default, metavar="N", help=f"default {default}")
    synth.add_argument("--image-size", type=int, default=64, metavar="PX", help="default 64")
    synth.add_argument("--image-format", choices=("jpg", "png"), default="jpg")
    synth.add_argument(
        "--caption-detail",
        type=float,
        default=0.5,
        metavar="P",
        help="probability that a caption names each attribute besides the class (default 0.5)",
    )
    synth.add_argument(
        "--image-classes",
        default=None,
        metavar="A,B,...",
        help="shapes to draw, a subset of circle,square,triangle,star,cross,diamond (default all)",
    )
    synth.add_argument(
        "--sound-classes",
        default=None,
        metavar="A,B,...",
        help="sounds to make, a subset of tone,chirp,beeps,static,clicks,siren (default all)",
    )
    synth.add_argument("--shard-size", type=int, default=1000, metavar="N", help="samples/shard")
    synth.add_argument("--jobs", type=int, default=None, help="processes (default: one per CPU)")
    synth.add_argument(
        "--overwrite", action="store_true", help="replace a synthetic dataset already in OUT"
    )
    synth.set_defaults(handler=_synth)


def _usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 2


def _synth(args: argparse.Namespace) -> int:
    from peace_core.data.synth import SynthConfig, synthesize

    classes = {
        field: getattr(args, field).split(",")
        for field in ("image_classes", "sound_classes")
        if getattr(args, field)
    }
    config = SynthConfig(
        **classes,
        seed=args.seed,
        train_images=args.train_images,
        train_sounds=args.train_sounds,
        test_images=args.test_images,
        test_sounds=args.test_sounds,
        texts=args.texts,
        image_sounds=args.image_sounds,
        image_size=args.image_size,
        image_format=args.image_format,
        caption_detail=args.caption_detail,
        shard_size=args.shard_size,
    )
    start = time.perf_counter()
    try:
        manifest = synthesize(args.out, config, overwrite=args.overwrite, jobs=args.jobs)
    except FileExistsError as exc:
        raise PeaceError(str(exc)) from exc
    seconds = time.perf_counter() - start
    for name, dataset in manifest["datasets"].items():
        shards = len(dataset["shards"])
        print(f"{name:18s} {dataset['count']:7d} samples in {shards} shard(s)  {dataset['urls']}")
    print(f"wrote {args.out}/manifest.json in {seconds:.1f}s (seed {config.seed})")
    return 0
