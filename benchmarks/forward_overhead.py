"""Per-call overhead of ``PeaceModel.forward`` on a tiny model and a tiny batch, where the
module bookkeeping around the layers shows: the model's forward against a branch built once
and called directly (the floor), and ``model.branch(...)`` per call.

    python benchmarks/forward_overhead.py [--repeats 200]
"""

from __future__ import annotations

import argparse
import time

import torch

from peace_core import create_model


def _per_call(fn, repeats: int) -> float:
    for _ in range(10):
        fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=200)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = create_model("tiny").eval()
    modalities = list(model.modalities)
    batch = {}
    for name in modalities:
        pre = model.preprocessor(name)
        batch[name] = pre.collate([pre(item) for item in pre.examples(2, seed=0)])
    single = {modalities[0]: batch[modalities[0]]}
    branch = model.branch(modalities[0])
    with torch.no_grad():
        rows = [
            ("model(batch), one modality", _per_call(lambda: model(single), args.repeats)),
            ("model.branch(m) then call", _per_call(lambda: model.branch(modalities[0])(single), args.repeats)),
            ("a branch built once (floor)", _per_call(lambda: branch(single), args.repeats)),
            ("model(batch), joint of all", _per_call(lambda: model(batch, joint=True), args.repeats)),
        ]
    print(f"tiny preset, batch of 2, {args.repeats} calls, 1 thread, CPU")
    print("| call | ms per call |\n|---|---|")
    for name, ms in rows:
        print(f"| {name} | {ms:.2f} |")


if __name__ == "__main__":
    main()
