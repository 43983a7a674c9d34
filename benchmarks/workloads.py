"""Time, peak memory and model-FLOPs utilisation of six standard workloads, one fresh process each.

The workloads (batch 8 by default) are those of ONE-PEACE's own use: the text, image and audio
forwards of retrieval, the fused image+text forward, and the image-text and audio-text pretraining
steps (the full objective: unmasked passes, the joint target pass, masked students, the decoder,
both contrasts, then the backward; no optimizer step; ONE-PEACE's stage-1 loss for image-text,
its stage-2 loss for audio-text, every parameter training). Inputs: 70 text ids (the official
maximum, EOS included), 256-px images (256 patches + CLS), 5 s clips at 16 kHz through the
official 512-channel audio extractor.

    python benchmarks/workloads.py                              # small and base, all six, CPU fp32
    python benchmarks/workloads.py --sizes base --workloads image_text_step --checkpointing blocks
    python benchmarks/workloads.py --device cuda --dtype bf16 --attention xformers
    python benchmarks/workloads.py --json ours.jsonl                 # keep every result
    python benchmarks/workloads.py --compare baseline.jsonl ours.jsonl   # ratios, per workload

``--compare`` reads two result files of the same schema (another implementation's harness can
write it: ``size``, ``workload``, ``median_s``, ``peak_mem_mb`` per line) and prints the speed
ratio (baseline time / ours: above 1 means faster) and the memory ratio (ours / baseline).

Each (size, workload) runs in a fresh Python process, so one workload's allocator state, caches
and peak memory never leak into the next. The parent first measures the device's matmul
throughput in the same run (large square matmuls, best of several); MFU is the workload's counted
FLOPs (``torch.utils.flop_counter``: matmuls, convolutions and attention, forward and backward)
divided by its median time and by that measured throughput. Memory is the peak increase over the
built model and inputs: resident set size on CPU, ``max_memory_allocated`` on CUDA.

Each child sets up its process as the ``peace`` commands do: the given intra-op threads, host
memory kept for reuse (``peace_core.host_memory``) and the fp32 CPU GEMM library
(``peace_core.gemm``); ``PEACE_KEEP_HOST_MEMORY=0`` measures with the system's malloc settings,
``PEACE_CPU_GEMM=blas`` with torch's BLAS for every matmul.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

WORKLOADS = (
    "text_forward",
    "image_forward",
    "audio_forward",
    "joint_forward",
    "image_text_step",
    "audio_text_step",
)
DTYPES = ("fp32", "bf16", "fp16")
TEXT_TOKENS = 70  # ids per caption, EOS included (the official maximum)
IMAGE_SIZE = 256
AUDIO_SECONDS = 5.0


@dataclass
class Settings:
    size: str
    workload: str
    batch: int
    warmup: int
    repeats: int
    threads: int
    device: str
    dtype: str
    attention: str
    checkpointing: str
    compile: bool


def _settings_args(settings: Settings) -> list[str]:
    args = [
        f"--size={settings.size}",
        f"--workload={settings.workload}",
        f"--batch={settings.batch}",
        f"--warmup={settings.warmup}",
        f"--repeats={settings.repeats}",
        f"--threads={settings.threads}",
        f"--device={settings.device}",
        f"--dtype={settings.dtype}",
        f"--attention={settings.attention}",
        f"--checkpointing={settings.checkpointing}",
    ]
    return args + (["--compile"] if settings.compile else [])


# ----------------------------------------------------------------------------- the child process


def _rss_mib() -> float:
    with open("/proc/self/statm") as statm:
        pages = int(statm.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _inputs(model: Any, batch: int, device: Any) -> dict[str, dict[str, Any]]:
    import torch

    gen = torch.Generator().manual_seed(0)
    vocab = model.adapters["text"].vocab_size
    tokens = torch.randint(4, vocab, (batch, TEXT_TOKENS), generator=gen)
    tokens[:, -1] = 2  # EOS
    # The standard shapes, or the largest a smaller preset (tiny) accepts.
    image = min(IMAGE_SIZE, model.options["vision"].image_size)
    audio = model.options["audio"]
    samples = int(min(AUDIO_SECONDS, audio.max_duration) * audio.sample_rate)
    inputs = {
        # Words of one to three tokens, as whole-word masking reads them.
        "text": {"tokens": tokens, "word_start": torch.rand(tokens.shape, generator=gen) < 0.6},
        "vision": {"pixels": torch.randn(batch, 3, image, image, generator=gen)},
        "audio": {
            "waveform": torch.randn(batch, samples, generator=gen),
            "lengths": torch.full((batch,), samples, dtype=torch.long),
        },
    }
    return {m: {k: v.to(device) for k, v in parts.items()} for m, parts in inputs.items()}


def _torch_dtype(name: str) -> Any:
    """The torch dtype of one of ``DTYPES``."""
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def _build(settings: Settings) -> tuple[Any, Callable[[], None], int]:
    """The model, a zero-argument closure running the workload once, and the parameter count."""
    import torch

    from peace_core import create_model
    from peace_core.pretrain.objective import LossWeights, ObjectiveConfig, PretrainObjective

    device = torch.device(settings.device)
    checkpointing = settings.checkpointing
    encoder: dict[str, Any] = {
        "attention": settings.attention,
        "grad_checkpointing": checkpointing in ("blocks", "all"),
    }
    if settings.compile:
        encoder["compile"] = True
    options = {"audio": {"grad_checkpointing": True}} if checkpointing in ("audio", "all") else {}
    modalities = ["text", "vision", "audio"]
    model = create_model(settings.size, modalities, options=options, device=device, **encoder)
    batch = _inputs(model, settings.batch, device)
    dtype = _torch_dtype(settings.dtype)

    def autocast() -> Any:
        return torch.autocast(device.type, dtype=dtype, enabled=settings.dtype != "fp32")

    name = settings.workload
    if name.endswith("_forward"):
        model.eval()
        parts = {
            "text_forward": ["text"],
            "image_forward": ["vision"],
            "audio_forward": ["audio"],
            "joint_forward": ["text", "vision"],
        }[name]
        sub = {m: batch[m] for m in parts}

        def run() -> None:
            with torch.inference_mode(), autocast():
                model(sub)

        return model, run, sum(p.numel() for p in model.parameters())

    other = {"image_text_step": "vision", "audio_text_step": "audio"}[name]
    # Each step's loss is ONE-PEACE's for that pair: stage 1 for image-text, stage 2 for
    # audio-text (no text-only view; the audio view's targets from the joint pass). Every
    # parameter trains in both (no freezing), so the text side still takes gradients.
    config = ObjectiveConfig()
    if other == "audio":
        config = ObjectiveConfig(weights=LossWeights.stage2(), single_targets_from_joint=["audio"])
    objective = PretrainObjective(model, config).train()
    sub = {"text": batch["text"], other: batch[other]}
    generator = torch.Generator().manual_seed(0)

    def step() -> None:
        with autocast():
            loss, _ = objective(sub, generator)
        loss.backward()
        objective.zero_grad(set_to_none=True)

    return model, step, sum(p.numel() for p in objective.parameters())


def _count_flops(run: Callable[[], None], model: Any, attention: str) -> int:
    """FLOPs of one run. Counted under the ``math`` attention backend, whose matmuls the counter
    sees on every device (the FLOPs are the same whichever kernel runs them)."""
    from torch.utils.flop_counter import FlopCounterMode

    from peace_core.encoder import FusionEncoder

    encoders = [m for m in model.modules() if isinstance(m, FusionEncoder)]
    for encoder in encoders:
        encoder.set_attention_backend("math")
    counter = FlopCounterMode(display=False)
    with counter:
        run()
    for encoder in encoders:
        encoder.set_attention_backend(attention)
    return counter.get_total_flops()


def run_child(settings: Settings) -> dict[str, Any]:
    import torch

    from peace_core.gemm import cpu_gemm
    from peace_core.host_memory import keep_freed_host_memory

    torch.set_num_threads(settings.threads)
    host_malloc = keep_freed_host_memory()
    gemm = cpu_gemm() if settings.device == "cpu" else "torch"
    torch.manual_seed(0)
    cuda = settings.device.startswith("cuda")
    model, run, params = _build(settings)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base_mem = torch.cuda.memory_allocated() / 2**20
    else:
        base_mem = _rss_mib()
    times = []
    for index in range(settings.warmup + settings.repeats):
        start = time.perf_counter()
        run()
        if cuda:
            torch.cuda.synchronize()
        if index >= settings.warmup:
            times.append(time.perf_counter() - start)
    peak = (torch.cuda.max_memory_allocated() / 2**20 if cuda else _peak_rss_mib()) - base_mem
    if settings.compile:  # the counter cannot see inside compiled graphs: count an eager twin
        del model, run
        model, run, _ = _build(replace(settings, compile=False))
    flops = _count_flops(run, model, settings.attention)
    median = statistics.median(times)
    return {
        "impl": "peace",
        "size": settings.size,
        "workload": settings.workload,
        "batch": settings.batch,
        "median_s": median,
        "times_s": times,
        "samples_per_s": settings.batch / median,
        "peak_mem_mb": max(peak, 0.0),
        "params": params,
        "flops": flops,
        "threads": settings.threads,
        "device": settings.device,
        "dtype": settings.dtype,
        "attention": settings.attention,
        "checkpointing": settings.checkpointing,
        "compile": settings.compile,
        "host_malloc": host_malloc,
        "cpu_gemm": gemm,
    }


# ----------------------------------------------------------------------------- the parent process


def matmul_throughput(device: str, dtype: str, threads: int, size: int = 2048) -> float:
    """Best measured FLOP/s of a square matmul on ``device`` in ``dtype`` (the MFU denominator):
    on CPU the best of torch's BLAS and oneDNN (``peace_core.gemm``) with the second operand in
    either layout, so MFU is against the fastest library and layout here, not the ones the
    workloads happen to use."""
    import torch

    from peace_core import gemm

    torch.set_num_threads(threads)
    torch_dtype = _torch_dtype(dtype)
    a = torch.randn(size, size, device=device, dtype=torch_dtype)
    b = torch.randn(size, size, device=device, dtype=torch_dtype)
    kernels: list[Callable[[], Any]] = [lambda: a @ b]
    if device == "cpu" and dtype == "fp32" and gemm.onednn_available():
        kernels += [lambda: gemm.onednn_linear(a, b), lambda: gemm.onednn_linear(a, b.t())]
    repeats = 4 if device.startswith("cuda") else 1
    best = float("inf")
    for _ in range(6):
        for kernel in kernels:
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(repeats):
                kernel()
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            best = min(best, (time.perf_counter() - start) / repeats)
    return 2 * size**3 / best


def run_in_fresh_process(settings: Settings) -> dict[str, Any]:
    command = [sys.executable, __file__, "--child", *_settings_args(settings)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(
            f"workload {settings.workload} ({settings.size}) failed:\n{done.stderr[-3000:]}"
        )
    return json.loads(done.stdout.strip().splitlines()[-1])


def print_table(results: list[dict[str, Any]], peak_flops: float) -> None:
    print(
        "| size | workload | median s | samples/s | peak memory MiB | GFLOP | MFU |\n"
        "|---|---|---:|---:|---:|---:|---:|"
    )
    for row in results:
        mfu = row["flops"] / row["median_s"] / peak_flops if row["flops"] else float("nan")
        print(
            f"| {row['size']} | {row['workload']} | {row['median_s']:.3f} | "
            f"{row['samples_per_s']:.2f} | {row['peak_mem_mb']:.0f} | {row['flops'] / 1e9:.1f} | "
            f"{mfu:.0%} |"
        )


def _read_results(path: str) -> dict[tuple[str, str], dict[str, Any]]:
    with open(path) as lines:
        rows = [json.loads(line) for line in lines if line.strip()]
    return {(row["size"], row["workload"]): row for row in rows}


def print_comparison(baseline_path: str, ours_path: str) -> None:
    """Speed and memory ratios of ``ours`` against ``baseline`` for every workload in both."""
    baseline, ours = _read_results(baseline_path), _read_results(ours_path)
    shared = [key for key in ours if key in baseline]
    if not shared:
        raise SystemExit(f"{baseline_path} and {ours_path} have no (size, workload) in common")
    print(
        "| size | workload | baseline s | ours s | speed (baseline / ours) | baseline MiB | "
        "ours MiB | memory (ours / baseline) |\n|---|---|---:|---:|---:|---:|---:|---:|"
    )
    for key in shared:
        theirs, mine = baseline[key], ours[key]
        memory = mine["peak_mem_mb"] / theirs["peak_mem_mb"] if theirs["peak_mem_mb"] else math.nan
        print(
            f"| {key[0]} | {key[1]} | {theirs['median_s']:.3f} | {mine['median_s']:.3f} | "
            f"{theirs['median_s'] / mine['median_s']:.2f}× | {theirs['peak_mem_mb']:.0f} | "
            f"{mine['peak_mem_mb']:.0f} | {memory:.2f} |"
        )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="small,base", help="comma-separated presets")
    parser.add_argument("--workloads", default=",".join(WORKLOADS), help="comma-separated")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--threads", type=int, default=os.cpu_count() or 1, help="torch intra-op threads"
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=DTYPES, default="fp32", help="autocast dtype")
    parser.add_argument("--attention", default="auto", help="auto, math, sdpa or xformers")
    parser.add_argument(
        "--checkpointing",
        choices=("none", "blocks", "audio", "all"),
        default="none",
        help="activation checkpointing: fusion blocks, the audio extractor, or both",
    )
    parser.add_argument("--compile", action="store_true", help="torch.compile the fusion encoder")
    parser.add_argument("--json", default=None, help="also write every result (JSON lines) here")
    parser.add_argument(
        "--compare",
        nargs=2,
        metavar=("BASELINE", "OURS"),
        help="print speed and memory ratios of two --json result files, then exit",
    )
    # Internal: run one workload in this process and print its JSON line.
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--size", help=argparse.SUPPRESS)
    parser.add_argument("--workload", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def _settings(args: argparse.Namespace, size: str, workload: str) -> Settings:
    return Settings(
        size=size,
        workload=workload,
        batch=args.batch,
        warmup=args.warmup,
        repeats=args.repeats,
        threads=args.threads,
        device=args.device,
        dtype=args.dtype,
        attention=args.attention,
        checkpointing=args.checkpointing,
        compile=args.compile,
    )


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.compare:
        print_comparison(*args.compare)
        return
    if args.child:
        print(json.dumps(run_child(_settings(args, args.size, args.workload))))
        return
    unknown = sorted(set(args.workloads.split(",")) - set(WORKLOADS))
    if unknown:
        raise SystemExit(f"unknown workloads {unknown}; expected some of {list(WORKLOADS)}")
    peak = matmul_throughput(args.device, args.dtype, args.threads)
    import torch

    print(
        f"torch {torch.__version__}, {args.device}, {args.dtype}, {args.threads} threads, batch "
        f"{args.batch}, attention {args.attention}, checkpointing {args.checkpointing}, compile "
        f"{args.compile}; measured matmul throughput {peak / 1e9:.0f} GFLOP/s"
    )
    results = []
    for size in args.sizes.split(","):
        for workload in args.workloads.split(","):
            results.append(run_in_fresh_process(_settings(args, size, workload)))
            results[-1]["matmul_flops_per_s"] = peak
            print(f"  {size} {workload}: {results[-1]['median_s']:.3f} s", file=sys.stderr)
    print(f"host malloc: {results[-1]['host_malloc']}" if results else "no workloads")
    print_table(results, peak)
    if args.json:
        with open(args.json, "w") as out:
            out.writelines(json.dumps(row) + "\n" for row in results)


if __name__ == "__main__":
    main()
