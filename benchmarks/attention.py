"""Forward+backward time (and CUDA peak memory) of a FusionEncoder under each attention backend.

Every available backend runs in the same process on the same weights and inputs, with ``math``
(the readable reference) as the baseline row:

    python benchmarks/attention.py                       # CPU: math vs sdpa, a 2-layer base slice
    python benchmarks/attention.py --device cuda --depth 12 --dtype bf16   # + xformers
    python benchmarks/attention.py --attention-only --tokens 125   # ``attend`` alone

``--attention-only`` times ``attend``'s forward+backward alone, with a bias that takes a gradient
(as a trained relative-position table's does), and adds torch's own
``scaled_dot_product_attention`` as a row: on CPU the ``sdpa`` backend runs its own function
there instead of torch's unfused math fallback, and this shows what that is worth.

The joint input is one image-like segment of ``--tokens`` tokens with a shared relative-position
table and a few padded keys, as in real batches, so the attention bias path is exercised.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from peace_core.attention import attend, resolve_backend
from peace_core.config import EncoderConfig
from peace_core.encoder import FusionEncoder, Segment
from peace_core.host_memory import keep_freed_host_memory
from peace_core.layers import GeGLUFFN
from peace_registry.contract import RelativePositions

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Result:
    backend: str
    median_ms: float
    peak_mib: float | None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="autocast dtype")
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--ffn-dim", type=int, default=3072)
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=257, help="sequence length T (CLS included)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per backend")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument(
        "--backends", default="math,sdpa,xformers", help="comma-separated; unavailable ones skipped"
    )
    parser.add_argument(
        "--attention-only",
        action="store_true",
        help="time attend() alone (bias with a gradient), with torch's sdpa as an extra row",
    )
    return parser.parse_args(argv)


def _median_ms(step: Callable[[], object], args: argparse.Namespace, device: torch.device) -> float:
    """Median wall time of ``step`` over ``args.steps`` runs after ``args.warmup``, in ms."""
    cuda = device.type == "cuda"
    times = []
    for index in range(args.warmup + args.steps):
        if cuda:
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize(device)
        if index >= args.warmup:
            times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def time_attention_only(
    args: argparse.Namespace, device: torch.device, backends: list[str]
) -> list[Result]:
    """Forward+backward of ``attend`` alone over ``[B, heads, T, dim/heads]`` in ``--dtype`` with
    a shared ``[1, heads, T, T]`` bias that takes a gradient; ``torch-sdpa`` is torch's own
    function."""
    gen = torch.Generator().manual_seed(0)
    dtype = DTYPES[args.dtype]
    shape = (args.batch, args.heads, args.tokens, args.dim // args.heads)
    q, k, v = (torch.randn(shape, generator=gen).to(device, dtype).requires_grad_() for _ in "qkv")
    bias = torch.randn(1, args.heads, args.tokens, args.tokens, generator=gen).to(device, dtype)
    bias.requires_grad_()
    grad = torch.randn(shape, generator=gen).to(device, dtype)
    scale = (args.dim // args.heads) ** -0.5
    kernels = {name: (lambda name=name: attend(q, k, v, bias, name)) for name in backends}
    kernels["torch-sdpa"] = lambda: F.scaled_dot_product_attention(
        q, k, v, attn_mask=bias, scale=scale
    )
    return [
        Result(
            name,
            _median_ms(
                lambda kernel=kernel: torch.autograd.grad(kernel(), (q, k, v, bias), grad),
                args,
                device,
            ),
            None,
        )
        for name, kernel in kernels.items()
    ]


def make_inputs(args: argparse.Namespace, device: torch.device) -> list[Segment]:
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randn(args.batch, args.tokens, args.dim, generator=gen).to(device)
    mask = torch.zeros(args.batch, args.tokens, dtype=torch.bool, device=device)
    mask[-1, -args.tokens // 8 :] = True  # one sample with padded keys
    rows = 64
    table = nn.Embedding(rows, args.heads, device=device)
    nn.init.normal_(table.weight, std=0.1)
    positions = torch.arange(args.tokens, device=device)
    index = (positions[:, None] - positions[None, :]).clamp(-31, 31) + 31
    return [Segment("vision", tokens, mask, RelativePositions(index, [table]))]


def time_backend(
    encoder: FusionEncoder,
    segments: list[Segment],
    backend: str,
    args: argparse.Namespace,
    device: torch.device,
) -> Result:
    encoder.set_attention_backend(backend)
    autocast = torch.autocast(device.type, dtype=DTYPES[args.dtype], enabled=args.dtype != "fp32")
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)

    def step() -> None:
        encoder.zero_grad(set_to_none=True)
        with autocast:
            out = encoder(segments)
        out.hidden[0].float().square().mean().backward()

    median = _median_ms(step, args, device)
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if cuda else None
    return Result(backend, median, peak)


def available(backend: str, device: torch.device, dtype: torch.dtype) -> str | None:
    """None when ``backend`` can run here, else why not."""
    try:
        resolve_backend(backend, device, dtype)
    except (ValueError, RuntimeError) as error:
        return str(error)
    return None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    keep_freed_host_memory()  # as the peace commands do: no page faults on reused activations
    torch.manual_seed(0)
    what = "attend() alone" if args.attention_only else f"FusionEncoder depth={args.depth}"
    print(
        f"{what} dim={args.dim} heads={args.heads} ffn={args.ffn_dim} "
        f"T={args.tokens} B={args.batch} on {device} ({args.dtype}), "
        f"median of {args.steps} fwd+bwd steps"
    )
    runnable = []
    for backend in [b.strip() for b in args.backends.split(",") if b.strip()]:
        reason = available(backend, device, DTYPES[args.dtype])
        if reason is not None:
            print(f"  skipping {backend}: {reason}")
            continue
        runnable.append(backend)
    if args.attention_only:
        results = time_attention_only(args, device, runnable)
    else:
        config = EncoderConfig(
            dim=args.dim, depth=args.depth, heads=args.heads, ffn_dim=args.ffn_dim, attention="math"
        )
        ffns = {"vision": lambda: GeGLUFFN(args.dim, args.ffn_dim, device=device)}
        encoder = FusionEncoder(config, ffns, device=device).train()
        segments = make_inputs(args, device)
        results = [time_backend(encoder, segments, b, args, device) for b in runnable]
    if not results:
        print("no backend could run", file=sys.stderr)
        return 1
    baseline = next((r for r in results if r.backend == "math"), results[0])
    header = f"{'backend':<10}{'ms/step':>10}{'vs ' + baseline.backend:>10}{'peak MiB':>10}"
    print(header)
    print("-" * len(header))
    for r in results:
        peak = f"{r.peak_mib:.0f}" if r.peak_mib is not None else "-"
        speedup = baseline.median_ms / r.median_ms
        print(f"{r.backend:<10}{r.median_ms:>10.1f}{speedup:>9.2f}x{peak:>10}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
