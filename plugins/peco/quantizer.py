"""Vector quantiser of the perceptual codebook, with the care that keeps a codebook in use.

Unused codes are the most reported failure of BEiT-like tokenizers, so the quantiser (1) can start from
k-means on the first batch's encoder outputs, (2) restarts codes that no input chose for a while on random
encoder outputs, and (3) tracks which codes are in use (usage share, perplexity, a per-code histogram).
Under torch.distributed, code counts and sums are all-reduced and every random choice (k-means, restarts)
is made on rank 0 and broadcast, so all ranks keep the same codebook.

The codebook is written outside the optimiser (k-means, restarts, EMA), which a sharding strategy must see:
k-means and restarts write through `ssl_zoo.engine.params.modifiable` (ZeRO-3 slices, ZeRO master copies),
and both run before the lookup of a step, never after it: a gradient codebook is saved for backward by the
lookup (the cosine metric normalises it), so a write after it would break that step's backward. The EMA
update writes in place after the lookup; it needs no gradient, and an EMA codebook (no gradient, no
optimiser state) stays a whole tensor under every strategy (ZeRO-3 keeps frozen parameters whole).

The nearest-code search goes through `ssl_zoo_kernels.vq_nearest` (fused on GPUs, chunked PyTorch on CPUs).
"""
from __future__ import annotations

from typing import NamedTuple

import ssl_zoo_kernels
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ssl_zoo.engine.params import modifiable

from .config import QuantizerConfig


class Quantized(NamedTuple):
    """Output of the quantiser: straight-through codes (B, D, H, W), indices (B, H, W), loss and statistics.
    A named tuple, so ZeRO-3 sees its tensors: it re-gathers a module's parameters for backward through hooks
    on the module's output tensors (a gradient codebook is needed there), and cannot find them in a dataclass."""

    z_q: torch.Tensor
    indices: torch.Tensor
    loss: torch.Tensor
    perplexity: torch.Tensor


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


class VectorQuantizer(nn.Module):
    """Nearest-code quantiser with L2 or cosine lookup and gradient or EMA codebook updates."""

    def __init__(self, cfg: QuantizerConfig, kernel_impl: str = "auto") -> None:
        super().__init__()
        if cfg.metric not in ("l2", "cosine"):
            raise ValueError(f"quantizer.metric must be 'l2' or 'cosine', got '{cfg.metric}'")
        if cfg.codebook_update not in ("ema", "gradient"):
            raise ValueError(f"quantizer.codebook_update must be 'ema' or 'gradient', got '{cfg.codebook_update}'")
        self.cfg = cfg
        self.kernel_impl = kernel_impl
        codebook = torch.randn(cfg.num_codes, cfg.dim) / cfg.dim**0.5
        self.codebook = nn.Parameter(codebook, requires_grad=cfg.codebook_update == "gradient")
        if cfg.codebook_update == "ema":
            self.register_buffer("ema_count", torch.ones(cfg.num_codes))
            self.register_buffer("ema_sum", codebook.clone())
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))
        self.register_buffer("last_hit", torch.full((cfg.num_codes,), -1, dtype=torch.long))
        self.register_buffer("last_restart", torch.full((cfg.num_codes,), -1, dtype=torch.long))
        self.register_buffer("recent_counts", torch.zeros(cfg.num_codes))  # decayed over usage_window_steps
        self.register_buffer("initialised", torch.zeros((), dtype=torch.bool))

    # ---- lookup --------------------------------------------------------------------------------
    def codes(self) -> torch.Tensor:
        """The codebook as used for lookup and output (unit rows under the cosine metric)."""
        return F.normalize(self.codebook, dim=1) if self.cfg.metric == "cosine" else self.codebook

    def _prepare(self, z_flat: torch.Tensor) -> torch.Tensor:
        z_flat = z_flat.float()
        return F.normalize(z_flat, dim=1) if self.cfg.metric == "cosine" else z_flat

    def nearest(self, z_flat: torch.Tensor) -> torch.Tensor:
        """(N, D) vectors -> (N,) int64 indices of their nearest codes."""
        indices, _ = ssl_zoo_kernels.vq_nearest(
            self._prepare(z_flat).contiguous(), self.codes().detach().float().contiguous(),
            metric=self.cfg.metric, impl=self.kernel_impl,
        )
        return indices

    def squared_distances(self, z_flat: torch.Tensor) -> torch.Tensor:
        """(N, D) vectors -> (N, num_codes) squared distances to every code, under the lookup's metric."""
        return torch.cdist(self._prepare(z_flat), self.codes().detach().float()).square()

    @torch.no_grad()
    def encode(self, z: torch.Tensor) -> torch.Tensor:
        """(B, D, H, W) encoder outputs -> (B, H, W) code indices (no statistics, no updates)."""
        b, d, h, w = z.shape
        return self.nearest(z.permute(0, 2, 3, 1).reshape(-1, d)).view(b, h, w)

    def forward(self, z: torch.Tensor) -> Quantized:
        b, d, h, w = z.shape
        z_flat = self._prepare(z.permute(0, 2, 3, 1).reshape(-1, d))
        indices = self.nearest(z_flat)
        z_q = self.codes().float()[indices]
        commitment = F.mse_loss(z_flat, z_q.detach())
        loss = self.cfg.beta * commitment
        if self.cfg.codebook_update == "gradient":
            loss = loss + F.mse_loss(z_q, z_flat.detach())
        z_st = z_flat + (z_q - z_flat).detach()  # straight-through estimator
        counts = torch.bincount(indices, minlength=self.cfg.num_codes).float()
        if self.training:
            self._update(z_flat.detach(), indices, counts)
        probs = counts / counts.sum().clamp_min(1)
        perplexity = torch.exp(-(probs * torch.log(probs.clamp_min(1e-10))).sum())
        z_out = z_st.view(b, h, w, d).permute(0, 3, 1, 2).to(z.dtype)
        return Quantized(z_out, indices.view(b, h, w), loss, perplexity)

    # ---- codebook maintenance ------------------------------------------------------------------
    @torch.no_grad()
    def _update(self, z_flat: torch.Tensor, indices: torch.Tensor, counts: torch.Tensor) -> None:
        sums = torch.zeros_like(self.codebook).index_add_(0, indices, z_flat) if self.cfg.codebook_update == "ema" else None
        if _distributed():
            dist.all_reduce(counts)
            if sums is not None:
                dist.all_reduce(sums)
        step = int(self.steps)
        self.last_hit[counts > 0] = step
        window = max(self.cfg.usage_window_steps, 1)
        self.recent_counts.mul_(1 - 1 / window).add_(counts)
        if sums is not None:
            decay = self.cfg.ema_decay
            self.ema_count.mul_(decay).add_(counts, alpha=1 - decay)
            self.ema_sum.mul_(decay).add_(sums, alpha=1 - decay)
            total = self.ema_count.sum()
            eps, k = self.cfg.ema_eps, self.cfg.num_codes
            smoothed = (self.ema_count + eps) / (total + k * eps) * total  # Laplace smoothing: no division by 0
            self.codebook.copy_(self.ema_sum / smoothed.unsqueeze(1))
        self.steps += 1

    def _maintained(self) -> list[torch.Tensor]:
        """The tensors k-means and restarts write."""
        return [self.codebook, self.ema_sum, self.ema_count] if self.cfg.codebook_update == "ema" else [self.codebook]

    @torch.no_grad()
    def restart_dead(self, z: torch.Tensor) -> int:
        """Before a training step's lookup: move every code that no input chose in the last `dead_after_steps`
        steps onto a random vector of this step's (B, D, H, W) encoder outputs (rank 0's picks). Returns how
        many codes moved. Call it outside this module's forward (see `ssl_zoo.engine.params`)."""
        if not self.cfg.restart_dead:
            return 0
        step = int(self.steps)
        since = step - torch.maximum(self.last_hit, self.last_restart)  # steps step-since .. step-1 were unused
        dead = (since > self.cfg.dead_after_steps).nonzero().squeeze(1)
        if dead.numel() == 0:
            return 0
        z_flat = self._prepare(z.detach().permute(0, 2, 3, 1).reshape(-1, z.shape[1]))
        picks = z_flat[torch.randint(0, z_flat.shape[0], (dead.numel(),), device=z_flat.device)]
        with modifiable(self._maintained()):
            self._set_codes(dead, picks)
        self.last_restart[dead] = step
        return dead.numel()

    def _set_codes(self, which: torch.Tensor, vectors: torch.Tensor) -> None:
        self.codebook[which] = vectors.to(self.codebook.dtype)
        if self.cfg.codebook_update == "ema":
            self.ema_sum[which] = vectors
            self.ema_count[which] = 1.0

    @torch.no_grad()
    def kmeans_init(self, z: torch.Tensor) -> None:
        """Set the codebook to k-means centroids of (B, D, H, W) encoder outputs; rank 0's centroids are
        broadcast (BEiT v2 forgets to, so its ranks can start from different codebooks). Call it outside this
        module's forward."""
        z_flat = self._prepare(z.permute(0, 2, 3, 1).reshape(-1, z.shape[1]))
        k = self.cfg.num_codes
        start = torch.randperm(z_flat.shape[0], device=z_flat.device)
        if z_flat.shape[0] < k:  # fewer vectors than codes: repeat them, jittered so codes differ
            start = start.repeat(k // z_flat.shape[0] + 1)
        centroids = z_flat[start[:k]] + 1e-3 * z_flat.std() * torch.randn(k, z_flat.shape[1], device=z_flat.device)
        for _ in range(self.cfg.kmeans_iters):
            assign, _ = ssl_zoo_kernels.vq_nearest(z_flat.contiguous(), centroids.contiguous(), metric=self.cfg.metric,
                                                   impl=self.kernel_impl)
            counts = torch.bincount(assign, minlength=k).float()
            sums = torch.zeros_like(centroids).index_add_(0, assign, z_flat)
            used = counts > 0
            centroids[used] = sums[used] / counts[used].unsqueeze(1)
            if self.cfg.metric == "cosine":
                centroids = F.normalize(centroids, dim=1)
        with modifiable(self._maintained()):
            self._set_codes(torch.arange(k, device=centroids.device), centroids)
        self.initialised.fill_(True)

    # ---- statistics ----------------------------------------------------------------------------
    def usage_share(self) -> torch.Tensor:
        """Share of codes chosen at least once within the last `usage_window_steps` training steps (a tensor on
        the codebook's device: a per-step metric, read at log steps only)."""
        recent = (self.last_hit >= 0) & (self.steps - self.last_hit <= self.cfg.usage_window_steps)
        return recent.float().mean()

    def usage(self) -> float:
        return float(self.usage_share())
