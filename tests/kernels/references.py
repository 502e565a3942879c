"""Float64 references and checks shared by the CPU-path, interpreter and GPU kernel tests.

Inputs are fresh random tensors each run (the seed goes into every failure message), with ragged sizes
so no dimension is a multiple of a block or chunk.
"""
from __future__ import annotations

import random
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode


def fresh_seed() -> int:
    """Seed torch with a new random seed and return it (quote it when a check fails)."""
    seed = random.randrange(2**31)
    torch.manual_seed(seed)
    return seed


def score_matrix(z: torch.Tensor, codebook: torch.Tensor, metric: str) -> torch.Tensor:
    """(N, K) float64 squared L2 distances, or cosine similarities, by brute force."""
    z, e = z.double(), codebook.double()
    if metric == "cosine":
        return F.normalize(z, dim=1) @ F.normalize(e, dim=1).t()
    return (z.square().sum(1, keepdim=True) - 2 * z @ e.t() + e.square().sum(1)).clamp_min(0)


def check_picks(idx: torch.Tensor, val: torch.Tensor, z: torch.Tensor, codebook: torch.Tensor,
                metric: str, tol: float, msg: str = "") -> None:
    """Each pick is optimal up to ``tol``, and its reported value is the pick's true value up to ``tol``.

    ``tol`` is relative to the scale of the scores (the largest |score| of the row, at least 1), since a
    kernel that works in fp32 (or bf16) cannot separate candidates closer than its rounding.
    """
    assert idx.dtype == torch.int64 and idx.shape == (z.shape[0],), msg
    s = score_matrix(z, codebook, metric)
    sign = -1.0 if metric == "cosine" else 1.0  # turn both metrics into "smaller is better"
    best = (sign * s).min(1).values
    picked = sign * s.gather(1, idx.cpu().unsqueeze(1)).squeeze(1)
    scale = s.abs().max(1).values.clamp_min(1.0)
    gap = (picked - best) / scale
    assert bool((gap <= tol).all()), f"{msg}: a pick is worse than the optimum by {gap.max().item():.3g} (rel)"
    err = (val.double().cpu() - sign * picked).abs() / scale
    assert bool((err <= tol).all()), f"{msg}: reported values off by {err.max().item():.3g} (rel)"


def exact_tie_problem() -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Codes and queries with exact (not rounding-level) ties between distinct codes in different tiles.

    80 far-away random codes, four of them replaced by unit vectors: index 10 = dim 2, 33 = dim 0,
    50 = dim 9, 79 = dim 15 (the ragged last tile for tiles of 32). Each query is the sum of two unit
    vectors, at squared distance exactly 1 from both, so the lower index must win. Returns (z, e, picks).
    """
    e = 20 * torch.randn(80, 16)
    for index, dim in ((10, 2), (33, 0), (50, 9), (79, 15)):
        e[index] = F.one_hot(torch.tensor(dim), 16).float()
    z = torch.zeros(3, 16)
    for row, dims in enumerate(([2, 9], [0, 15], [2, 0])):
        z[row, dims] = 1.0
    return z, e, [10, 33, 10]


def reference_ce(hidden, weight, bias, targets, mask, ignore_index, label_smoothing, reduction):
    """F.cross_entropy(F.linear(...)) in float64 on the selected rows (all rows without a mask)."""
    h = hidden.double()
    x = h.reshape(-1, h.shape[-1]) if mask is None else h[mask]
    t = targets.reshape(-1) if mask is None else targets[mask]
    logits = F.linear(x, weight.double(), None if bias is None else bias.double())
    loss = F.cross_entropy(logits, t, ignore_index=ignore_index, label_smoothing=label_smoothing, reduction=reduction)
    if reduction == "none" and mask is None:
        loss = loss.reshape(targets.shape)
    return loss


def random_ce_problem(lead: tuple[int, ...], width: int, vocab: int, dtype: torch.dtype, with_bias: bool,
                      ignore_index: int = -100, p_mask: float = 0.6, p_ignore: float = 0.15):
    """Leaf tensors (hidden, weight, bias) needing grad, int64 targets with some ignore_index, a bool mask."""
    hidden = torch.randn(*lead, width).to(dtype).requires_grad_()
    weight = (torch.randn(vocab, width) / width**0.5).to(dtype).requires_grad_()
    bias = (0.1 * torch.randn(vocab)).to(dtype).requires_grad_() if with_bias else None
    targets = torch.randint(0, vocab, lead)
    targets[torch.rand(lead) < p_ignore] = ignore_index
    mask = torch.rand(lead) < p_mask
    return hidden, weight, bias, targets, mask


def upstream_grad(loss: torch.Tensor) -> torch.Tensor:
    """A non-uniform upstream gradient: random per element (a random scalar for a 0-dim loss)."""
    return (torch.rand(loss.shape, dtype=loss.dtype) + 0.5).to(loss.device)


def assert_close(actual, expected, rtol: float, atol: float, msg: str) -> None:
    torch.testing.assert_close(actual.double().cpu(), expected.double().cpu(), rtol=rtol, atol=atol, msg=lambda m: f"{msg}: {m}")


def assert_close_to_scale(actual, expected, tol: float, msg: str) -> None:
    """Max abs error at most ``tol`` times the largest |expected|: the fair check for half-precision
    results, whose rounding error follows the tensor's scale rather than each (possibly tiny) element."""
    err = (actual.double().cpu() - expected.double().cpu()).abs().max().item() if expected.numel() else 0.0
    scale = expected.double().abs().max().item() if expected.numel() else 0.0
    assert err <= tol * max(scale, 1e-12), f"{msg}: max error {err:.3g} vs scale {scale:.3g} (tol {tol})"


class _LargestTensor(TorchDispatchMode):
    """Records the largest number of elements of any tensor an op returns while active."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@contextmanager
def largest_tensor():
    """``with largest_tensor() as rec: ...`` then ``rec.largest``: peak single-tensor size in elements."""
    mode = _LargestTensor()
    with mode:
        yield mode
