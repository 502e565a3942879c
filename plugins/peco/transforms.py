"""PeCo's per-sample transforms: one augmented crop, seen by the ViT and by the tokenizer, plus a block mask.

All randomness comes from the generator the core seeds per (seed, epoch, index), so samples are
reproducible and a resumed run sees the same views.
"""
from __future__ import annotations

import torch
import torchvision.transforms.functional as TF
from PIL import Image

from ssl_zoo.data.transforms import color_jitter, random_resized_crop_box

from .config import ViewConfig
from .masking import BlockMaskGenerator

BICUBIC = TF.InterpolationMode.BICUBIC


def _crop(img: Image.Image, cfg: ViewConfig, size: int, generator: torch.Generator) -> Image.Image:
    """A random resized crop at `size`, flipped or not, colour-jittered: one draw serves every view.

    Jitter comes after the resize (BEiT jitters first): brightness and saturation are per pixel so the
    order does not matter, contrast uses the mean grey level of the crop instead of the whole photo, and
    the work is done on `size`^2 pixels instead of the full photo.
    """
    img = img.convert("RGB")
    box = random_resized_crop_box(img.width, img.height, generator, tuple(cfg.scale), tuple(cfg.ratio))
    flip = bool(torch.rand((), generator=generator) < cfg.flip_prob)
    view = TF.resized_crop(img, *box, [size, size], interpolation=BICUBIC, antialias=True)
    return color_jitter(TF.hflip(view) if flip else view, cfg.color_jitter, generator)


def _resize(view: Image.Image, size: int) -> Image.Image:
    return view if view.width == size else TF.resize(view, [size, size], interpolation=BICUBIC, antialias=True)


def tokenizer_view(view: Image.Image) -> torch.Tensor:
    """The tokenizer's input: pixels in [-1, 1] (the VQGAN convention)."""
    return TF.to_tensor(view) * 2 - 1


class TokenizerTransform:
    """Stage 1: `{"image": (3, size, size) in [-1, 1]}`. Classes, not closures, so that data-loader workers
    started by spawn (local DDP ranks) can pickle them."""

    def __init__(self, cfg: ViewConfig, size: int) -> None:
        self.cfg, self.size = cfg, size

    def __call__(self, img: Image.Image, generator: torch.Generator) -> dict[str, torch.Tensor]:
        return {"image": tokenizer_view(_crop(img, self.cfg, self.size, generator))}


class MimTransform:
    """Stage 2: the ViT view (ImageNet-normalised), the tokenizer view of the same crop, and the block mask."""

    def __init__(self, cfg: ViewConfig, vit_size: int, tokenizer_size: int, masks: BlockMaskGenerator) -> None:
        self.cfg, self.vit_size, self.tokenizer_size, self.masks = cfg, vit_size, tokenizer_size, masks
        self.mean, self.std = list(cfg.mean), list(cfg.std)

    def __call__(self, img: Image.Image, generator: torch.Generator) -> dict[str, torch.Tensor]:
        view = _crop(img, self.cfg, max(self.vit_size, self.tokenizer_size), generator)
        return {
            "image": TF.normalize(TF.to_tensor(_resize(view, self.vit_size)), self.mean, self.std),
            "tokenizer_view": tokenizer_view(_resize(view, self.tokenizer_size)),
            "mask": self.masks(generator),
        }
