"""Triton kernels run by Triton's CPU interpreter; executed by test_triton_interpret.py in a subprocess.

TRITON_INTERPRET must be set before the kernel modules are imported (``@triton.jit`` reads it), so this
file only runs in a process started with it; collected anywhere else it skips. Shapes stay small: the
interpreter executes programs one by one in numpy.
"""
from __future__ import annotations

import os
import random

import pytest
import torch

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("runs only under TRITON_INTERPRET=1 (see test_triton_interpret.py)", allow_module_level=True)

from ssl_zoo_kernels import linear_ce_triton, masked_linear_cross_entropy, vq_nearest  # noqa: E402

from .references import (assert_close, assert_close_to_scale, check_picks, exact_tie_problem,  # noqa: E402
                         fresh_seed, random_ce_problem, reference_ce, upstream_grad)

HALF = (torch.bfloat16, torch.float16)


@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_lookup_matches_brute_force(metric: str, dtype: torch.dtype) -> None:
    seed = fresh_seed()
    n, k, d = random.randint(40, 150), random.randint(33, 140), random.randint(5, 90)
    z, e = torch.randn(n, d).to(dtype), torch.randn(k, d).to(dtype)
    idx, val = vq_nearest(z, e, metric, impl="triton")
    # Cosine codes are normalised in fp32 and then stored in the input dtype: half types lose ~1e-3.
    tol = 1e-2 if (metric == "cosine" and dtype in HALF) else 1e-5
    check_picks(idx, val, z, e, metric, tol, f"seed={seed} n={n} k={k} d={d}")


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_lookup_duplicates_go_to_lowest_index_across_tiles(metric: str) -> None:
    seed = fresh_seed()
    e = torch.randn(80, 24)
    for j in (4, 40, 79):  # same tile, a later tile, the ragged last tile (BLOCK_K = 32)
        e[j] = e[3]
    z = torch.cat([e[3:4], e[3:4] + 1e-3 * torch.randn(1, 24), torch.randn(30, 24)])
    idx, _ = vq_nearest(z, e, metric, impl="triton")
    assert idx[:2].tolist() == [3, 3], f"seed={seed}"
    assert not bool(torch.isin(idx, torch.tensor([4, 40, 79])).any()), f"seed={seed}"


def test_lookup_exact_ties_between_distinct_codes_go_to_lowest_index() -> None:
    seed = fresh_seed()
    z, e, picks = exact_tie_problem()
    idx, val = vq_nearest(z, e, "l2", impl="triton")  # BLOCK_K = 32 under the interpreter
    assert idx.tolist() == picks and val.tolist() == [1.0] * 3, f"seed={seed}: {idx.tolist()} {val.tolist()}"


def test_lookup_agrees_with_torch_path() -> None:
    seed = fresh_seed()
    z, e = torch.randn(300, 40), torch.randn(100, 40)
    idx, val = vq_nearest(z, e, impl="triton")
    ref_idx, ref_val = vq_nearest(z, e, impl="torch")
    assert (idx == ref_idx).float().mean() > 0.99, f"seed={seed}"
    assert_close(val, ref_val, 1e-4, 1e-4, f"seed={seed}")


# Error bounds relative to each tensor's scale; half types round the logits and the stored gradients.
CE_TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.15])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_loss_and_grads_match_reference(reduction: str, label_smoothing: float, dtype: torch.dtype,
                                        monkeypatch) -> None:
    seed = fresh_seed()
    if random.random() < 0.5:  # exercise the online softmax across several V tiles
        monkeypatch.setattr(linear_ce_triton, "_MAX_BLOCK_V", 32)
    lead = (random.randint(1, 3), random.randint(5, 30))
    width, vocab = random.randint(8, 40), random.randint(20, 150)
    hidden, weight, bias, targets, mask = random_ce_problem(lead, width, vocab, dtype, random.random() < 0.7)
    chunk = random.randint(1, 25)
    msg = f"seed={seed} lead={lead} H={width} V={vocab} chunk={chunk} block_v={linear_ce_triton._MAX_BLOCK_V}"
    loss, acc = masked_linear_cross_entropy(hidden, weight, bias, targets, mask, label_smoothing=label_smoothing,
                                            reduction=reduction, impl="triton", chunk_size=chunk,
                                            return_accuracy=True)
    ref = reference_ce(hidden, weight, bias, targets, mask, -100, label_smoothing, reduction)
    tol = CE_TOL[dtype]
    assert loss.shape == ref.shape and loss.dtype == torch.float32, msg
    assert_close_to_scale(loss, ref, tol, msg + " loss")
    g = upstream_grad(ref)
    params = [p for p in (hidden, weight, bias) if p is not None]
    got = torch.autograd.grad(loss, params, g.float())
    want = torch.autograd.grad(ref, params, g)
    for a, b in zip(got, want):
        assert a.dtype == dtype, msg
        assert_close_to_scale(a, b, tol, msg + " grad")
    if dtype == torch.float32:
        counted = mask & (targets != -100)
        logits = hidden[counted].double() @ weight.double().t() + (0 if bias is None else bias.double())
        want_acc = (logits.argmax(1) == targets[counted]).double().mean() if counted.any() else torch.tensor(0.0)
        assert abs(acc.item() - want_acc.item()) < 1e-6, msg


def test_all_ignored_gives_zero_loss_and_grads() -> None:
    fresh_seed()
    hidden, weight, bias, targets, mask = random_ce_problem((2, 6), 16, 30, torch.float32, True)
    targets.fill_(-100)
    loss = masked_linear_cross_entropy(hidden, weight, bias, targets, mask, impl="triton")
    assert loss.item() == 0.0
    for g in torch.autograd.grad(loss, (hidden, weight, bias)):
        assert bool((g == 0).all())


def test_no_grad_forward() -> None:
    seed = fresh_seed()
    hidden, weight, bias, targets, mask = random_ce_problem((2, 20), 16, 40, torch.float32, True)
    with torch.no_grad():
        loss = masked_linear_cross_entropy(hidden, weight, bias, targets, mask, label_smoothing=0.1, impl="triton",
                                           chunk_size=7)
    assert not loss.requires_grad
    assert_close(loss, reference_ce(hidden, weight, bias, targets, mask, -100, 0.1, "mean"), 1e-5, 1e-6, f"seed={seed}")
