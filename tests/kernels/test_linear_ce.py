"""masked_linear_cross_entropy on its PyTorch path: loss and all three gradients vs float64 references."""
from __future__ import annotations

import random

import pytest
import torch

from ssl_zoo_kernels import masked_linear_cross_entropy
from ssl_zoo_kernels.linear_ce import _default_chunk_size

from .references import (assert_close, fresh_seed, largest_tensor, random_ce_problem, reference_ce,
                         upstream_grad)

TOL = {torch.float64: (1e-10, 1e-12), torch.float32: (2e-5, 2e-6)}  # (rtol, atol)


def _grads(loss, params, grad_out):
    leaves = [p for p in params if p is not None]
    return torch.autograd.grad(loss, leaves, grad_out)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_loss_and_grads_match_reference(reduction: str, label_smoothing: float, dtype: torch.dtype) -> None:
    seed = fresh_seed()
    lead = (random.randint(1, 4), random.randint(5, 40))
    width, vocab = random.randint(3, 50), random.randint(2, 300)
    with_bias = random.random() < 0.7
    hidden, weight, bias, targets, mask = random_ce_problem(lead, width, vocab, dtype, with_bias, ignore_index=-1)
    chunk = random.randint(1, 37)
    msg = f"seed={seed} lead={lead} H={width} V={vocab} bias={with_bias} chunk={chunk}"
    loss = masked_linear_cross_entropy(hidden, weight, bias, targets, mask, ignore_index=-1,
                                       label_smoothing=label_smoothing, reduction=reduction, impl="torch",
                                       chunk_size=chunk)
    ref = reference_ce(hidden, weight, bias, targets, mask, -1, label_smoothing, reduction)
    rtol, atol = TOL[dtype]
    assert loss.shape == ref.shape, msg
    assert_close(loss, ref, rtol, atol, msg + " loss")
    g = upstream_grad(ref)
    got = _grads(loss, (hidden, weight, bias), g.to(loss.dtype))
    want = _grads(ref, (hidden, weight, bias), g)
    for name, a, b in zip(("hidden", "weight", "bias"), got, want):
        assert a.dtype == dtype, msg
        assert_close(a, b, rtol, atol, f"{msg} grad {name}")


def test_no_mask_none_reduction_keeps_target_shape_and_zero_on_ignored() -> None:
    seed = fresh_seed()
    hidden, weight, bias, targets, _ = random_ce_problem((3, 7), 12, 20, torch.float64, True)
    loss = masked_linear_cross_entropy(hidden, weight, bias, targets, reduction="none", chunk_size=4)
    assert loss.shape == targets.shape
    assert bool((loss[targets == -100] == 0).all()), f"seed={seed}"
    assert_close(loss, reference_ce(hidden, weight, bias, targets, None, -100, 0.0, "none"), 1e-10, 1e-12, f"seed={seed}")


def test_no_grad_forward_gives_same_loss_and_no_graph() -> None:
    seed = fresh_seed()
    hidden, weight, bias, targets, mask = random_ce_problem((2, 30), 16, 64, torch.float32, True)
    with torch.no_grad():
        loss = masked_linear_cross_entropy(hidden, weight, bias, targets, mask, label_smoothing=0.1, chunk_size=8)
    assert not loss.requires_grad
    ref = reference_ce(hidden, weight, bias, targets, mask, -100, 0.1, "mean")
    assert_close(loss, ref, 2e-5, 2e-6, f"seed={seed}")


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("how", ["targets", "mask"])
def test_all_ignored_gives_zero_loss_and_zero_grads(reduction: str, how: str) -> None:
    fresh_seed()
    hidden, weight, bias, targets, mask = random_ce_problem((2, 9), 8, 10, torch.float32, True)
    if how == "targets":
        targets.fill_(-100)
    else:
        mask.zero_()
    loss, acc = masked_linear_cross_entropy(hidden, weight, bias, targets, mask, reduction=reduction,
                                            label_smoothing=0.1, return_accuracy=True)
    assert bool((loss == 0).all()) and acc.item() == 0.0
    grads = torch.autograd.grad(loss.sum(), (hidden, weight, bias))
    for g in grads:
        assert torch.isfinite(g).all() and bool((g == 0).all())


def test_accuracy_is_share_of_counted_rows_with_correct_first_argmax() -> None:
    seed = fresh_seed()
    hidden, weight, bias, targets, mask = random_ce_problem((4, 25), 10, 7, torch.float64, True)
    loss, acc = masked_linear_cross_entropy(hidden, weight, bias, targets, mask, return_accuracy=True, chunk_size=5)
    counted = mask & (targets != -100)
    logits = hidden[counted] @ weight.t() + bias
    want = (logits.argmax(1) == targets[counted]).double().mean()
    assert acc.dtype == torch.float32 and abs(acc.item() - want.item()) < 1e-6, f"seed={seed}"


def test_mean_divides_by_counted_rows_of_the_whole_call() -> None:
    fresh_seed()
    hidden, weight, bias, targets, mask = random_ce_problem((3, 11), 6, 9, torch.float64, False)
    total = masked_linear_cross_entropy(hidden, weight, bias, targets, mask, reduction="sum", chunk_size=2)
    mean = masked_linear_cross_entropy(hidden, weight, bias, targets, mask, reduction="mean", chunk_size=2)
    counted = int((mask & (targets != -100)).sum())
    assert counted > 0
    assert_close(mean * counted, total, 1e-12, 1e-12, "mean * count != sum")


def test_second_backward_of_a_scalar_loss_raises_but_none_reduction_can_retain() -> None:
    fresh_seed()
    hidden, weight, bias, targets, mask = random_ce_problem((2, 10), 6, 9, torch.float64, True)
    loss = masked_linear_cross_entropy(hidden, weight, bias, targets, mask)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="consumed"):
        loss.backward()
    hidden.grad = None
    per_row = masked_linear_cross_entropy(hidden, weight, bias, targets, mask, reduction="none")
    per_row.sum().backward(retain_graph=True)
    first = hidden.grad.clone()
    per_row.sum().backward()
    assert_close(hidden.grad, 2 * first, 1e-12, 1e-12, "retained backward")


def test_bf16_inputs_give_fp32_loss_close_to_reference_and_grads_in_input_dtype() -> None:
    seed = fresh_seed()
    hidden, weight, bias, targets, mask = random_ce_problem((2, 40), 32, 100, torch.bfloat16, True)
    loss = masked_linear_cross_entropy(hidden, weight, bias, targets, mask, chunk_size=16)
    assert loss.dtype == torch.float32
    assert_close(loss, reference_ce(hidden, weight, bias, targets, mask, -100, 0.0, "mean"), 1e-5, 1e-5, f"seed={seed}")
    grads = torch.autograd.grad(loss, (hidden, weight, bias))
    want = torch.autograd.grad(reference_ce(hidden, weight, bias, targets, mask, -100, 0.0, "mean"), (hidden, weight, bias))
    for g, w in zip(grads, want):
        assert g.dtype == torch.bfloat16
        assert_close(g, w, 2e-2, 1e-4, f"seed={seed} bf16 grad")


def test_never_builds_full_logits() -> None:
    fresh_seed()
    m, width, vocab = 1024, 16, 512
    hidden, weight, bias, targets, _ = random_ce_problem((m,), width, vocab, torch.float32, True, p_ignore=0.0)
    with largest_tensor() as rec:
        loss = masked_linear_cross_entropy(hidden, weight, bias, targets, chunk_size=64)
        loss.backward()
    assert rec.largest <= 64 * vocab, f"largest tensor {rec.largest} elements (full logits {m * vocab})"


def test_default_chunk_is_a_small_even_share_of_a_small_call() -> None:
    for rows in (1, 255, 2400, 9999, 32768, 10**6):
        chunk = _default_chunk_size(rows, 8192, torch.float32, torch.device("cpu"))
        pieces = -(-rows // chunk)
        assert chunk * 8192 * 4 <= 64 << 20, rows  # within the CPU budget
        assert chunk <= max(256, -(-rows // 8)), rows  # at most 1/8 of the rows unless tiny
        assert pieces * chunk - rows < pieces, rows  # evened out: no sliver of a last chunk


def test_rejects_out_of_range_targets_and_bad_shapes() -> None:
    hidden, weight, bias, targets, mask = random_ce_problem((2, 5), 4, 6, torch.float32, True, p_ignore=0.0)
    targets[0, 0] = 6
    with pytest.raises(IndexError):
        masked_linear_cross_entropy(hidden, weight, bias, targets, mask=None)
    with pytest.raises(ValueError):
        masked_linear_cross_entropy(hidden, weight, bias, targets[:, :3])
    with pytest.raises(ValueError):
        masked_linear_cross_entropy(hidden, weight, bias, targets, reduction="avg")
    with pytest.raises(ValueError):
        masked_linear_cross_entropy(hidden, weight, bias, targets, mask=mask.long())


def test_strided_hidden_view_is_gathered_without_a_full_copy() -> None:
    """PeCo passes hidden[:, 1:] (dropping [CLS]); only the counted rows may be copied."""
    seed = fresh_seed()
    tokens, width, vocab = 197, 16, 40
    full = torch.randn(4, tokens, width, dtype=torch.float64, requires_grad=True)
    hidden = full[:, 1:]
    weight = torch.randn(vocab, width, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, vocab, (4, tokens - 1))
    mask = torch.zeros(4, tokens - 1, dtype=torch.bool)
    mask[:, :20] = True
    with largest_tensor() as rec:
        loss = masked_linear_cross_entropy(hidden, weight, None, targets, mask, chunk_size=16)
    assert rec.largest < hidden.numel() // 2, f"largest tensor {rec.largest} of {hidden.numel()}"
    ref = reference_ce(hidden, weight, None, targets, mask, -100, 0.0, "mean")
    assert_close(loss, ref, 1e-10, 1e-12, f"seed={seed}")
    got = torch.autograd.grad(loss, (full, weight))
    want = torch.autograd.grad(ref, (full, weight))
    for g, w in zip(got, want):
        assert_close(g, w, 1e-10, 1e-12, f"seed={seed} grad")


@pytest.mark.parametrize("autocast", [False, True])
def test_half_hidden_with_fp32_head_as_under_autocast(autocast: bool) -> None:
    seed = fresh_seed()
    hidden, weight, bias, targets, mask = random_ce_problem((2, 30), 24, 50, torch.float32, True)
    h16 = hidden.detach().bfloat16().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = masked_linear_cross_entropy(h16, weight, bias, targets, mask, chunk_size=9)
    ref = reference_ce(h16, weight, bias, targets, mask, -100, 0.0, "mean")
    assert loss.dtype == torch.float32
    assert_close(loss, ref, 1e-5, 1e-6, f"seed={seed}")
    got = torch.autograd.grad(loss, (h16, weight, bias))
    want = torch.autograd.grad(ref, (h16, weight, bias))
    assert [g.dtype for g in got] == [torch.bfloat16, torch.float32, torch.float32]
    assert_close(got[0], want[0], 2e-2, 1e-4, f"seed={seed} hidden")
    for g, w in zip(got[1:], want[1:]):
        assert_close(g, w, 1e-5, 1e-6, f"seed={seed}")
