"""``peace data``: dataset tools. ``peace data synth OUT`` writes a synthetic dataset: the demo's
(images, sounds, captions) by default, or a plugin's (``--kind NAME``, ``peace_register_datasets``).
"""

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
        help="write a synthetic dataset (the demo's, or a plugin's) as webdataset shards",
        description="Write deterministic synthetic data under OUT as webdataset shards with "
        "train/test splits, zero-shot prompts and a manifest.json. The default kind, demo, is "
        "shapes with captions, sounds with captions and text-only captions; plugins add kinds "
        "(peace plugins list shows them). --set FIELD=VALUE sets any option of the kind; the "
        "other flags are the demo's.",
    )
    synth.add_argument("out", metavar="OUT", help="output directory")
    synth.add_argument(
        "--kind", default=DEMO, metavar="NAME", help=f"the dataset to write (default: {DEMO})"
    )
    synth.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="an option of the dataset kind, e.g. --set train_windows=500 (repeatable)",
    )
    synth.add_argument("--seed", type=int, default=None, help="random seed (default: 0)")
    counts = {
        "--train-images": 2000,
        "--train-sounds": 2000,
        "--test-images": 300,
        "--test-sounds": 300,
        "--texts": 2000,
        "--image-sounds": 0,
    }
    for flag, default in counts.items():
        synth.add_argument(flag, type=int, default=None, metavar="N", help=f"default {default}")
    synth.add_argument("--image-size", type=int, default=None, metavar="PX", help="default 64")
    synth.add_argument("--image-format", choices=("jpg", "png"), default=None)
    synth.add_argument(
        "--caption-detail",
        type=float,
        default=None,
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
    synth.add_argument("--shard-size", type=int, default=None, metavar="N", help="default 1000")
    synth.add_argument("--jobs", type=int, default=None, help="processes (default: one per CPU)")
    synth.add_argument(
        "--overwrite", action="store_true", help="replace a synthetic dataset already in OUT"
    )
    synth.set_defaults(handler=_synth)


def _usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 2


#: The core's own dataset kind (``peace_core.data.synth``), registered like a plugin's.
DEMO = "demo"
#: Flags of the demo kind -> its option fields.
_DEMO_FLAGS = (
    "train_images",
    "train_sounds",
    "test_images",
    "test_sounds",
    "texts",
    "image_sounds",
    "image_size",
    "image_format",
    "caption_detail",
    "shard_size",
    "image_classes",
    "sound_classes",
)


def _synth(args: argparse.Namespace) -> int:
    from peace_core.config_io import apply_overrides, validate_config
    from peace_registry import get_registry

    registry = get_registry()
    generator = registry.dataset(args.kind).load()
    given = {
        field: getattr(args, field) for field in _DEMO_FLAGS if getattr(args, field) is not None
    }
    if given and args.kind != DEMO:
        flags = ", ".join("--" + field.replace("_", "-") for field in given)
        fields = ", ".join(generator.options.model_fields)
        raise PeaceError(
            f"{flags}: options of the {DEMO!r} dataset; set those of {args.kind!r} with "
            f"--set FIELD=VALUE (its fields: {fields})"
        )
    for field in ("image_classes", "sound_classes"):
        if field in given:
            given[field] = given[field].split(",")
    if args.seed is not None:
        if "seed" not in generator.options.model_fields:
            raise PeaceError(f"the {args.kind!r} dataset has no seed option")
        given["seed"] = args.seed
    raw = apply_overrides(given, args.overrides)
    options = validate_config(generator.options, raw, source=f"{args.kind} dataset options")
    start = time.perf_counter()
    try:
        manifest = generator.generate(args.out, options, overwrite=args.overwrite, jobs=args.jobs)
    except FileExistsError as exc:
        raise PeaceError(f"{exc} (peace data synth --overwrite)") from exc
    seconds = time.perf_counter() - start
    for name, dataset in manifest["datasets"].items():
        shards = len(dataset["shards"])
        print(f"{name:18s} {dataset['count']:7d} samples in {shards} shard(s)  {dataset['urls']}")
    seed = f" (seed {manifest['seed']})" if "seed" in manifest else ""
    print(f"wrote {args.kind} data and {args.out}/manifest.json in {seconds:.1f}s{seed}")
    return 0
