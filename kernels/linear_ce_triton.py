"""One-pass Triton cross-entropy over a logits chunk, writing the logit gradient in place.

One program per row. A first sweep over the row (one BLOCK_V tile when V <= 16384, as for PeCo's 8192
classes) keeps an online max / sum-of-exponentials, the sum of logits (label smoothing) and the first
argmax (accuracy); then, when a row scale is given, a second sweep overwrites the row with
``scale * (softmax - (1 - eps) * onehot(t) - eps / V)``. All math is fp32 whatever the logits dtype.
The matmuls around it stay in PyTorch (``linear_ce._chunked_pass``), which is where the flops are.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

_MAX_BLOCK_V = 16384


@triton.jit
def _ce_rows_kernel(
    logits_ptr, stride_row, targets_ptr, scale_ptr, loss_ptr, correct_ptr,
    V, smoothing,
    HAS_SCALE: tl.constexpr, SCALE_PER_ROW: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * stride_row
    target = tl.load(targets_ptr + row)
    run_max = float("-inf")
    run_sum = 0.0
    sum_x = 0.0
    argmax = 0
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        ok = cols < V
        x = tl.load(base + cols, mask=ok, other=float("-inf")).to(tl.float32)
        tile_max, tile_arg = tl.max(x, 0, return_indices=True, return_indices_tie_break_left=True)
        argmax = tl.where(tile_max > run_max, tile_arg + v0, argmax)
        new_max = tl.maximum(run_max, tile_max)
        run_sum = run_sum * tl.exp(run_max - new_max) + tl.sum(tl.exp(x - new_max), 0)
        sum_x += tl.sum(tl.where(ok, x, 0.0), 0)
        run_max = new_max
    lse = run_max + tl.log(run_sum)
    x_t = tl.load(base + target).to(tl.float32)
    loss = lse - (1.0 - smoothing) * x_t - smoothing / V * sum_x
    tl.store(loss_ptr + row, loss)
    tl.store(correct_ptr + row, (argmax == target).to(tl.int32))
    if HAS_SCALE:
        if SCALE_PER_ROW:
            scale = tl.load(scale_ptr + row)
        else:
            scale = tl.load(scale_ptr)
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + tl.arange(0, BLOCK_V)
            ok = cols < V
            x = tl.load(base + cols, mask=ok, other=0.0).to(tl.float32)
            grad = tl.exp(x - lse) - smoothing / V
            grad = tl.where(cols == target, grad - (1.0 - smoothing), grad) * scale
            tl.store(base + cols, grad.to(logits_ptr.dtype.element_ty), mask=ok)


def ce_chunk_triton(
    logits: torch.Tensor,
    targets: torch.Tensor,
    scale: float | torch.Tensor | None,
    label_smoothing: float,
    want_correct: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton twin of ``linear_ce.ce_chunk_torch``: per-row fp32 losses and #correct; in-place gradient.

    The kernel tracks the argmax in the same sweep as the max, so #correct is always counted and
    ``want_correct`` (part of the shared chunk-op signature) changes nothing here.
    """
    rows, vocab = logits.shape
    if logits.stride(1) != 1:
        raise ValueError("logits chunk must be contiguous along the class dimension")
    losses = torch.empty(rows, dtype=torch.float32, device=logits.device)
    correct = torch.empty(rows, dtype=torch.int32, device=logits.device)
    if rows == 0:
        return losses, correct.sum()
    per_row = isinstance(scale, torch.Tensor)
    if scale is None:
        scale_t = losses  # never read: HAS_SCALE=False
    elif per_row:
        scale_t = scale.float().contiguous()
    else:
        scale_t = torch.full((1,), float(scale), dtype=torch.float32, device=logits.device)
    block_v = max(16, min(_MAX_BLOCK_V, triton.next_power_of_2(vocab)))
    _ce_rows_kernel[(rows,)](
        logits, logits.stride(0), targets, scale_t, losses, correct, vocab, float(label_smoothing),
        HAS_SCALE=scale is not None, SCALE_PER_ROW=per_row, BLOCK_V=block_v,
        num_warps=16 if block_v >= 8192 else 8 if block_v >= 2048 else 4,
    )
    return losses, correct.sum()
