"""crop_id: a labelled task that needs no download: which of the bundled colour photos a crop comes from.

Each photo is cut in two: training crops come from its left 60%, test crops from its right 40%, so a score
measures features that generalise to unseen parts of a scene rather than memorised pixels. The embedded
pretraining dataset draws only from the training regions (see `TrainRegionPhotos`), so no test pixel is ever
seen in pretraining. Crops are squares whose side is a share of the photo's shorter side, the same share range
in both splits, so the two splits differ in content only, not in scale. Near-constant crops (the black borders
of the hubble and retina photos) carry no label information and are dropped.
"""
from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ssl_zoo.data.datasets import EMBEDDED_PHOTOS, ImageDataset, sample_generator

CROP_ID_PHOTOS = EMBEDDED_PHOTOS
SPLITS = ("train", "test")
TRAIN_SHARE = 0.6  # the left share of each photo's width that training (and pretraining) may see
# crop side as a share of the photo's shorter side; 0.4 fits the test region (0.4 x width >= 0.4 x shorter side)
CROP_SIDE_SHARE = (0.15, 0.4)
# a crop whose pixels (0-255) have a standard deviation below this is near-constant: a border, not content
MIN_CROP_STD = 6.0


def photo_folder() -> Path:
    import skimage

    return Path(skimage.__file__).parent / "data"


@functools.lru_cache(maxsize=None)
def load_photo(name: str) -> Image.Image:
    """One bundled photo as RGB, decoded once per process."""
    with Image.open(photo_folder() / name) as img:
        return img.convert("RGB")


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split '{split}' is not one of {', '.join(SPLITS)}")


def photo_region(image: Image.Image, split: str) -> Image.Image:
    """The part of a photo a split may use: "train" the left 60% of its width, "test" the right 40%."""
    _check_split(split)
    cut = round(image.width * TRAIN_SHARE)
    box = (0, 0, cut, image.height) if split == "train" else (cut, 0, image.width, image.height)
    return image.crop(box)


def _random_square(region: Image.Image, shorter_side: int, gen: torch.Generator) -> Image.Image:
    low, high = CROP_SIDE_SHARE
    side = int(shorter_side * (low + (high - low) * torch.rand((), generator=gen).item()))
    side = min(side, region.width, region.height)
    top = int(torch.randint(0, region.height - side + 1, (), generator=gen))
    left = int(torch.randint(0, region.width - side + 1, (), generator=gen))
    return region.crop((left, top, left + side, top + side))


def crop_id_split(split: str, image_size: int, crops_per_photo: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`crops_per_photo` random crops of each photo's `split` region, resized to `image_size`: uint8 images
    (N, 3, image_size, image_size) and int64 labels (N,) = the photo's index in CROP_ID_PHOTOS. The same
    arguments give the same crops; train and test draw from different seeds as well as different pixels."""
    _check_split(split)
    if crops_per_photo < 1 or image_size < 1:
        raise ValueError(f"crops_per_photo ({crops_per_photo}) and image_size ({image_size}) must be positive")
    images, labels = [], []
    for label, name in enumerate(CROP_ID_PHOTOS):
        photo = load_photo(name)
        region = photo_region(photo, split)
        gen = sample_generator(seed, SPLITS.index(split), label)
        kept = 0
        for _ in range(20 * crops_per_photo):
            crop = _random_square(region, min(photo.size), gen).resize((image_size, image_size), Image.BICUBIC)
            pixels = np.asarray(crop)
            if pixels.std() < MIN_CROP_STD:
                continue
            images.append(torch.from_numpy(pixels.copy()).permute(2, 0, 1))
            kept += 1
            if kept == crops_per_photo:
                break
        else:
            raise RuntimeError(f"only {kept} of {crops_per_photo} crops of {name} had content")
        labels += [label] * crops_per_photo
    return torch.stack(images), torch.tensor(labels, dtype=torch.int64)


class TrainRegionPhotos(ImageDataset):
    """The embedded pretraining dataset: the bundled photos, each cut to its crop_id training region."""

    def __init__(self, transform, seed: int, length: int) -> None:
        super().__init__([photo_folder() / n for n in CROP_ID_PHOTOS], transform, seed, length)

    def load(self, i: int) -> Image.Image:
        return photo_region(load_photo(self.paths[i].name), "train")
