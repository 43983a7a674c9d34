"""Measured memory per rank of pretraining steps under one ``distributed.strategy`` (CPU, gloo),
to set beside the computed plan of ``benchmarks/memory_plan.py``.

    torchrun --standalone --nproc-per-node 2 benchmarks/strategy_memory.py --strategy fsdp

Each rank builds the preset (vision + text, the full objective), applies the strategy, runs
``--steps`` AdamW steps on a fixed batch and prints what it holds afterwards — the bytes of its
parameters (its shards under FSDP) and optimizer state, counted from the live tensors — and the
peak resident memory the process reached above what it held before building the model. Run
each strategy in a process of its own: a process's peak and its allocator's cache do not go down.
"""

from __future__ import annotations

import argparse
import os
import resource

import torch
import torch.distributed as dist

from peace_core import create_model
from peace_core.pretrain.objective import ObjectiveConfig, PretrainObjective
from peace_core.pretrain.optim import OptimConfig, build_optimizer
from peace_core.pretrain.runtime import Precision, RunContext
from peace_core.pretrain.strategy import DistributedConfig, build_strategy

MIB = 2**20


def rss() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / MIB


def peak() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def local_bytes(tensor: torch.Tensor) -> int:
    local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
    return local.numel() * local.element_size()


def measure(strategy_name: str, preset: str, batch_size: int, steps: int) -> tuple[float, float]:
    context = RunContext(torch.device("cpu"), dist.get_rank(), dist.get_world_size())
    base = rss()
    torch.manual_seed(0)
    model = create_model(preset, modalities=["vision", "text"])
    objective = PretrainObjective(model, ObjectiveConfig())
    strategy = build_strategy(
        DistributedConfig(strategy=strategy_name), context, Precision("fp32", None)
    )
    strategy.prepare(objective)
    optimizer = build_optimizer(objective, OptimConfig())
    wrapped = strategy.wrap(objective, find_unused_parameters=True)
    # Collated inputs made directly (the preset's text tokenizer needs the official BPE files).
    gen = torch.Generator().manual_seed(context.rank)
    size = model.options["vision"].image_size  # type: ignore[attr-defined]
    tokens = torch.randint(4, model.adapters["text"].vocab_size, (batch_size, 70), generator=gen)
    batch = {
        "vision": {"pixels": torch.randn(batch_size, 3, size, size, generator=gen)},
        "text": {"tokens": tokens, "word_start": torch.rand(tokens.shape, generator=gen) < 0.6},
    }
    for _ in range(steps):
        loss, _ = wrapped(batch, torch.Generator().manual_seed(1))
        loss.backward()
        strategy.finish_gradients(objective)
        strategy.clip_grad_norm([p for p in objective.parameters() if p.requires_grad], 3.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    held = sum(local_bytes(p) for p in objective.parameters())
    for state in optimizer.state.values():
        held += sum(local_bytes(v) for v in state.values() if isinstance(v, torch.Tensor))
    return held / MIB, peak() - base


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--strategy", default="fsdp", choices=["ddp", "fsdp"])
    args = parser.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    held, top = measure(args.strategy, args.preset, args.batch_size, args.steps)
    rows: list[tuple[float, float]] = [(0.0, 0.0)] * dist.get_world_size()
    dist.all_gather_object(rows, (held, top))
    if dist.get_rank() == 0:
        shown = ", ".join(
            f"rank {r}: weights + AdamW {h:.0f} MiB, peak +{p:.0f} MiB"
            for r, (h, p) in enumerate(rows)
        )
        print(f"{args.preset}, {args.strategy} x{dist.get_world_size()}: {shown}", flush=True)
    dist.destroy_process_group()
    # The figures are out. gloo's threads can abort the interpreter's teardown at random, even
    # after destroy_process_group ("terminate called without an active exception"; seen here under
    # FSDP and in the gloo tests' workers): skip the teardown so the exit status is the run's.
    os._exit(0)


if __name__ == "__main__":
    main()
