"""Choice between the Triton kernels and the chunked PyTorch paths.

Modelled on timm's fused-attention switch (``TIMM_FUSED_ATTN`` read once at import, then
``set_fused_attn`` at runtime): ``SSL_ZOO_KERNEL_IMPL`` sets the process default when this module is
imported and :func:`set_default_impl` changes it later. Precedence, highest first:

1. an explicit ``impl="triton"`` or ``impl="torch"`` passed to the op (the method configs pass it from
   a config key, so a run's config is the most specific statement of intent);
2. the process default (``set_default_impl`` or else the environment variable);
3. ``"auto"``: Triton for CUDA tensors when Triton imports, the PyTorch path otherwise.

Triton on CPU tensors only works under Triton's interpreter (``TRITON_INTERPRET=1``), which the tests
use; anywhere else asking for Triton on CPU tensors is an error rather than a silent fallback, so a
config that says "triton" never measures the PyTorch path by accident.
"""
from __future__ import annotations

import importlib.util
import os

import torch

IMPLS = ("auto", "triton", "torch")
ENV_VAR = "SSL_ZOO_KERNEL_IMPL"


def _check(impl: str) -> str:
    impl = str(impl).strip().lower()
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    return impl


_DEFAULT_IMPL = _check(os.environ.get(ENV_VAR, "auto"))


def set_default_impl(impl: str) -> None:
    """Set the process-wide implementation used when an op is called with ``impl="auto"``."""
    global _DEFAULT_IMPL
    _DEFAULT_IMPL = _check(impl)


def get_default_impl() -> str:
    """The process-wide default: ``"auto"``, ``"triton"`` or ``"torch"``."""
    return _DEFAULT_IMPL


def triton_available() -> bool:
    """True when the ``triton`` package can be imported (it may still lack a GPU)."""
    return importlib.util.find_spec("triton") is not None


def triton_interpreted() -> bool:
    """True when Triton kernels run in the CPU interpreter (read at call time, as Triton does at import)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def resolve_impl(impl: str, device: torch.device) -> str:
    """Return ``"triton"`` or ``"torch"`` for an op whose tensors live on ``device``."""
    impl = _check(impl)
    if impl == "auto":
        impl = _DEFAULT_IMPL
    if impl == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "torch"
    if impl == "triton":
        if not triton_available():
            raise RuntimeError("impl='triton' was asked for but triton is not installed")
        if device.type != "cuda" and not triton_interpreted():
            raise RuntimeError(
                f"impl='triton' needs CUDA tensors (got {device.type}); set TRITON_INTERPRET=1 to run "
                "the kernels in Triton's CPU interpreter, or use impl='torch'/'auto'"
            )
    return impl
