"""Block masks: exact counts, BEiT's block rules, and reproducibility from the generator alone."""
from __future__ import annotations

import math

import pytest
import torch

from ssl_zoo_peco.config import MaskConfig
from ssl_zoo_peco.masking import BlockMaskGenerator


@pytest.mark.parametrize(("grid", "num_masked", "min_block"), [
    ((14, 14), 75, 16),  # BEiT
    ((16, 16), 98, 16),  # ViT-H/14 at 224 px
    ((6, 6), 14, 4),  # the tiny default
    ((14, 14), 0, 16),
    ((14, 14), 196, 16),  # everything: block placement cannot finish, the top-up must
    ((7, 5), 30, 16),  # a non-square grid
])
def test_mask_count_is_exact(grid: tuple[int, int], num_masked: int, min_block: int) -> None:
    masks = BlockMaskGenerator(grid, MaskConfig(num_masked=num_masked, min_block=min_block))
    for seed in range(200):
        mask = masks(torch.Generator().manual_seed(seed))
        assert mask.shape == grid and mask.dtype == torch.bool
        assert int(mask.sum()) == num_masked


def test_same_generator_seed_gives_the_same_mask_and_others_differ() -> None:
    masks = BlockMaskGenerator((14, 14), MaskConfig(num_masked=75, min_block=16))
    first = masks(torch.Generator().manual_seed(7))
    assert torch.equal(first, masks(torch.Generator().manual_seed(7)))
    assert any(not torch.equal(first, masks(torch.Generator().manual_seed(s))) for s in range(8, 12))


def test_a_block_is_a_filled_rectangle_within_the_area_and_aspect_rules() -> None:
    cfg = MaskConfig(num_masked=75, min_block=16, min_aspect=0.3)
    masks = BlockMaskGenerator((14, 14), cfg)
    placed = 0
    for seed in range(100):
        mask = torch.zeros(14, 14, dtype=torch.bool)
        added = masks._place_block(mask, 75, torch.Generator().manual_seed(seed))
        if added == 0:
            continue
        placed += 1
        rows, cols = mask.any(1).nonzero().squeeze(1), mask.any(0).nonzero().squeeze(1)
        h, w = int(rows[-1] - rows[0] + 1), int(cols[-1] - cols[0] + 1)
        assert added == h * w == int(mask.sum())  # one solid rectangle
        assert h < 14 and w < 14
        # area drawn in [16, 75] and rounded per side; aspect log-uniform in [0.3, 1/0.3] before rounding
        assert 16 - 2 * math.sqrt(75) <= h * w <= 75
        assert 0.3 / 2 <= h / w <= 2 / 0.3
    assert placed >= 90  # 10 tries per block: failures are rare on an empty grid


def test_blocks_dominate_the_default_mask() -> None:
    """The BEiT mask is made of blocks: most masked patches have a masked 4-neighbour."""
    masks = BlockMaskGenerator((14, 14), MaskConfig(num_masked=75, min_block=16))
    mask = masks(torch.Generator().manual_seed(3))
    padded = torch.nn.functional.pad(mask.float()[None, None], (1, 1, 1, 1))[0, 0]
    neighbours = padded[:-2, 1:-1] + padded[2:, 1:-1] + padded[1:-1, :-2] + padded[1:-1, 2:]
    assert float((neighbours[mask] > 0).float().mean()) > 0.9


def test_impossible_count_is_refused() -> None:
    with pytest.raises(ValueError, match="num_masked"):
        BlockMaskGenerator((6, 6), MaskConfig(num_masked=37))
