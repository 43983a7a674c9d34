"""Did extending a model move anything it already knew? Compare two checkpoints on fixed inputs.

    python examples/peace-imu/scripts/check_unchanged.py BEFORE AFTER

For every modality of BEFORE, encodes the same generated inputs (the plugins' own ``examples()``)
with both models and prints whether hidden states and embeddings are bit-identical, with the
largest difference. Exits 1 when any differs.
"""

from __future__ import annotations

import argparse

import torch
from peace_core import from_pretrained


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("before")
    parser.add_argument("after")
    parser.add_argument("--count", type=int, default=8, help="inputs per modality (default 8)")
    args = parser.parse_args()
    before, after = from_pretrained(args.before), from_pretrained(args.after)
    added = [m for m in after.modalities if m not in before.modalities]
    print(f"before: {', '.join(before.modalities)}; after adds: {', '.join(added) or 'nothing'}")
    same = True
    with torch.no_grad():
        for modality in before.modalities:
            items = before.preprocessor(modality).examples(args.count, seed=0)
            batch = before.preprocess(**{modality: items})
            a, b = before(batch)[modality], after(batch)[modality]
            identical = torch.equal(a.hidden, b.hidden) and torch.equal(a.embedding, b.embedding)
            largest = (a.embedding - b.embedding).abs().max().item()
            same = same and identical
            verdict = "bit-identical" if identical else "DIFFERENT"
            print(f"{modality:>8}: {verdict} (largest embedding difference {largest:.3g})")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
