"""``peace embed``: files, strings or webdataset shards in; embeddings (.npy) plus an index out."""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path
from typing import Any

from peace_core.cli.threads import add_threads_option, check_threads, use_threads


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "embed",
        help="embed files, strings or webdataset shards with a checkpoint",
        description="Write OUT/<modality>.npy (float32, L2-normalised, one row per input) and "
        "OUT/<modality>.index.jsonl (row -> source) for every modality present. Files go to the "
        "modality whose plugin decodes their extension.",
    )
    parser.add_argument("checkpoint", type=Path, help="native or official checkpoint")
    parser.add_argument("inputs", nargs="*", type=Path, help="files to embed (images, audio...)")
    parser.add_argument("--text", action="append", default=[], help="a string to embed (repeat)")
    parser.add_argument("--shards", nargs="+", help="webdataset shards (brace patterns allowed)")
    parser.add_argument(
        "--modality", nargs="+", help="with --shards: the modalities each sample holds"
    )
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 ...")
    add_threads_option(parser)
    parser.set_defaults(handler=run)


def _modality_of(path: Path, extensions: dict[str, tuple[str, ...]]) -> str:
    suffix = path.suffix.lower().lstrip(".")
    for modality, known in extensions.items():
        if suffix in known:
            return modality
    listing = "; ".join(f"{m}: {', '.join(exts)}" for m, exts in extensions.items())
    raise ValueError(f"{path}: no modality of this model reads .{suffix} files ({listing})")


def _write(out: Path, modality: str, rows: list[Any], sources: list[str]) -> None:
    import numpy as np
    import torch

    matrix = torch.cat(rows).numpy().astype(np.float32) if rows else np.zeros((0, 0), np.float32)
    np.save(out / f"{modality}.npy", matrix)
    with (out / f"{modality}.index.jsonl").open("w") as handle:
        for row, source in enumerate(sources):
            handle.write(json.dumps({"row": row, "source": source}) + "\n")
    print(f"{modality}: {matrix.shape[0]} embeddings -> {out / f'{modality}.npy'}")


def run(args: argparse.Namespace) -> int:
    from peace_core.config import ANCHOR_MODALITY
    from peace_core.factory import from_pretrained

    check_threads(args)
    if not (args.inputs or args.text or args.shards):
        raise ValueError("nothing to embed: give files, --text strings or --shards")
    if args.shards and not args.modality:
        raise ValueError("--shards needs --modality (e.g. --modality vision text)")
    use_threads(args)
    model = from_pretrained(args.checkpoint, device=args.device)
    extensions = {m: tuple(model.spec(m).file_extensions) for m in model.modalities}
    args.out.mkdir(parents=True, exist_ok=True)

    groups: dict[str, list[Any]] = defaultdict(list)
    sources: dict[str, list[str]] = defaultdict(list)
    for path in args.inputs:
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such file")
        modality = _modality_of(path, extensions)
        # A text file is one text; other files are decoded by their modality's preprocessor.
        groups[modality].append(path.read_text() if modality == ANCHOR_MODALITY else path)
        sources[modality].append(str(path))
    for text in args.text:
        groups[ANCHOR_MODALITY].append(text)
        sources[ANCHOR_MODALITY].append(text)
    embeddings: dict[str, list[Any]] = defaultdict(list)
    for modality, items in groups.items():
        result = model.encode(batch_size=args.batch_size, **{modality: items})
        embeddings[modality].append(result[modality])
    if args.shards:
        _embed_shards(model, args, extensions, embeddings, sources)
    for modality in embeddings:
        _write(args.out, modality, embeddings[modality], sources[modality])
    return 0


def _embed_shards(model, args, extensions, embeddings, sources) -> None:
    import torch
    from tqdm.auto import tqdm

    from peace_core.data.pipeline import sequential_loader

    unknown = [m for m in args.modality if m not in model.modalities]
    if unknown:
        raise ValueError(f"model has no modality {unknown[0]!r}; it has {list(model.modalities)}")
    loader = sequential_loader(
        args.shards,
        args.modality,
        {m: model.preprocessor(m) for m in args.modality},
        {m: extensions[m] for m in args.modality},
        batch_size=args.batch_size,
    )
    device = next(model.parameters()).device
    with torch.no_grad():
        for batch in tqdm(loader, desc="embed shards", unit="batch"):
            for modality in args.modality:
                collated = {k: v.to(device) for k, v in batch["modalities"][modality].items()}
                out = model.branch(modality)({modality: collated})[modality]
                embeddings[modality].append(out.embedding.float().cpu())
                sources[modality].extend(_sample_name(meta) for meta in batch["meta"])
    if loader.stats.bad_total:
        print(loader.stats.summary())


def _sample_name(meta: dict[str, Any]) -> str:
    return f"{meta.get('url', '')}#{meta.get('key', '')}"
