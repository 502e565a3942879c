"""GPU benchmark of the Triton kernels at PeCo's full shapes (ViT-B, batch 2048). Needs a CUDA GPU.

    python -m benchmarks.kernels_gpu [--no-append]

Lookup: N=401408 queries, K=8192 codes, D=256 bf16 (l2) and D=32 (cosine, BEiT v2-style codebook).
Loss: M=153600 masked rows, H=768, V=8192 bf16, forward + backward, reduction="mean".
For each: ours (Triton), the chunked PyTorch path of this package, the naive version (cdist + argmin /
full logits + F.cross_entropy), PyTorch's chunked F.linear_cross_entropy for the loss, and the bare bf16
matmuls of the same shape (one GEMM for the lookup, the three of a linear forward + backward for the
loss). Reported: triton.testing.do_bench median ms, torch.cuda.max_memory_allocated above the inputs,
effective TFLOP/s (2NKD for the lookup, 6MHV for the loss) and the time ratio to the bare matmul.
A variant that runs out of memory is reported as OOM rather than stopping the run.
"""
from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

RESULTS = Path(__file__).with_name("RESULTS.md")
N, K = 401408, 8192
M, H, V = 153600, 768, 8192


def _measure(fn: Callable[[], object]) -> tuple[float, float]:
    """(median ms by do_bench, peak MB allocated above what existed before the first call)."""
    from triton.testing import do_bench

    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    return do_bench(fn, warmup=50, rep=400, return_mode="median"), peak


def _lookup_cases(dim: int, metric: str) -> tuple[dict[str, Callable[[], object]], float]:
    from ssl_zoo_kernels import vq_nearest

    z = torch.randn(N, dim, device="cuda", dtype=torch.bfloat16)
    e = torch.randn(K, dim, device="cuda", dtype=torch.bfloat16)
    cases = {
        "ours (triton)": lambda: vq_nearest(z, e, metric, impl="triton"),
        "ours (torch path)": lambda: vq_nearest(z, e, metric, impl="torch"),
        "cdist + argmin": lambda: torch.cdist(z.float(), e.float()).argmin(1),
        "bare bf16 matmul": lambda: z @ e.t(),
    }
    return cases, 2.0 * N * K * dim


def _loss_cases() -> tuple[dict[str, Callable[[], object]], float]:
    from ssl_zoo_kernels import masked_linear_cross_entropy

    x = torch.randn(M, H, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = (torch.randn(V, H, device="cuda") / H**0.5).to(torch.bfloat16).requires_grad_()
    b = torch.zeros(V, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    t = torch.randint(0, V, (M,), device="cuda")
    opts = torch.nn.LinearCrossEntropyOptions()
    g = torch.empty(M, V, device="cuda", dtype=torch.bfloat16)
    xd, wd = x.detach(), w.detach()

    def fwd_bwd(loss_fn: Callable[[], torch.Tensor]) -> Callable[[], object]:
        def run():
            x.grad = w.grad = b.grad = None
            loss_fn().backward()

        return run

    def gemms():
        torch.mm(xd, wd.t(), out=g)
        return torch.mm(g, wd), torch.mm(g.t(), xd)

    cases = {
        "ours (triton)": fwd_bwd(lambda: masked_linear_cross_entropy(x, w, b, t, impl="triton")),
        "ours (torch path)": fwd_bwd(lambda: masked_linear_cross_entropy(x, w, b, t, impl="torch")),
        "torch chunked linear_cross_entropy": fwd_bwd(lambda: F.linear_cross_entropy(x, w, t, linear_bias=b, options=opts)),
        "full logits + F.cross_entropy": fwd_bwd(lambda: F.cross_entropy(F.linear(x, w, b), t)),
        "bare bf16 matmuls (3 GEMMs)": gemms,
    }
    return cases, 6.0 * M * H * V


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--no-append", action="store_true", help="do not append the table to benchmarks/RESULTS.md")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks.kernels_gpu: no CUDA GPU found; this benchmark needs one, nothing was measured")
    lines = ["| op | variant | median ms | TFLOP/s | x bare matmul | peak extra MB |", "|---|---|---|---|---|---|"]
    ops = (("lookup D=256 l2", lambda: _lookup_cases(256, "l2")), ("lookup D=32 cosine", lambda: _lookup_cases(32, "cosine")),
           ("loss fwd+bwd", _loss_cases))
    for op, build in ops:  # inputs of one op at a time
        cases, flops = build()
        measured = {}
        for name, fn in cases.items():
            try:
                measured[name] = _measure(fn)
            except torch.OutOfMemoryError:
                measured[name] = None
            print(op, name, measured[name], flush=True)
        bare = next((v for k, v in measured.items() if k.startswith("bare")), None)
        for name, res in measured.items():
            if res is None:
                lines.append(f"| {op} | {name} | OOM | - | - | - |")
                continue
            ms, mb = res
            ratio = f"{ms / bare[0]:.2f}" if bare else "-"
            lines.append(f"| {op} | {name} | {ms:.2f} | {flops / ms / 1e9:.0f} | {ratio} | {mb:.0f} |")
        del cases
        torch.cuda.empty_cache()
    table = "\n".join(lines)
    print(table)
    if not args.no_append:
        stamp = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
        device = f"{torch.cuda.get_device_name()}, torch {torch.__version__}"
        command = " ".join(["python -m benchmarks.kernels_gpu", *sys.argv[1:]])
        with RESULTS.open("a") as f:
            f.write(f"\n## Kernels, GPU ({stamp})\n\nDevice: {device}. Command: `{command}`.\n\n{table}\n")


if __name__ == "__main__":
    main()
