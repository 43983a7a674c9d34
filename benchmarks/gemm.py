"""fp32 CPU GEMMs of the fusion layers: torch's BLAS against oneDNN, per shape and direction.

For each (rows, in, out) shape of a linear layer the benchmark times the three GEMMs of a
training step, ``x @ W.T`` (forward), ``g @ W`` (input gradient) and ``g.T @ x`` (weight
gradient), once through torch's BLAS (``torch.matmul``: MKL on x86) and once through oneDNN
(``peace_core.gemm.onednn_linear``, what the fusion layers use), in interleaved rounds,
and prints GFLOP/s (median over rounds) and their ratio. The default shapes are the base and small
fusion layers at batch 8: 2056 rows (8 images of 257 tokens), 520 rows (a masked student view).

    python benchmarks/gemm.py
    python benchmarks/gemm.py --threads 2 --rounds 5 --shapes 2056x768x3072,520x3072x768

``--compare layouts`` times the library's own calls (``linear_no_grad``, ``input_grad``,
``weight_grad`` on the backend in force) with the weight stored as ``[out, in]`` (``nn.Linear``'s
layout) against ``[in, out]`` (how ``peace_core.gemm.Linear`` stores a down projection).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from peace_core import gemm

DEFAULT_SHAPES = (
    "2056x768x3072",
    "2056x3072x768",
    "2056x768x768",
    "520x768x3072",
    "520x3072x768",
    "2056x384x1536",
    "2056x1536x384",
    "520x384x1536",
)


def _seconds(fn: Callable[[], object], repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def _kernels(
    rows: int, width_in: int, width_out: int
) -> dict[str, dict[str, Callable[[], object]]]:
    x = torch.randn(rows, width_in)
    weight = torch.randn(width_out, width_in)
    grad = torch.randn(rows, width_out)
    onednn = gemm.onednn_linear
    return {
        "forward": {
            "blas": lambda: torch.matmul(x, weight.t()),
            "onednn": lambda: onednn(x, weight),
        },
        "input grad": {
            "blas": lambda: torch.matmul(grad, weight),
            "onednn": lambda: onednn(grad, weight.t()),
        },
        "weight grad": {
            "blas": lambda: torch.matmul(grad.t(), x),
            "onednn": lambda: onednn(grad.t(), x.t()),
        },
    }


def _layout_kernels(
    rows: int, width_in: int, width_out: int
) -> dict[str, dict[str, Callable[[], object]]]:
    x = torch.randn(rows, width_in)
    grad = torch.randn(rows, width_out)
    layouts = {"[out,in]": torch.randn(width_out, width_in)}
    layouts["[in,out]"] = layouts["[out,in]"].t().contiguous().t()
    return {
        "forward": {name: (lambda w=w: gemm.linear_no_grad(x, w)) for name, w in layouts.items()},
        "input grad": {name: (lambda w=w: gemm.input_grad(grad, w)) for name, w in layouts.items()},
        "weight grad": {
            name: (lambda w=w: gemm.weight_grad(grad, x, w)) for name, w in layouts.items()
        },
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per round (best)")
    parser.add_argument("--shapes", default=",".join(DEFAULT_SHAPES), help="ROWSxINxOUT,...")
    parser.add_argument(
        "--compare",
        choices=("libraries", "layouts"),
        default="libraries",
        help="BLAS against oneDNN, or the two weight layouts on the backend in force",
    )
    args = parser.parse_args(argv)
    if not gemm.onednn_available():
        raise SystemExit("this torch build has no oneDNN linear kernel: nothing to compare")
    torch.set_num_threads(args.threads)
    build = _kernels if args.compare == "libraries" else _layout_kernels
    heading = f"threads {args.threads}; GFLOP/s, median of {args.rounds} rounds"
    if args.compare == "layouts":
        heading += f"; backend {gemm.describe_cpu_gemm()}"
    print(f"{heading} (best of {args.repeats})")
    names = list(build(1, 1, 1)["forward"])
    print(f"{'rows x in x out':>18} {'GEMM':>12} {names[0]:>9} {names[1]:>9} {'ratio':>7}")
    for shape in args.shapes.split(","):
        rows, width_in, width_out = (int(part) for part in shape.lower().split("x"))
        flops = 2 * rows * width_in * width_out
        for direction, kernels in build(rows, width_in, width_out).items():
            rates: dict[str, list[float]] = {name: [] for name in kernels}
            for _ in range(args.rounds):
                for name, kernel in kernels.items():
                    rates[name].append(flops / _seconds(kernel, args.repeats) / 1e9)
            first, second = (statistics.median(rates[name]) for name in names)
            print(f"{shape:>18} {direction:>12} {first:9.4g} {second:9.4g} {second / first:6.2f}×")


if __name__ == "__main__":
    main()
