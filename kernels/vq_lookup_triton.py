"""Triton nearest-code lookup in the flash-kmeans "assign" pattern.

Each program owns BLOCK_N query rows and streams the codebook in BLOCK_K tiles: it accumulates z.e in
fp32 over BLOCK_D slices of the feature dimension, turns the tile into scores ``||e||^2 - 2 z.e``
(``-z.e`` for cosine), and folds the tile's min / argmin into a running pair held in registers. A tile
only replaces the running pick when strictly better, and within a tile the argmin takes the leftmost
index, so ties go to the lowest code index, as on the PyTorch path (exact duplicate codes are removed
first, see ``vq_lookup.unique_codes``). ``||e||^2`` (or the unit-normalised codebook) is prepared once
per call on the host; ``||z||^2`` is accumulated in the kernel and added only to the final pick.

Autotuning is applied on GPUs only: ``@triton.autotune`` needs a driver, and the interpreter
(``TRITON_INTERPRET=1``, used by the CPU tests) runs one fixed config. Under the interpreter bf16 / fp16
``tl.dot`` gives wrong results, so operands are upcast to fp32 there (``UPCAST`` constexpr).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .dispatch import triton_interpreted
from .vq_lookup import unique_codes

_EPS = 1e-12


@triton.jit
def _vq_assign_kernel(
    z_ptr, e_ptr, e_sq_ptr, idx_ptr, val_ptr,
    N, K, D, stride_z, stride_e,
    COSINE: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    z_sq = tl.zeros([BLOCK_N], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        dims = d0 + tl.arange(0, BLOCK_D)
        zt = tl.load(z_ptr + rows[:, None] * stride_z + dims[None, :], mask=row_ok[:, None] & (dims < D)[None, :], other=0.0)
        zt = zt.to(tl.float32)
        z_sq += tl.sum(zt * zt, 1)
    best = tl.full([BLOCK_N], float("inf"), dtype=tl.float32)
    best_idx = tl.zeros([BLOCK_N], dtype=tl.int64)
    for k0 in range(0, K, BLOCK_K):
        codes = k0 + tl.arange(0, BLOCK_K)
        code_ok = codes < K
        acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            dims = d0 + tl.arange(0, BLOCK_D)
            d_ok = (dims < D)[None, :]
            zt = tl.load(z_ptr + rows[:, None] * stride_z + dims[None, :], mask=row_ok[:, None] & d_ok, other=0.0)
            et = tl.load(e_ptr + codes[:, None].to(tl.int64) * stride_e + dims[None, :], mask=code_ok[:, None] & d_ok, other=0.0)
            if UPCAST:
                zt = zt.to(tl.float32)
                et = et.to(tl.float32)
            acc = tl.dot(zt, tl.trans(et), acc, input_precision=DOT_PRECISION)
        if COSINE:
            score = -acc
        else:
            e_sq = tl.load(e_sq_ptr + codes, mask=code_ok, other=0.0)
            score = e_sq[None, :] - 2.0 * acc
        score = tl.where(code_ok[None, :], score, float("inf"))
        tile_min, tile_arg = tl.min(score, 1, return_indices=True, return_indices_tie_break_left=True)
        better = tile_min < best
        best = tl.where(better, tile_min, best)
        best_idx = tl.where(better, tile_arg.to(tl.int64) + k0, best_idx)
    if COSINE:
        value = -best / tl.maximum(tl.sqrt(z_sq), 1e-12)
    else:
        value = tl.maximum(best + z_sq, 0.0)
    tl.store(idx_ptr + rows, best_idx, mask=row_ok)
    tl.store(val_ptr + rows, value, mask=row_ok)


_GPU_CONFIGS = [
    triton.Config({"BLOCK_N": bn, "BLOCK_K": bk, "BLOCK_D": bd}, num_warps=w, num_stages=s)
    for bn, bk, bd, w, s in [(128, 64, 64, 4, 3), (128, 128, 64, 8, 3), (64, 128, 64, 4, 4), (128, 64, 32, 4, 4)]
]
_vq_assign_tuned = triton.autotune(configs=_GPU_CONFIGS, key=["K", "D"])(_vq_assign_kernel)


def _fp32_dot_precision(interpreted: bool) -> str:
    """How fp32 operands enter ``tl.dot``: like ``torch.matmul``, tf32 only when the user allowed it with
    ``torch.set_float32_matmul_precision("high" | "medium")``; exact ("ieee") by default and always under
    the interpreter. Half-precision operands are unaffected."""
    if interpreted or torch.get_float32_matmul_precision() == "highest":
        return "ieee"
    return "tf32"


def vq_nearest_triton(z: torch.Tensor, codebook: torch.Tensor, metric: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton lookup for fp32 / bf16 / fp16 inputs; same contract as ``vq_nearest``."""
    if z.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"the Triton lookup takes fp32/bf16/fp16, got {z.dtype}")
    z = z.contiguous()
    cosine = metric == "cosine"
    e32 = codebook.float()
    if cosine:
        e32 = F.normalize(e32, dim=1, eps=_EPS)
    e, original_index = unique_codes(e32.to(z.dtype))
    e = e.contiguous()
    e_sq = e.float().square().sum(1)  # of the codes as the kernel sees them (after the cast)
    n, d = z.shape
    k = e.shape[0]
    indices = torch.empty(n, dtype=torch.int64, device=z.device)
    values = torch.empty(n, dtype=torch.float32, device=z.device)
    if n == 0:
        return indices, values
    interpreted = triton_interpreted()
    args = (z, e, e_sq, indices, values, n, k, d, z.stride(0), e.stride(0))
    flags = dict(
        COSINE=cosine,
        UPCAST=interpreted and z.dtype != torch.float32,
        DOT_PRECISION=_fp32_dot_precision(interpreted),
    )
    if interpreted:
        block_d = max(16, min(64, triton.next_power_of_2(d)))
        _vq_assign_kernel[(triton.cdiv(n, 32),)](*args, **flags, BLOCK_N=32, BLOCK_K=32, BLOCK_D=block_d)
    else:
        _vq_assign_tuned[lambda meta: (triton.cdiv(n, meta["BLOCK_N"]),)](*args, **flags)
    if original_index is not None:
        indices = original_index[indices]
    return indices, values
