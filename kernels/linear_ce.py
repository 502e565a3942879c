"""Masked linear + cross-entropy without full logits: ``masked_linear_cross_entropy``.

The MIM head of PeCo maps ~150k masked tokens to 8192 classes; full logits are GBs and eager autograd
keeps several copies. Here an autograd.Function gathers the counted rows (selected by ``mask`` and not
``ignore_index``) and loops over row chunks: logits chunk by matmul, one fused "chunk op" that turns the
chunk into per-row losses and overwrites it with the logit gradient, then ``dX_chunk = dlogits @ W`` and
``dW += dlogits^T @ x_chunk`` accumulated in fp32 (bf16 accumulation across chunks is a known way to
diverge training). Only one logits chunk exists at a time.

Gradients and ``reduction``:
- ``"mean"`` / ``"sum"``: the gradients are produced during the forward (scaled by 1/count or 1) and the
  backward only multiplies them by the scalar grad_output, so the logits are computed once (6MHV flops).
  The stored gradients are scaled in place, so a second backward through the same graph raises.
- ``"none"``: the upstream gradient is per row, and it cannot be applied once dW has been summed over
  rows, so the forward computes losses only and the backward recomputes each logits chunk with the
  per-row grad_output as the row scale (8MHV flops, no stored gradients, retain_graph works).

The chunk op is :func:`ce_chunk_torch` on the PyTorch path and the one-pass Triton kernel of
``linear_ce_triton`` on the Triton path; everything else is shared.
"""
from __future__ import annotations

from typing import Callable

import torch

from .dispatch import resolve_impl
from .vq_lookup import compute_dtype

REDUCTIONS = ("mean", "sum", "none")
# (logits chunk, targets, row scale or None, label_smoothing, want_correct) -> (per-row loss, number correct).
ChunkOp = Callable[[torch.Tensor, torch.Tensor, "float | torch.Tensor | None", float, bool],
                   tuple[torch.Tensor, torch.Tensor]]
# Logits chunk budget. CPU: 64 MB (2048 rows of 8192 fp32 logits) keeps the number of BLAS calls, each an
# OpenMP region that stalls when another process holds a core, low while adding little memory. CUDA: 256 MB
# (16384 bf16 rows), so each GEMM is large enough to fill the GPU; still ~1/10 of PeCo's full logits.
_CHUNK_BYTES = {"cpu": 64 << 20, "cuda": 256 << 20}
_MIN_CHUNK_ROWS = 256  # below this a chunk's GEMMs lose efficiency; see _default_chunk_size


def accum_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype of losses and of the dW / db accumulators: fp64 for fp64 inputs, fp32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def ce_chunk_torch(
    logits: torch.Tensor,
    targets: torch.Tensor,
    scale: float | torch.Tensor | None,
    label_smoothing: float,
    want_correct: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row smoothed cross-entropy of a logits chunk; with ``scale``, overwrite it with scale * dloss/dlogits.

    loss = lse - (1 - eps) * x_t - eps * mean(x);  dloss/dx = softmax(x) - (1 - eps) * onehot(t) - eps / V.
    Done with in-place passes over the chunk so no second chunk-sized buffer is allocated. The number of
    rows whose first argmax is the target is only counted when asked (0 otherwise): on CPU a max with
    indices costs about 10x a plain ``amax``.
    """
    vocab = logits.shape[1]
    eps = float(label_smoothing)
    tcol = targets.unsqueeze(1)
    loss = -(1.0 - eps) * logits.gather(1, tcol).squeeze(1)
    if eps > 0:
        loss -= (eps / vocab) * logits.sum(1)
    if want_correct:
        row_max, argmax = logits.max(1)  # first index of the max, as argmax elsewhere
        correct = (argmax == targets).sum()
    else:
        row_max, correct = logits.amax(1), torch.zeros((), dtype=torch.int64, device=logits.device)
    logits.sub_(row_max.unsqueeze(1)).exp_()
    denom = logits.sum(1)
    loss += row_max + denom.log()
    if scale is not None:
        col = scale.unsqueeze(1) if isinstance(scale, torch.Tensor) else scale
        logits.mul_(col / denom.unsqueeze(1))
        if eps > 0:
            logits.sub_(col * (eps / vocab))
        hit = -(1.0 - eps) * col
        if not isinstance(hit, torch.Tensor):
            hit = logits.new_full((targets.shape[0], 1), hit)
        logits.scatter_add_(1, tcol, hit.to(logits.dtype))
    return loss.to(accum_dtype(logits.dtype)), correct


def _chunked_pass(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    scale: float | torch.Tensor | None,
    label_smoothing: float,
    chunk_op: ChunkOp,
    matmul_dtype: torch.dtype,
    chunk_size: int,
    wants: tuple[bool, bool, bool],
    want_correct: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """One sweep over row chunks: per-row losses, #correct, and the wanted (dX, dW, db); dW / db in fp32+.

    Without ``scale`` only losses are computed. Autocast is switched off: every dtype here is chosen on
    purpose (fp32 accumulation above all), and the ``out=`` matmuls would ignore it anyway.
    """
    n, vocab = x.shape[0], weight.shape[0]
    want_dx, want_dw, want_db = wants if scale is not None else (False, False, False)
    acc = accum_dtype(x.dtype)
    dx = torch.empty_like(x) if want_dx else None
    dw = torch.zeros(weight.shape, dtype=acc, device=x.device) if want_dw else None
    db = torch.zeros(vocab, dtype=acc, device=x.device) if want_db else None
    losses = torch.empty(n, dtype=acc, device=x.device)
    correct = torch.zeros((), dtype=torch.int64, device=x.device)
    with torch.autocast(device_type=x.device.type, enabled=False):
        w = weight.to(matmul_dtype)
        b = None if bias is None else bias.to(matmul_dtype)
        # One buffer for every chunk of this call: each chunk's gradient is fully consumed (dX, dW, db)
        # before the next matmul overwrites it, and it never leaves this function.
        buf = torch.empty(min(chunk_size, max(n, 1)), vocab, dtype=matmul_dtype, device=x.device)
        for start in range(0, n, chunk_size):
            xc = x[start : start + chunk_size].to(matmul_dtype)
            rows = xc.shape[0]
            logits = buf[:rows]
            if b is None:
                torch.mm(xc, w.t(), out=logits)
            else:
                torch.addmm(b, xc, w.t(), out=logits)
            sc = scale[start : start + rows] if isinstance(scale, torch.Tensor) else scale
            tc = targets[start : start + rows]
            losses[start : start + rows], corr = chunk_op(logits, tc, sc, label_smoothing, want_correct)
            correct += corr
            if dx is not None:
                if dx.dtype == matmul_dtype:
                    torch.mm(logits, w, out=dx[start : start + rows])
                else:
                    dx[start : start + rows] = logits @ w
            if dw is not None:
                if matmul_dtype == acc:
                    dw.addmm_(logits.t(), xc)
                elif x.is_cuda and matmul_dtype in (torch.float16, torch.bfloat16):
                    dw += torch.mm(logits.t(), xc, out_dtype=acc)  # fp32 output of a half GEMM
                else:
                    dw += (logits.t() @ xc).to(acc)
            if db is not None:
                db += logits.sum(0, dtype=acc)
    return losses, correct, dx, dw, db


class _LinearCrossEntropy(torch.autograd.Function):
    """Loss over already-gathered counted rows; see the module docstring for the gradient strategy."""

    NON_TENSOR_INPUTS = 9  # forward's inputs after (x, weight, bias): no gradient for any of them

    @staticmethod
    def forward(ctx, x, weight, bias, targets, scale, label_smoothing, per_row, chunk_op, matmul_dtype, chunk_size,
                wants, want_correct):
        ctx.set_materialize_grads(False)
        args = (label_smoothing, chunk_op, matmul_dtype, chunk_size, wants)
        if per_row:
            losses, correct, *_ = _chunked_pass(x, weight, bias, targets, None, *args, want_correct)
            ctx.save_for_backward(x, weight, bias, targets)
            ctx.args = args
            ctx.per_row = True
            ctx.mark_non_differentiable(correct)
            return losses, correct
        losses, correct, dx, dw, db = _chunked_pass(x, weight, bias, targets, scale, *args, want_correct)
        ctx.grads = (dx, dw, db)
        ctx.dtypes = (x.dtype, weight.dtype, None if bias is None else bias.dtype)
        ctx.per_row = False
        ctx.mark_non_differentiable(correct)
        return losses.sum() * scale, correct

    @staticmethod
    def backward(ctx, grad_loss, _grad_correct):
        tail = (None,) * _LinearCrossEntropy.NON_TENSOR_INPUTS
        if grad_loss is None:
            return (None, None, None) + tail
        if ctx.per_row:
            x, weight, bias, targets = ctx.saved_tensors
            scale = grad_loss.to(accum_dtype(x.dtype))
            _, _, dx, dw, db = _chunked_pass(x, weight, bias, targets, scale, *ctx.args, False)
            dtypes = (x.dtype, weight.dtype, None if bias is None else bias.dtype)
            grads = (dx, dw, db)
        else:
            if ctx.grads is None:
                raise RuntimeError(
                    "masked_linear_cross_entropy: its stored gradients were consumed by an earlier backward; "
                    "recompute the loss (or use reduction='none') to backpropagate twice"
                )
            grads, dtypes, ctx.grads = ctx.grads, ctx.dtypes, None
            grads = tuple(None if g is None else g.mul_(grad_loss.to(g.dtype)) for g in grads)
        return tuple(None if g is None else g.to(d) for g, d in zip(grads, dtypes)) + tail


def _default_chunk_size(rows: int, vocab: int, matmul_dtype: torch.dtype, device: torch.device) -> int:
    """Rows per logits chunk: within the device's ``_CHUNK_BYTES``, and at most 1/8 of the call's rows.

    The 1/8 cap (never below ``_MIN_CHUNK_ROWS``) keeps a small call's chunk small beside its full
    logits: a ViT-B batch of 32 images has only ~2,400 masked rows, and a 2048-row chunk there would be
    most of the logits the op exists to avoid. Chunks are then evened out so the last one is not a sliver.
    """
    itemsize = torch.empty((), dtype=matmul_dtype).element_size()
    budget = _CHUNK_BYTES["cuda" if device.type == "cuda" else "cpu"]
    size = min(max(16, budget // (vocab * itemsize)), max(_MIN_CHUNK_ROWS, -(-rows // 8)))
    pieces = max(1, -(-rows // size))
    return max(1, -(-rows // pieces))


def masked_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    mask: torch.Tensor | None = None,
    ignore_index: int | None = -100,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
    impl: str = "auto",
    return_accuracy: bool = False,
    chunk_size: int | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy of ``hidden @ weight.T + bias`` against ``targets`` on the rows ``mask`` selects.

    Args:
        hidden: (..., H) activations, any leading shape, fp32 / bf16 / fp16 / fp64.
        weight: (V, H) classifier weight; bias: (V,) or None.
        targets: (...) int64 class indices, same leading shape as ``hidden``.
        mask: (...) bool, True for the rows that take part; None selects every row.
        ignore_index: selected rows whose target equals it do not count (loss 0, no gradient). None: every
            selected row counts and the targets are trusted to lie in [0, V) (not checked); with ``mask=None``
            too the call then reads no value on the host (no device synchronisation).
        label_smoothing: as in ``F.cross_entropy``.
        reduction: ``"mean"`` over the counted rows of the whole call (0 when none count, never NaN),
            ``"sum"``, or ``"none"``: one loss per selected row (shape of ``targets`` without a mask, the
            order of ``hidden[mask]`` with one), 0 on ignored rows.
        impl: ``"auto"`` | ``"triton"`` | ``"torch"``, see :mod:`ssl_zoo_kernels.dispatch`. The Triton
            kernel covers fp32 / bf16 / fp16; fp64 always takes the PyTorch path.
        return_accuracy: also return the share of counted rows whose first argmax is the target
            (fp32 0-dim tensor, 0 when none count).
        chunk_size: rows per logits chunk; None: at most 64 MB of logits on CPU, 256 MB on a GPU, and at
            most 1/8 of the counted rows (not below 256).

    Returns:
        The loss in fp32 (fp64 for fp64 inputs), differentiable w.r.t. hidden, weight and bias; and the
        accuracy when asked.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    width = hidden.shape[-1]
    if weight.dim() != 2 or weight.shape[1] != width:
        raise ValueError(f"weight must be (V, {width}), got {tuple(weight.shape)}")
    if bias is not None and bias.shape != weight.shape[:1]:
        raise ValueError(f"bias must be ({weight.shape[0]},), got {tuple(bias.shape)}")
    if targets.shape != hidden.shape[:-1]:
        raise ValueError(f"targets {tuple(targets.shape)} must match hidden's leading shape {tuple(hidden.shape[:-1])}")
    if mask is not None and (mask.shape != targets.shape or mask.dtype != torch.bool):
        raise ValueError(f"mask must be bool with the shape of targets {tuple(targets.shape)}, got {mask.dtype} "
                         f"{tuple(mask.shape)}")
    valid = None if ignore_index is None else targets != ignore_index
    counted = mask if valid is None else valid if mask is None else mask & valid
    if counted is None or bool(counted.all()):
        x, t = hidden.reshape(-1, width), targets.reshape(-1)
    else:  # boolean indexing gathers only the counted rows, even from a strided view like hidden[:, 1:]
        x, t = hidden[counted], targets[counted]
    if valid is not None and t.numel() and not t.is_cuda and (int(t.min()) < 0 or int(t.max()) >= weight.shape[0]):
        raise IndexError(f"targets must lie in [0, {weight.shape[0]}) or equal ignore_index={ignore_index}")

    if resolve_impl(impl, hidden.device) == "triton" and hidden.dtype != torch.float64:
        from .linear_ce_triton import ce_chunk_triton

        chunk_op: ChunkOp = ce_chunk_triton
        matmul_dtype = hidden.dtype
    else:
        chunk_op, matmul_dtype = ce_chunk_torch, compute_dtype(hidden.dtype)
    n = t.numel()
    chunk = chunk_size or _default_chunk_size(n, weight.shape[0], matmul_dtype, hidden.device)
    grad_on = torch.is_grad_enabled()
    wants = (grad_on and hidden.requires_grad, grad_on and weight.requires_grad,
             grad_on and bias is not None and bias.requires_grad)
    per_row = reduction == "none"
    scale = 1.0 / max(n, 1) if reduction == "mean" else 1.0
    loss, correct = _LinearCrossEntropy.apply(
        x, weight, bias, t, scale, float(label_smoothing), per_row, chunk_op, matmul_dtype, chunk, wants, return_accuracy
    )
    if per_row and valid is not None:  # scatter back to one loss per selected row, 0 where the target is ignored
        kept = valid if mask is None else valid[mask]
        loss = loss.new_zeros(kept.shape).masked_scatter(kept, loss)
    if not return_accuracy:
        return loss
    return loss, correct.float() / max(n, 1)
