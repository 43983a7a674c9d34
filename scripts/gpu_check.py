"""GPU acceptance check for the attention backends and the fusion encoder.

Run on a CUDA machine:  python scripts/gpu_check.py [--sizes small,base] [--no-workloads]
Prints one PASS/FAIL line per check and exits non-zero if any check fails (2 when there is no GPU).
Then times the six standard workloads of ``benchmarks/workloads.py`` in bf16 under ``xformers``
and ``sdpa`` (time, peak memory, MFU against the measured bf16 matmul), within a time budget
(``--budget-s``, default 420 s: the whole script stays under 8 minutes).

Checks, in fp32 and bf16:
* ``attend``: xformers and sdpa against the fp32 ``math`` reference, forward and backward
  (q, k, v and the bias gradient), with padded (-inf) keys and a length that is not a multiple of 8;
* a FusionEncoder forward+backward (rel-pos table gradient included) per backend vs ``math``;
* ``auto`` resolves to xformers on CUDA when xformers is installed;
* a few training steps of a small encoder per backend under autocast, with the loss going down;
* pretraining steps of the ``small`` preset (vision + text, the full objective, bf16) under each
  ``distributed.strategy`` (ddp, fsdp, fsdp with CPU offload) in a process group of one: finite
  losses, FSDP's within bf16 noise of DDP's, and each one's peak memory.

Tolerances are relative to the largest reference value. In fp32 a backend must agree to 1e-4; in
bf16 its error against the fp32 reference may be at most twice that of the bf16 ``math`` backend
(plus 1e-3): bf16 rounding is expected, anything beyond is a bug.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from peace_core.attention import attend, resolve_backend
from peace_core.config import EncoderConfig
from peace_core.encoder import FusionEncoder, Segment
from peace_core.layers import GeGLUFFN
from peace_registry.contract import RelativePositions

DEVICE = torch.device("cuda")
FP32_TOLERANCE = 1e-4
BF16_FLOOR = 1e-3

failures: list[str] = []


def check(name: str, body: Callable[[], str]) -> None:
    """Run one check; ``body`` returns a detail string or raises AssertionError/any error."""
    try:
        detail = body()
    except Exception as error:
        failures.append(name)
        print(f"FAIL {name}: {type(error).__name__}: {error}")
        traceback.print_exc(limit=3)
        return
    print(f"PASS {name}  {detail}")


def max_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def _attention_inputs(dtype: torch.dtype) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    batch, heads, length, head_dim = 3, 4, 77, 64
    q, k, v = (torch.randn(batch, heads, length, head_dim, generator=gen) for _ in range(3))
    bias = torch.randn(batch, heads, length, length, generator=gen)
    bias[-1, :, :, -9:] = float("-inf")
    return [t.to(DEVICE, dtype).requires_grad_(True) for t in (q, k, v, bias)]


def _attend_with_grads(backend: str, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    q, k, v, bias = tensors
    out = attend(q, k, v, bias, backend)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    grads = torch.autograd.grad((out.float() * weights).sum(), [q, k, v, bias])
    return [out.detach(), *grads]


def _scale(tensor: torch.Tensor) -> float:
    """Largest finite magnitude: tolerances are relative to it."""
    finite = tensor[torch.isfinite(tensor)]
    return finite.float().abs().max().item() if finite.numel() else 1.0


def _compare(
    backend: str, dtype: torch.dtype, run: Callable[[str, torch.dtype], list[torch.Tensor]]
) -> str:
    reference = run("math", torch.float32)
    got = run(backend, dtype)
    names = ["out", *(f"grad{i}" for i in range(1, len(got)))]
    if dtype == torch.float32:
        limits = [FP32_TOLERANCE * _scale(r) for r in reference]
    else:
        rounded = run("math", dtype)
        limits = [2 * max_error(m, r) + BF16_FLOOR * _scale(r) for m, r in zip(rounded, reference)]
    errors = []
    for name, g, r, limit in zip(names, got, reference, limits):
        finite = torch.isfinite(r)
        assert torch.equal(torch.isfinite(g), finite), f"{name}: non-finite values differ"
        error = max_error(g[finite], r[finite])
        assert error <= limit, f"{name}: max error {error:.3g} > allowed {limit:.3g}"
        errors.append(f"{name}={error:.1e}")
    return " ".join(errors)


def attention_parity(backend: str, dtype: torch.dtype) -> str:
    base = _attention_inputs(torch.float32)

    def run(name: str, run_dtype: torch.dtype) -> list[torch.Tensor]:
        tensors = [t.detach().to(run_dtype).requires_grad_(True) for t in base]
        return _attend_with_grads(name, tensors)

    return _compare(backend, dtype, run)


def _small_encoder(backend: str) -> FusionEncoder:
    torch.manual_seed(0)
    config = EncoderConfig(
        dim=128, depth=2, heads=4, ffn_dim=256, layer_scale_init=0.5, attention=backend
    )
    factories = {m: (lambda: GeGLUFFN(128, 256, device=DEVICE)) for m in ("text", "vision")}
    return FusionEncoder(config, factories, device=DEVICE)


def _segments(tables: list[nn.Embedding], batch: int = 4) -> list[Segment]:
    gen = torch.Generator().manual_seed(2)
    segments = []
    for (modality, length, padded), table in zip((("text", 13, 4), ("vision", 17, 0)), tables):
        tokens = torch.randn(batch, length, 128, generator=gen).to(DEVICE)
        mask = torch.zeros(batch, length, dtype=torch.bool, device=DEVICE)
        if padded:
            mask[-1, -padded:] = True
        positions = torch.arange(length, device=DEVICE)
        index = (positions[:, None] - positions[None, :]).clamp(-7, 7) + 7
        segments.append(Segment(modality, tokens, mask, RelativePositions(index, [table])))
    return segments


def _tables() -> list[nn.Embedding]:
    torch.manual_seed(3)
    tables = [nn.Embedding(15, 4, device=DEVICE) for _ in range(2)]
    for table in tables:
        nn.init.normal_(table.weight)
    return tables


def encoder_parity(backend: str, dtype: torch.dtype) -> str:
    encoder = _small_encoder("math")
    tables = _tables()

    def run(name: str, run_dtype: torch.dtype) -> list[torch.Tensor]:
        encoder.set_attention_backend(name)
        params = [*encoder.parameters(), *(t.weight for t in tables)]
        with torch.autocast("cuda", dtype=run_dtype, enabled=run_dtype != torch.float32):
            out = torch.cat(encoder(_segments(tables)).hidden, dim=1)
        weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(5))
        loss = (out.float() * weights.to(DEVICE)).sum()
        table_grads = torch.autograd.grad(loss, params)[-2:]
        return [out.detach(), *table_grads]

    return _compare(backend, dtype, run)


def training_steps(backend: str, dtype: torch.dtype) -> str:
    encoder = _small_encoder(backend).train()
    tables = _tables()
    optimizer = torch.optim.AdamW([*encoder.parameters(), *(t.weight for t in tables)], lr=1e-3)
    target = torch.randn(4, 128, generator=torch.Generator().manual_seed(4)).to(DEVICE)
    losses = []
    for _ in range(10):
        with torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
            cls = encoder(_segments(tables)).hidden[0][:, 0]
        loss = (cls.float() - target).square().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses))), f"non-finite loss: {losses}"
    assert losses[-1] < losses[0], f"loss did not go down: {losses[0]:.4f} -> {losses[-1]:.4f}"
    return f"loss {losses[0]:.4f} -> {losses[-1]:.4f}"


def _strategy_steps(strategy: str, cpu_offload: bool, steps: int = 3) -> tuple[list[float], int]:
    from PIL import Image

    from peace_core import create_model
    from peace_core.pretrain.objective import ObjectiveConfig, PretrainObjective
    from peace_core.pretrain.optim import OptimConfig, build_optimizer
    from peace_core.pretrain.runtime import resolve_precision, start_run
    from peace_core.pretrain.strategy import DistributedConfig, build_strategy

    context = start_run("cuda", always_group=True)
    precision = resolve_precision("bf16", DEVICE)
    torch.manual_seed(0)
    model = create_model("small", modalities=["vision", "text"])
    objective = PretrainObjective(model, ObjectiveConfig()).to(DEVICE).train()
    options = DistributedConfig(strategy=strategy, cpu_offload=cpu_offload)  # type: ignore[arg-type]
    strategy_object = build_strategy(options, context, precision)
    strategy_object.prepare(objective)
    optimizer = build_optimizer(objective, OptimConfig())
    wrapped = strategy_object.wrap(objective, find_unused_parameters=True)
    generator = torch.Generator().manual_seed(1)
    images = [
        Image.fromarray(torch.randint(0, 255, (256, 256, 3), generator=generator).byte().numpy())
        for _ in range(8)
    ]
    batch = model.preprocess(vision=images, text=["a photo of a small dog"] * 8)
    batch = {m: {k: v.to(DEVICE) for k, v in tensors.items()} for m, tensors in batch.items()}
    torch.cuda.reset_peak_memory_stats(DEVICE)
    losses = []
    for _ in range(steps):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss, _ = wrapped(batch, torch.Generator().manual_seed(2))
        loss.backward()
        strategy_object.finish_gradients(objective)
        strategy_object.clip_grad_norm([p for p in objective.parameters() if p.requires_grad], 3.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    peak = torch.cuda.max_memory_allocated(DEVICE)
    del wrapped, objective, optimizer, model
    torch.cuda.empty_cache()
    return losses, peak


def strategies_train() -> str:
    results = {
        label: _strategy_steps(strategy, offload)
        for label, strategy, offload in (
            ("ddp", "ddp", False),
            ("fsdp", "fsdp", False),
            ("fsdp+offload", "fsdp", True),
        )
    }
    for label, (losses, _) in results.items():
        assert all(torch.isfinite(torch.tensor(losses))), f"{label}: non-finite loss {losses}"
    reference = results["ddp"][0]
    for label in ("fsdp", "fsdp+offload"):
        drift = max(abs(a - b) / abs(b) for a, b in zip(results[label][0], reference))
        assert drift < 0.05, f"{label} losses {results[label][0]} vs ddp {reference}"
    return ", ".join(
        f"{label} loss {losses[-1]:.3f} peak {peak / 2**30:.2f} GiB"
        for label, (losses, peak) in results.items()
    )


def auto_picks_xformers() -> str:
    chosen = resolve_backend("auto", DEVICE, torch.bfloat16)
    assert chosen == "xformers", f"auto resolved to {chosen!r}"
    return "auto -> xformers"


WORKLOADS_SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "workloads.py"


def time_workloads(backends: list[str], sizes: str, budget_s: float) -> None:
    """The standard workloads per backend, each a fresh process, stopping at the time budget."""
    deadline = time.monotonic() + budget_s
    for backend in backends:
        left = deadline - time.monotonic()
        if left < 30:
            print(f"SKIP workloads {backend}: time budget spent")
            continue
        command = [
            sys.executable,
            str(WORKLOADS_SCRIPT),
            "--device=cuda",
            "--dtype=bf16",
            f"--attention={backend}",
            f"--sizes={sizes}",
            "--repeats=5",
            "--warmup=2",
        ]
        print(f"workloads, bf16, {backend}: {' '.join(command[1:])}", flush=True)
        try:
            subprocess.run(command, check=True, timeout=left)
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as error:
            failures.append(f"workloads {backend}")
            print(f"FAIL workloads {backend}: {error}")


def main() -> int:
    parser = argparse.ArgumentParser(description="GPU acceptance check and bf16 workload timings")
    parser.add_argument("--sizes", default="small,base", help="presets the workloads run at")
    parser.add_argument("--budget-s", type=float, default=420.0, help="time for the workloads")
    parser.add_argument("--no-workloads", action="store_true", help="only the parity checks")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("FAIL no CUDA device: this script checks the GPU backends")
        return 2
    print(f"device: {torch.cuda.get_device_name(DEVICE)}, torch {torch.__version__}")
    try:
        import xformers

        print(f"xformers {xformers.__version__}")
        backends = ["sdpa", "xformers"]
    except Exception as error:
        print(f"FAIL xformers import: {error}")
        failures.append("xformers import")
        backends = ["sdpa"]
    check("auto backend on CUDA", auto_picks_xformers)
    for dtype, label in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
        for backend in backends:
            check(
                f"attend {backend} vs math {label}",
                lambda b=backend, d=dtype: attention_parity(b, d),
            )
            check(
                f"encoder {backend} vs math {label}",
                lambda b=backend, d=dtype: encoder_parity(b, d),
            )
            check(
                f"training steps {backend} {label}",
                lambda b=backend, d=dtype: training_steps(b, d),
            )
    check("pretraining steps per distributed strategy (small, bf16)", strategies_train)
    if not args.no_workloads:
        time_workloads(backends, args.sizes, args.budget_s)
    print(f"{'FAILED: ' + ', '.join(failures) if failures else 'ALL PASSED'}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
