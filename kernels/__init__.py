"""ssl_zoo_kernels: fused ops for self-supervised ViT training, each with a chunked PyTorch path.

- :func:`vq_nearest`: nearest-code lookup (squared L2 or cosine) without an N x K distance matrix.
- :func:`masked_linear_cross_entropy`: linear head + cross-entropy on masked rows without full logits.

Both take ``impl="auto" | "triton" | "torch"``; the process default comes from ``SSL_ZOO_KERNEL_IMPL`` or
:func:`set_default_impl` (see :mod:`ssl_zoo_kernels.dispatch`). Triton modules are imported only when a
Triton path is chosen, so CPU-only users never pay for (or need) a Triton import.
"""
from .dispatch import get_default_impl, resolve_impl, set_default_impl
from .linear_ce import masked_linear_cross_entropy
from .vq_lookup import vq_nearest

__all__ = ["vq_nearest", "masked_linear_cross_entropy", "set_default_impl", "get_default_impl", "resolve_impl"]
