"""Per-call cost of a model forward where module bookkeeping shows: a small batch on a CPU.

Compares, in one run, the model's forward (runs its modules directly), a cached branch, and the
baseline of building a branch on every call (``copy.copy`` of the encoder and of every block, as
the model's forward once did). The difference between the rows is the bookkeeping; it grows
with depth.

    python benchmarks/forward_overhead.py [--preset tiny] [--depth 12] [--modality text]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

from peace_core import create_model


def _per_call(fn: Callable[[], object], repeats: int) -> float:
    for _ in range(5):
        fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--depth", type=int, default=None, help="override the preset's depth")
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument(
        "--modality", default=None, help="modality to encode (default: the model's first)"
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    overrides = {} if args.depth is None else {"depth": args.depth}
    model = create_model(args.preset, **overrides).eval()
    modality = args.modality or model.modalities[0]
    pre = model.preprocessor(modality)
    batch = {modality: pre.collate([pre(item) for item in pre.examples(2, seed=0)])}

    def rebuilt_branch() -> object:
        model._branches.clear()  # the baseline: a fresh branch per call
        return model.branch(modality)(batch)

    with torch.no_grad():
        rows = [
            ("branch built on every call (baseline)", _per_call(rebuilt_branch, args.repeats)),
            ("model(batch)", _per_call(lambda: model(batch), args.repeats)),
            (
                "model.branch(m)(batch), cached",
                _per_call(lambda: model.branch(modality)(batch), args.repeats),
            ),
        ]
    depth = model.config.encoder.depth
    print(
        f"{args.preset} preset, depth {depth}, {modality}, batch of 2, {args.repeats} calls, "
        "1 thread, CPU"
    )
    print("| call | ms per call | vs baseline |\n|---|---|---|")
    baseline = rows[0][1]
    for name, ms in rows:
        print(f"| {name} | {ms:.2f} | {baseline / ms:.2f}x |")


if __name__ == "__main__":
    main()
