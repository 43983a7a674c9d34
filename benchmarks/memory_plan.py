"""Training memory per device for each preset and ``distributed.strategy``, computed from exact
parameter counts (the model and the pretraining decoder built on the meta device).

    python benchmarks/memory_plan.py [--presets tiny,small,base,large,one-peace-4b] [--ranks 8]

Persistent training state is fp32: weights 4 B, gradients 4 B and AdamW's two moments 8 B per
trainable parameter (16 B). With ``ddp`` every device holds all of it, plus the bf16 copies of the
weights autocast makes during a step (2 B). With ``fsdp`` over N ranks a device holds 16 B / N per
parameter, plus what is gathered in bf16 at a time: the adapters, the model's own layers and the
decoder (kept from forward to backward) and two fusion blocks (the one running and the one
prefetched), with their bf16 gradients before the fp32 reduce-scatter. With ``cpu_offload`` the
16 B / N live in host memory instead. Activations come on top of every figure: they depend on
batch and sequence length, and ``grad_checkpointing`` cuts them to one block's worth per layer.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch

from peace_core import create_model
from peace_core.pretrain.objective import ObjectiveConfig, PretrainObjective

GIB = 2**30
STATE_BYTES = 16  # fp32 weight + gradient + two AdamW moments
BF16 = 2


@dataclass(frozen=True)
class Sizes:
    """Parameter counts of what FSDP shards as separate units."""

    total: int
    largest_block: int
    kept_gathered: int  # adapters, the model's own layers, the decoder


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def sizes(preset: str) -> Sizes:
    with torch.device("meta"):
        model = create_model(preset)
        objective = PretrainObjective(model, ObjectiveConfig())
    blocks = [count(block) for block in model.encoder.blocks]
    total = count(objective)
    return Sizes(total=total, largest_block=max(blocks), kept_gathered=total - sum(blocks))


def plan(s: Sizes, ranks: int) -> dict[str, tuple[float, float]]:
    """``{strategy: (GiB on the device, GiB in host memory)}`` before activations."""
    gathered = BF16 * 2 * (s.kept_gathered + 2 * s.largest_block)  # weights + their gradients
    return {
        "ddp": ((STATE_BYTES + BF16) * s.total / GIB, 0.0),
        f"fsdp x{ranks}": ((STATE_BYTES * s.total / ranks + gathered) / GIB, 0.0),
        f"fsdp x{ranks} + cpu_offload": (gathered / GIB, STATE_BYTES * s.total / ranks / GIB),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", default="tiny,small,base,large,one-peace-4b")
    parser.add_argument("--ranks", type=int, default=8, help="ranks FSDP shards over")
    args = parser.parse_args()
    if args.ranks < 1:
        parser.error("--ranks must be >= 1")
    strategies = list(plan(Sizes(1, 1, 1), args.ranks))
    print("| preset | parameters (all modalities + decoder) | " + " | ".join(strategies) + " |")
    print("|---|---:|" + "---:|" * len(strategies))
    for preset in args.presets.split(","):
        s = sizes(preset)
        cells = [
            f"{device:.2f} GiB" + (f" (+{host:.2f} GiB host)" if host else "")
            for device, host in plan(s, args.ranks).values()
        ]
        print(f"| `{preset}` | {s.total / 1e6:,.1f} M | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
