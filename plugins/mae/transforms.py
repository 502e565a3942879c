"""MAE's per-sample view: one random resized crop (scale 0.2-1) and a flip, plus the noise that orders the
patches for masking. Every random number comes from the generator the core seeds per (seed, epoch, index), so
views and masks are reproducible, the same on any number of ranks, and the same after a resume."""
from __future__ import annotations

import torch
import torchvision.transforms.functional as TF
from PIL import Image

from ssl_zoo.data.transforms import random_resized_crop_box

from .config import MaeViewConfig


class MaeTransform:
    """`{"image": (3, size, size) normalised, "noise": (num_patches,) uniform}`. A class, not a closure, so that
    data-loader workers started by spawn can pickle it."""

    def __init__(self, cfg: MaeViewConfig, size: int, num_patches: int) -> None:
        self.scale, self.ratio, self.flip_prob = tuple(cfg.scale), tuple(cfg.ratio), cfg.flip_prob
        self.mean, self.std = list(cfg.mean), list(cfg.std)
        self.size, self.num_patches = size, num_patches

    def __call__(self, img: Image.Image, generator: torch.Generator) -> dict[str, torch.Tensor]:
        img = img.convert("RGB")
        box = random_resized_crop_box(img.width, img.height, generator, self.scale, self.ratio)
        flip = bool(torch.rand((), generator=generator) < self.flip_prob)
        view = TF.resized_crop(img, *box, [self.size, self.size], interpolation=TF.InterpolationMode.BICUBIC,
                               antialias=True)
        return {"image": TF.normalize(TF.to_tensor(TF.hflip(view) if flip else view), self.mean, self.std),
                "noise": torch.rand(self.num_patches, generator=generator)}
