"""Image transforms that draw every random number from a given generator.

The core seeds one `torch.Generator` per (seed, epoch, index), so a sample's views depend on nothing else:
the same with any number of data-loader workers, and the same after a resume.
"""
from __future__ import annotations

import math
import torch
import torchvision.transforms.functional as TF
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

Box = tuple[int, int, int, int]  # top, left, height, width


def uniform(gen: torch.Generator, low: float = 0.0, high: float = 1.0) -> float:
    return low + (high - low) * torch.rand((), generator=gen).item()


def random_resized_crop_box(
    width: int, height: int, gen: torch.Generator,
    scale: tuple[float, float] = (0.08, 1.0), ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> Box:
    """A crop of random area share and log-uniform aspect ratio (Inception style), centre crop as fallback."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * uniform(gen, *scale)
        aspect = math.exp(uniform(gen, *log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (), generator=gen))
            left = int(torch.randint(0, width - w + 1, (), generator=gen))
            return top, left, h, w
    side = min(width, height)
    return (height - side) // 2, (width - side) // 2, side, side


def color_jitter(img: Image.Image, strength: float, gen: torch.Generator) -> Image.Image:
    """Brightness, contrast and saturation each scaled by a factor in [1 - strength, 1 + strength]."""
    if strength <= 0:
        return img
    for adjust in (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation):
        img = adjust(img, uniform(gen, 1 - strength, 1 + strength))
    return img


def to_normalized_tensor(img: Image.Image, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    return TF.normalize(TF.to_tensor(img), mean, std)


def crop_flip_view(
    img: Image.Image, gen: torch.Generator, size: int,
    scale: tuple[float, float] = (0.08, 1.0), jitter: float = 0.0, flip: bool = True,
) -> tuple[Image.Image, Box, bool]:
    """Colour jitter, a random resized crop and a horizontal flip: the usual single-crop SSL augmentation.
    Returns the PIL view, the crop box and whether it was flipped, so a second view of the same crop can be
    made at another size (PeCo's tokenizer view)."""
    img = color_jitter(img.convert("RGB"), jitter, gen)
    box = random_resized_crop_box(img.width, img.height, gen, scale)
    flipped = flip and bool(torch.rand((), generator=gen) < 0.5)
    view = TF.resized_crop(img, *box, [size, size], interpolation=TF.InterpolationMode.BICUBIC)
    return (TF.hflip(view) if flipped else view), box, flipped


class DefaultTransform:
    """One augmented, normalised view: `{"image": (3, size, size)}`. A class, not a closure, so data-loader
    workers started by spawn or forkserver can pickle it (method transforms must be picklable too)."""

    def __init__(self, size: int, scale: tuple[float, float] = (0.2, 1.0)) -> None:
        self.size, self.scale = size, scale

    def __call__(self, img: Image.Image, gen: torch.Generator) -> dict[str, torch.Tensor]:
        view, _, _ = crop_flip_view(img, gen, self.size, self.scale)
        return {"image": to_normalized_tensor(view)}
