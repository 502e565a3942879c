"""CPU matmuls of the chunked loss through the faster of two BLAS libraries already in the process.

PyTorch's x86 wheels run CPU GEMMs through MKL, numpy's through OpenBLAS. On AMD CPUs MKL takes slower
code paths: on the AMD EPYC this project is developed on, the loss's ``2048 x 768 x 8192`` fp32 GEMMs
take 131-141 ms with numpy's OpenBLAS against 157-237 ms with ``torch.mm`` (benchmarks/RESULTS.md).
Both libraries are installed anyway (numpy is a dependency of torch), so the loss's two largest GEMMs,
``logits = x @ W.T`` and ``dX = dlogits @ W``, go through numpy where that wins.

Choice, read once when first needed: ``SSL_ZOO_CPU_GEMM=torch|numpy|auto`` (default ``auto``: numpy on
AMD CPUs when numpy's BLAS is OpenBLAS, torch elsewhere). The choice is fixed per machine, so a run and
its resumption always use the same arithmetic. numpy's OpenBLAS keeps its own thread pool; it is capped
at ``torch.get_num_threads()`` before every use, so DDP workers with one thread each do not oversubscribe.
"""
from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

ENV_VAR = "SSL_ZOO_CPU_GEMM"
CHOICES = ("auto", "torch", "numpy")


def _cpu_vendor() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("vendor_id"):
                return line.split(":", 1)[1].strip()
    except OSError:  # not Linux: no vendor known, keep torch
        pass
    return ""


@functools.cache
def _numpy_openblas() -> tuple[Any, ...]:
    """threadpoolctl controllers of numpy's own OpenBLAS (empty when numpy uses another BLAS)."""
    from threadpoolctl import ThreadpoolController

    return tuple(lib for lib in ThreadpoolController().lib_controllers
                 if lib.internal_api == "openblas" and "numpy" in str(lib.filepath))


@functools.cache
def backend() -> str:
    """``"numpy"`` or ``"torch"``: the library that runs the loss's fp32 / fp64 CPU GEMMs in this process."""
    choice = os.environ.get(ENV_VAR, "auto").strip().lower()
    if choice not in CHOICES:
        raise ValueError(f"{ENV_VAR} must be one of {CHOICES}, got {choice!r}")
    if choice == "auto":
        return "numpy" if _cpu_vendor() == "AuthenticAMD" and _numpy_openblas() else "torch"
    return choice


def _numpy_view(t: torch.Tensor) -> np.ndarray:
    return t.detach().numpy()


def _use_numpy(*tensors: torch.Tensor) -> bool:
    return all(t.device.type == "cpu" and t.dtype in (torch.float32, torch.float64) for t in tensors) and \
        backend() == "numpy"


def _cap_threads() -> None:
    threads = torch.get_num_threads()
    for lib in _numpy_openblas():
        if lib.num_threads != threads:
            lib.set_num_threads(threads)


def mm_out(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, bias: torch.Tensor | None = None) -> None:
    """``out = a @ b (+ bias)`` with ``out`` written in place; a and b may be transposed views."""
    if not _use_numpy(a, b, out):
        if bias is None:
            torch.mm(a, b, out=out)
        else:
            torch.addmm(bias, a, b, out=out)
        return
    _cap_threads()
    np.matmul(_numpy_view(a), _numpy_view(b), out=_numpy_view(out))
    if bias is not None:
        out += bias
