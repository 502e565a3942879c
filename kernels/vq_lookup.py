"""Nearest-codebook lookup for vector quantisation: ``vq_nearest`` and its chunked PyTorch path.

The N x K score matrix of a PeCo tokenizer batch is 13 GB in fp32, so no path here builds it. The
PyTorch path walks the queries in row chunks and the codebook in code tiles, so one score tile
(``chunk_size x code_tile`` fp32, 4 MB by default) stays in cache while it is reduced to a per-tile
min/argmin; that cache reuse is what lets it beat a single big matmul (and faiss-cpu's IndexFlatL2,
see benchmarks/RESULTS.md) on CPU. The Triton path (``vq_lookup_triton``) applies the same idea inside
one kernel. Both score ``||e||^2 - 2 z.e`` (``||z||^2`` is constant per row, added back only to the
picked distance) and break ties towards the lowest code index.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .dispatch import resolve_impl

METRICS = ("l2", "cosine")
_EPS = 1e-12  # floor of a norm before dividing by it (F.normalize uses the same)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: fp32 for half types (CPU half matmuls are emulated and lossy), else unchanged."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _check_inputs(z: torch.Tensor, codebook: torch.Tensor, metric: str) -> None:
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    if z.dim() != 2 or codebook.dim() != 2 or z.shape[1] != codebook.shape[1]:
        raise ValueError(f"expected z (N, D) and codebook (K, D), got {tuple(z.shape)} and {tuple(codebook.shape)}")
    if codebook.shape[0] == 0:
        raise ValueError("codebook is empty")
    if z.device != codebook.device:
        raise ValueError(f"z is on {z.device} but codebook on {codebook.device}")


def unique_codes(codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Drop repeated codes, keeping each one's first occurrence in index order.

    Identical codes do not always get bit-identical scores: BLAS kernels round edge tiles differently
    from full ones, so a copy of the best code in a later tile could win by an ulp. Searching only the
    first occurrences makes "duplicates resolve to the lowest index" hold by construction. Returns the
    kept codes and their original indices (None when every code is unique, the common case).
    """
    _, inverse = torch.unique(codes, dim=0, return_inverse=True)
    if int(inverse.max()) + 1 == codes.shape[0]:
        return codes, None
    first = torch.full((codes.shape[0],), codes.shape[0], dtype=torch.int64, device=codes.device)
    first = first.scatter_reduce(0, inverse, torch.arange(codes.shape[0], device=codes.device), "amin")
    keep = first[first < codes.shape[0]].sort().values
    return codes.index_select(0, keep), keep


@torch.no_grad()
def vq_nearest_torch(
    z: torch.Tensor,
    codebook: torch.Tensor,
    metric: str = "l2",
    chunk_size: int = 1024,
    code_tile: int = 1024,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunked PyTorch lookup; see :func:`vq_nearest` for the contract.

    Memory beyond the outputs: one ``chunk_size x code_tile`` score tile plus
    ``2 x chunk_size x ceil(K / code_tile)`` per-tile minima, whatever N is.
    """
    _check_inputs(z, codebook, metric)
    cdt = compute_dtype(z.dtype)
    e = codebook.to(cdt)
    if metric == "cosine":
        e = F.normalize(e, dim=1, eps=_EPS)
    e, original_index = unique_codes(e)
    bias = None if metric == "cosine" else e.square().sum(1)
    n, k = z.shape[0], e.shape[0]
    code_tile = min(code_tile, k)
    e_t = e.t().contiguous()  # (D, K): each code tile is then a column block of one matrix
    n_tiles = -(-k // code_tile)
    indices = torch.empty(n, dtype=torch.int64, device=z.device)
    values = torch.empty(n, dtype=cdt, device=z.device)
    scores = torch.empty(chunk_size, code_tile, dtype=cdt, device=z.device)
    tile_best = torch.empty(n_tiles, chunk_size, dtype=cdt, device=z.device)
    tile_arg = torch.empty(n_tiles, chunk_size, dtype=torch.int64, device=z.device)
    for start in range(0, n, chunk_size):
        zc = z[start : start + chunk_size].to(cdt)
        rows = zc.shape[0]
        for j in range(n_tiles):
            k0 = j * code_tile
            width = min(code_tile, k - k0)
            s = scores[:rows, :width]
            if bias is None:  # cosine: maximise z.e == minimise -z.e
                torch.mm(zc, e_t[:, k0 : k0 + width], out=s).neg_()
            else:
                torch.addmm(bias[k0 : k0 + width], zc, e_t[:, k0 : k0 + width], beta=1, alpha=-2, out=s)
            # torch.min(dim) returns the first index among equal minima: lowest code within the tile.
            torch.min(s, 1, out=(tile_best[j, :rows], tile_arg[j, :rows]))
        # The first tile among equal minima is the lowest-numbered, so ties still go to the lowest index.
        best, tile = torch.min(tile_best[:, :rows], 0)
        arg = tile_arg[:, :rows].gather(0, tile.unsqueeze(0)).squeeze(0)
        indices[start : start + rows] = arg + tile * code_tile
        if bias is None:
            values[start : start + rows] = -best / zc.norm(dim=1).clamp_min(_EPS)
        else:
            values[start : start + rows] = (best + zc.square().sum(1)).clamp_min(0)
    if original_index is not None:
        indices = original_index[indices]
    return indices, values


def vq_nearest(
    z: torch.Tensor,
    codebook: torch.Tensor,
    metric: str = "l2",
    impl: str = "auto",
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Index of the nearest code for every row of ``z``, and how near it is.

    Args:
        z: (N, D) queries, fp32 / bf16 / fp16 / fp64.
        codebook: (K, D) codes on the same device.
        metric: ``"l2"`` picks the smallest squared Euclidean distance; ``"cosine"`` the largest cosine
            similarity (codes and queries are unit-normalised inside, so raw vectors are fine).
        impl: ``"auto"`` | ``"triton"`` | ``"torch"``, see :mod:`ssl_zoo_kernels.dispatch`. The Triton
            kernel covers fp32 / bf16 / fp16; fp64 (used by references) always takes the PyTorch path.
        chunk_size: query rows per chunk (PyTorch path); ``None`` keeps the tuned default.

    Returns:
        ``(indices, values)``: int64 (N,) code indices, ties resolved to the lowest index, and for each
        pick its squared L2 distance (``metric="l2"``, clamped at 0) or cosine similarity, in fp32
        (fp64 for fp64 inputs). Not differentiable: the straight-through estimator, commitment loss and
        EMA updates belong to the caller.
    """
    _check_inputs(z, codebook, metric)
    if resolve_impl(impl, z.device) == "triton" and z.dtype != torch.float64:
        from .vq_lookup_triton import vq_nearest_triton

        return vq_nearest_triton(z, codebook, metric)
    return vq_nearest_torch(z, codebook, metric, chunk_size=chunk_size or 1024)
