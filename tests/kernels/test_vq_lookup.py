"""vq_nearest on CPU: the tiled PyTorch path, the faiss path, picks, values, ties, memory."""
from __future__ import annotations

import random

import pytest
import torch

from ssl_zoo_kernels import vq_nearest
from ssl_zoo_kernels.vq_lookup import unique_codes, vq_nearest_faiss, vq_nearest_torch

from .references import check_picks, exact_tie_problem, fresh_seed, largest_tensor

TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 1e-5}


@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_matches_brute_force_on_ragged_shapes(metric: str, dtype: torch.dtype) -> None:
    seed = fresh_seed()
    n, k, d = random.randint(50, 700), random.randint(20, 300), random.randint(3, 70)
    z, e = torch.randn(n, d).to(dtype), torch.randn(k, d).to(dtype)
    chunk, tile = random.randint(1, 97), random.randint(1, 61)
    idx, val = vq_nearest_torch(z, e, metric, chunk_size=chunk, code_tile=tile)
    # bf16 inputs are exact in fp32, so the reference sees the same numbers; tolerance covers fp32 math.
    check_picks(idx, val, z, e, metric, TOL[dtype], f"seed={seed} n={n} k={k} d={d} chunk={chunk} tile={tile}")
    assert val.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_duplicate_codes_resolve_to_lowest_index(metric: str) -> None:
    seed = fresh_seed()
    k, d, tile = 50, 16, 8
    e = torch.randn(k, d)
    # Code 3 is duplicated at 5 (same tile) and 21, 49 (later tiles, the last one ragged).
    for j in (5, 21, 49):
        e[j] = e[3]
    z = torch.cat([e[3:4] + 1e-3 * torch.randn(1, d), e[3:4], torch.randn(20, d)])
    idx, _ = vq_nearest_torch(z, e, metric, chunk_size=7, code_tile=tile)
    assert idx[0].item() == 3 and idx[1].item() == 3, f"seed={seed}: {idx[:2].tolist()}"
    assert not bool(torch.isin(idx, torch.tensor([5, 21, 49])).any()), f"seed={seed}: a duplicate beat code 3"


@pytest.mark.parametrize("path", ["torch", "faiss"])
def test_exact_ties_between_distinct_codes_go_to_lowest_index(path: str) -> None:
    if path == "faiss":
        pytest.importorskip("faiss")
    seed = fresh_seed()
    z, e, picks = exact_tie_problem()
    if path == "torch":
        idx, val = vq_nearest_torch(z, e, "l2", chunk_size=2, code_tile=32)
    else:
        idx, val = vq_nearest_faiss(z, e, "l2", block=2)
    assert idx.tolist() == picks and val.tolist() == [1.0] * 3, f"seed={seed}: {idx.tolist()} {val.tolist()}"


@pytest.mark.parametrize("layout", ["narrow", "wide", "shared_leading_values"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_unique_codes_keeps_first_occurrences_and_is_not_fooled_by_equal_keys(dtype: torch.dtype, layout: str) -> None:
    """Rows are keyed by their leading values; rows with equal keys that differ must survive."""
    seed = fresh_seed()
    k, d = random.randint(40, 200), random.randint(2, 30) if layout == "narrow" else random.randint(40, 90)
    e = torch.randn(k, d).to(dtype)
    if layout == "shared_leading_values":
        e[:, :32] = 0.0  # every key collides: the exact comparison handles the whole codebook
    assert unique_codes(e)[1] is None, f"seed={seed}: distinct codes reported as repeated"
    e[1] = e[0].flip(0)  # a permutation: an equal key when all columns are keyed
    e[2] = e[0]
    e[2, d - 1] += 1.0  # differs only in the last column: an equal key when the row is wider than the key
    for j in random.sample(range(3, k), 6):  # copies of earlier codes, one with -0.0 where the other has 0.0
        e[j] = e[random.randrange(j)]
    e[k - 1] = e[3]
    e[3, 0], e[k - 1, 0] = 0.0, -0.0
    kept, index = unique_codes(e)
    # Reference: a code is kept iff no lower-indexed code compares equal to it element by element.
    expected = [j for j in range(k) if not any(bool(torch.equal(e[i], e[j])) for i in range(j))]
    assert index is not None and index.tolist() == expected, f"seed={seed}"
    assert torch.equal(kept, e[expected]), f"seed={seed}"


def test_all_codes_equal_pick_index_zero() -> None:
    e = torch.randn(1, 8).expand(40, 8).contiguous()
    idx, _ = vq_nearest_torch(torch.randn(30, 8), e, "l2", chunk_size=4, code_tile=16)
    assert idx.eq(0).all()


@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_faiss_path_matches_brute_force(metric: str, dtype: torch.dtype) -> None:
    pytest.importorskip("faiss")
    seed = fresh_seed()
    n, k, d = random.randint(50, 700), random.randint(20, 300), random.randint(3, 70)
    z, e = torch.randn(n, d).to(dtype), torch.randn(k, d).to(dtype)
    e[k - 1] = e[0]  # a duplicate of code 0 must never be picked
    idx, val = vq_nearest_faiss(z, e, metric, block=random.randint(1, 200))
    check_picks(idx, val, z, e, metric, 1e-5, f"seed={seed} n={n} k={k} d={d}")
    assert not bool((idx == k - 1).any()), f"seed={seed}"


@pytest.mark.parametrize("impl", ["auto", "torch"])
def test_public_api_on_cpu_and_empty_input(impl: str) -> None:
    seed = fresh_seed()
    z, e = torch.randn(33, 12), torch.randn(20, 12)
    for metric in ("l2", "cosine"):
        idx, val = vq_nearest(z, e, metric, impl=impl)
        check_picks(idx, val, z, e, metric, 1e-5, f"seed={seed}")
        assert val.dtype == torch.float32
    # a trainable codebook and queries that carry a graph (the straight-through estimator is the caller's)
    idx, val = vq_nearest(z.clone().requires_grad_(), torch.nn.Parameter(e.clone()), impl=impl)
    check_picks(idx, val, z, e, "l2", 1e-5, f"seed={seed} parameter inputs")
    idx, val = vq_nearest(z[:0], e, impl=impl)
    assert idx.shape == (0,) and val.shape == (0,)
    idx, val = vq_nearest(z.double(), e.double(), impl=impl)  # fp64 always takes the PyTorch path
    assert val.dtype == torch.float64


def test_rejects_bad_inputs() -> None:
    with pytest.raises(ValueError):
        vq_nearest(torch.randn(4, 3), torch.randn(5, 4))
    with pytest.raises(ValueError):
        vq_nearest(torch.randn(4, 3), torch.randn(5, 3), metric="dot")


def test_never_builds_the_n_by_k_matrix() -> None:
    fresh_seed()
    n, k, d = 2048, 1024, 8
    with largest_tensor() as rec:
        vq_nearest_torch(torch.randn(n, d), torch.randn(k, d), "l2", chunk_size=128, code_tile=256)
    assert rec.largest <= 128 * 256 + n, f"largest tensor {rec.largest} elements (N x K = {n * k})"


def test_tiled_path_gives_the_same_picks_as_faiss_index_flat_l2() -> None:
    faiss = pytest.importorskip("faiss")
    seed = fresh_seed()
    n, k, d = 3000, 700, 48
    z, e = torch.randn(n, d), torch.randn(k, d)
    index = faiss.IndexFlatL2(d)
    index.add(e.numpy())
    dist, ref = index.search(z.numpy(), 1)
    idx, val = vq_nearest_torch(z, e, "l2", chunk_size=1000, code_tile=256)
    same = idx.numpy() == ref[:, 0]
    # Any disagreement must be a near-tie that fp32 rounding can flip.
    check_picks(torch.from_numpy(ref[:, 0]).long(), torch.from_numpy(dist[:, 0]), z, e, "l2", 1e-5, f"faiss seed={seed}")
    check_picks(idx, val, z, e, "l2", 1e-5, f"seed={seed}")
    assert same.mean() > 0.999, f"seed={seed}: only {same.mean():.4f} of picks agree with faiss"
