"""Nearest-codebook lookup for vector quantisation: ``vq_nearest`` and its CPU paths.

The N x K score matrix of a PeCo tokenizer batch is 13 GB in fp32, so no path here builds it.

- PyTorch path (:func:`vq_nearest_torch`): walks the queries in row chunks and the codebook in code
  tiles, reducing each ``chunk_size x code_tile`` score tile to a per-tile min/argmin, so memory is bounded
  by the tile whatever N is.
- faiss path (:func:`vq_nearest_faiss`): faiss's exact brute-force search (``IndexFlatL2`` / ``IndexFlatIP``'s
  kernel: a blocked GEMM with a fused k=1 selection). On CPU,
  ``vq_nearest`` uses it whenever faiss-cpu imports: it is at least as fast as the tiled PyTorch path on an
  idle machine and several times faster on a busy one, where each of the PyTorch path's many small
  OpenMP regions waits for a preempted thread (benchmarks/RESULTS.md has both).
- Triton path (``vq_lookup_triton``): the same tiling inside one kernel, for CUDA tensors.

All of them score ``||e||^2 - 2 z.e`` (``||z||^2`` is constant per row and only added to the pick) and
give ties to the lowest code index; exact duplicate codes are removed first (:func:`unique_codes`)
because BLAS does not always give identical codes bit-identical scores.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .dispatch import resolve_impl

try:  # optional peer library; the PyTorch path covers its absence
    import faiss
except ImportError:  # pragma: no cover - depends on the environment
    faiss = None

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


_SAME_WIDTH_INT = {8: torch.int64, 4: torch.int32, 2: torch.int16}
_KEY_COLUMNS = 32  # the leading columns hashed to find candidate duplicates (two cache lines of fp32)


def unique_codes(codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Drop repeated codes, keeping each one's first occurrence in index order.

    Identical codes do not always get bit-identical scores: BLAS kernels round edge tiles differently
    from full ones, so a copy of the best code in a later tile could win by an ulp. Searching only the
    first occurrences makes "duplicates resolve to the lowest index" hold by construction. Returns the
    kept codes and their original indices (None when every code is unique, the common case).

    It runs on every lookup, so the common case is settled cheaply: each row gets a key, the integer sum
    of the bit patterns of its first 32 values (equal rows share it whatever the summation order, since
    integer addition is associative; taken modulo the sign bit so that -0.0 and 0.0 agree), and only rows
    whose keys collide get the exact, sorting comparison. On an 8192 x 256 codebook that is ~0.4 ms
    against ~10 ms for ``torch.unique(dim=0)`` over every row; a codebook whose rows share their leading
    values costs no more than that exact comparison did.
    """
    k = codes.shape[0]
    bits = codes[:, :_KEY_COLUMNS].view(_SAME_WIDTH_INT[codes.element_size()])
    key = bits.sum(1, dtype=torch.int64) & ((1 << (8 * codes.element_size() - 1)) - 1)
    sorted_key, order = key.sort()
    same_as_next = sorted_key[1:] == sorted_key[:-1]
    collides = torch.zeros(k, dtype=torch.bool, device=codes.device)
    collides[1:] |= same_as_next
    collides[:-1] |= same_as_next
    if not bool(collides.any()):
        return codes, None
    suspects = order[collides].sort().values
    # Exact comparison among the suspects only (+ 0.0 turns -0.0 into 0.0 before comparing).
    _, group = torch.unique(codes.index_select(0, suspects) + 0.0, dim=0, return_inverse=True)
    first = torch.full((int(group.max()) + 1,), k, dtype=torch.int64, device=codes.device)
    first = first.scatter_reduce(0, group, suspects, "amin")
    is_copy = torch.zeros(k, dtype=torch.bool, device=codes.device)
    is_copy[suspects] = first[group] != suspects
    if not bool(is_copy.any()):
        return codes, None
    keep = (~is_copy).nonzero().squeeze(1)
    return codes.index_select(0, keep), keep


@torch.no_grad()
def vq_nearest_torch(
    z: torch.Tensor,
    codebook: torch.Tensor,
    metric: str = "l2",
    chunk_size: int = 4096,
    code_tile: int = 1024,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunked PyTorch lookup; see :func:`vq_nearest` for the contract.

    Memory beyond the outputs: one ``chunk_size x code_tile`` score tile (16 MB by default) plus
    ``2 x chunk_size x ceil(K / code_tile)`` per-tile minima, whatever N is. Smaller tiles (1024 x 1024)
    stay in cache and win on an idle CPU; the default makes fewer, larger BLAS calls, which is what
    holds up when other processes compete for the cores.
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


@torch.no_grad()
def vq_nearest_faiss(
    z: torch.Tensor, codebook: torch.Tensor, metric: str = "l2", block: int = 32768
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact faiss-cpu brute-force search (fp32), same contract as :func:`vq_nearest`; needs faiss and CPU tensors.

    Calls faiss's index-free ``knn_L2sqr`` / ``knn_inner_product`` (what ``IndexFlatL2`` / ``IndexFlatIP``
    search runs, without copying the codebook into an index), writing straight into the output tensors.
    Queries go in blocks of ``block`` rows, so a non-fp32 ``z`` is converted one block at a time; faiss
    itself scores 4096 x 1024 tiles, so its scratch is 16 MB whatever N is. For k=1 faiss keeps a pick
    unless a later code is strictly better, which is the lowest-index tie rule.
    """
    _check_inputs(z, codebook, metric)
    if faiss is None:
        raise RuntimeError("faiss-cpu is not installed")
    if z.device.type != "cpu":
        raise ValueError("the faiss path takes CPU tensors")
    e = codebook.float()
    if metric == "cosine":
        e = F.normalize(e, dim=1, eps=_EPS)
    e, original_index = unique_codes(e)
    e = e.contiguous()
    search = faiss.knn_inner_product if metric == "cosine" else faiss.knn_L2sqr
    indices = torch.empty(z.shape[0], dtype=torch.int64)
    values = torch.empty(z.shape[0], dtype=torch.float32)
    for start in range(0, z.shape[0], block):
        zc = z[start : start + block].float().contiguous()
        rows = zc.shape[0]
        val, idx = values[start : start + rows], indices[start : start + rows]
        search(faiss.swig_ptr(zc.numpy()), faiss.swig_ptr(e.numpy()), e.shape[1], rows, e.shape[0], 1,
               faiss.swig_ptr(val.numpy()), faiss.swig_ptr(idx.numpy()))
        if metric == "cosine":
            val.div_(zc.norm(dim=1).clamp_min(_EPS))
        else:
            val.clamp_min_(0)
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
            ``"torch"`` on CPU means faiss when it imports (fp32 search), else the tiled PyTorch path.
        chunk_size: query rows per chunk of the tiled PyTorch path; ``None`` keeps the default.

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
    if faiss is not None and z.device.type == "cpu" and z.dtype != torch.float64:
        return vq_nearest_faiss(z, codebook, metric)
    return vq_nearest_torch(z, codebook, metric, chunk_size=chunk_size or 4096)
