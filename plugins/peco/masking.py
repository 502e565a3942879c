"""Block-wise masking for masked image modelling (BEiT's rules, with an exact masked count).

BEiT v1 places rectangular blocks until it cannot place another one, so it may mask fewer patches than
asked; BEiT v2 tops the mask up afterwards. We follow the block rules of v1 and then top up (or, never in
practice, trim) at random so that every mask has exactly `num_masked` patches: the loss is an average over
masked tokens, and a constant count keeps its scale the same from sample to sample.
"""
from __future__ import annotations

import math

import torch

from .config import MaskConfig


class BlockMaskGenerator:
    """Draws (H, W) boolean masks with exactly `num_masked` True entries from a torch.Generator.

    Only the generator passed to `__call__` is used, so a mask is a pure function of the generator's
    seed: data loading stays reproducible and resumable.
    """

    def __init__(self, grid: tuple[int, int], cfg: MaskConfig) -> None:
        self.height, self.width = grid
        num_patches = self.height * self.width
        if not 0 <= cfg.num_masked <= num_patches:
            raise ValueError(f"mask.num_masked={cfg.num_masked} must lie in [0, {num_patches}] for a {grid} grid")
        if cfg.min_block < 1 or cfg.min_aspect <= 0:
            raise ValueError("mask.min_block must be >= 1 and mask.min_aspect > 0")
        self.num_masked = cfg.num_masked
        self.min_block = cfg.min_block
        self.max_block = cfg.max_block if cfg.max_block is not None else cfg.num_masked
        max_aspect = cfg.max_aspect if cfg.max_aspect is not None else 1.0 / cfg.min_aspect
        self.log_aspect = (math.log(cfg.min_aspect), math.log(max_aspect))
        self.tries = cfg.tries_per_block

    def __call__(self, generator: torch.Generator) -> torch.Tensor:
        mask = torch.zeros(self.height, self.width, dtype=torch.bool)
        count = 0
        while count < self.num_masked:
            added = self._place_block(mask, min(self.num_masked - count, self.max_block), generator)
            if added == 0:
                break
            count += added
        if count != self.num_masked:
            self._fix_count(mask, count, generator)
        return mask

    def _uniform(self, low: float, high: float, generator: torch.Generator) -> float:
        return low + (high - low) * torch.rand((), generator=generator).item()

    def _randint(self, high_inclusive: int, generator: torch.Generator) -> int:
        return int(torch.randint(0, high_inclusive + 1, (), generator=generator))

    def _place_block(self, mask: torch.Tensor, budget: int, generator: torch.Generator) -> int:
        """Try to mask one block adding between 1 and `budget` new patches; return how many it added."""
        for _ in range(self.tries):
            area = self._uniform(self.min_block, budget, generator)
            aspect = math.exp(self._uniform(*self.log_aspect, generator))
            h = int(round(math.sqrt(area * aspect)))
            w = int(round(math.sqrt(area / aspect)))
            if not (0 < h < self.height and 0 < w < self.width):
                continue
            top = self._randint(self.height - h, generator)
            left = self._randint(self.width - w, generator)
            window = mask[top : top + h, left : left + w]
            new = h * w - int(window.sum())
            if 0 < new <= budget:
                window.fill_(True)
                return new
        return 0

    def _fix_count(self, mask: torch.Tensor, count: int, generator: torch.Generator) -> None:
        """Mask (or unmask) random patches until exactly `num_masked` are masked."""
        flat = mask.view(-1)
        if count < self.num_masked:
            candidates = (~flat).nonzero().squeeze(1)
            pick = candidates[torch.randperm(len(candidates), generator=generator)[: self.num_masked - count]]
            flat[pick] = True
        else:
            candidates = flat.nonzero().squeeze(1)
            pick = candidates[torch.randperm(len(candidates), generator=generator)[: count - self.num_masked]]
            flat[pick] = False
