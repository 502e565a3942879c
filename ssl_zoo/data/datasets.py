"""The core's datasets: embedded real photos (crop_id's training regions), ImageFolder, a flat folder of
images, synthetic noise.

Every dataset maps a key `(epoch, index)` to a sample made by `transform(pil_image, generator)`, with the
generator seeded from (seed, epoch, index): samples are reproducible and a resumed run sees the same data.
Unreadable images are skipped (the next readable one is used), counted in the sample's `skipped_images`
and reported once per file on stderr; they never stop a run. "Unreadable" is any failure to decode (corrupt,
truncated, empty, not an image at all) and a decompression bomb (more pixels than PIL's `MAX_IMAGE_PIXELS`).
Every decodable mode becomes 8-bit RGB: CMYK, palette, RGBA (alpha dropped), 16-bit and float greyscale
(scaled to 8 bits, not clipped), the first frame of an animation.
"""
from __future__ import annotations

import dataclasses
import logging
import warnings
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
from omegaconf import MISSING
from PIL import Image

from ssl_zoo.registry import DATASETS
from ssl_zoo.schema import checked

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm"}
# the colour photographs inside scikit-image's wheel (its other bundled images are greyscale or synthetic)
EMBEDDED_PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "hubble_deep_field.jpg", "ihc.png",
                   "motorcycle_left.png", "motorcycle_right.png", "retina.jpg", "rocket.jpg")

Transform = Callable[[Image.Image, torch.Generator], dict[str, Any]]


def sample_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    state = np.random.SeedSequence([seed, epoch, index]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def open_rgb(path: Path) -> Image.Image:
    """Decode an image file to 8-bit RGB, or raise (a decompression bomb too: its warning becomes an error)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(path) as img:
            img.seek(0)  # an animation: its first frame
            if img.mode.startswith("I") or img.mode == "F":  # 16/32-bit integer or float greyscale
                pixels = np.asarray(img, dtype=np.float64)
                scale = 255.0 / 65535.0 if img.mode.startswith("I;16") or pixels.max() > 255 else 1.0
                return Image.fromarray(np.clip(pixels * scale, 0, 255).astype(np.uint8)).convert("RGB")
            return img.convert("RGB")


class ImageDataset(torch.utils.data.Dataset):
    """Images read from files; `load(i)` may be overridden (the embedded photos are cached in memory)."""

    def __init__(self, paths: list[Path], transform: Transform, seed: int, length: Optional[int] = None) -> None:
        if not paths:
            raise ValueError("the dataset has no images: check data.root (accepted suffixes: "
                             f"{', '.join(sorted(IMAGE_SUFFIXES))})")
        self.paths = paths
        self.transform = transform
        self.seed = seed
        self.length = length or len(paths)
        self.labels: Optional[list[int]] = None
        self._reported: set[Path] = set()

    def __len__(self) -> int:
        return self.length

    def load(self, i: int) -> Image.Image:
        return open_rgb(self.paths[i])

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        epoch, index = key
        skipped = 0
        for attempt in range(len(self.paths)):
            i = (index + attempt) % len(self.paths)
            try:
                img = self.load(i)
                break
            except Exception as exc:  # decoders raise many types (OSError, SyntaxError, struct.error, ...)
                skipped += 1
                if self.paths[i] not in self._reported:
                    self._reported.add(self.paths[i])
                    log.warning("skipping unreadable image %s (%s)", self.paths[i], exc)
        else:
            raise RuntimeError(f"none of the {len(self.paths)} images could be read")
        sample = self.transform(img, sample_generator(self.seed, epoch, index))
        sample["skipped_images"] = torch.tensor(skipped)
        if self.labels is not None:  # a labelled folder (fine-tuning); a skipped image's label goes with it
            sample["label"] = torch.tensor(self.labels[i])
        return sample


class SyntheticImages(torch.utils.data.Dataset):
    def __init__(self, size: int, length: int, transform: Transform, seed: int) -> None:
        self.size, self.length, self.transform, self.seed = size, length, transform, seed

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        gen = sample_generator(self.seed, *key)
        pixels = torch.randint(0, 256, (self.size, self.size, 3), generator=gen, dtype=torch.uint8)
        sample = self.transform(Image.fromarray(pixels.numpy()), gen)
        sample["skipped_images"] = torch.tensor(0)
        return sample


def list_images(root: Path) -> list[Path]:
    if not root.is_dir():
        raise FileNotFoundError(f"data.root '{root}' is not a directory; point data.root at your images")
    return sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


@dataclasses.dataclass
class EmbeddedConfig:
    name: str = "embedded"
    image_size: int = checked(64, ge=1)
    samples_per_epoch: int = checked(1024, ge=1)
    num_workers: int = checked(1, ge=0)


@dataclasses.dataclass
class FolderConfig:
    name: str = "flat_folder"
    root: str = MISSING
    image_size: int = checked(224, ge=1)
    num_workers: int = checked(4, ge=0)


@dataclasses.dataclass
class ImageFolderConfig(FolderConfig):
    name: str = "image_folder"
    val_root: Optional[str] = None  # the validation images in the same layout (evaluation's test split)


@dataclasses.dataclass
class SyntheticConfig:
    name: str = "synthetic"
    image_size: int = checked(224, ge=1)
    samples_per_epoch: int = checked(4096, ge=1)
    num_workers: int = checked(0, ge=0)


@DATASETS.register("embedded", schema=EmbeddedConfig)
def build_embedded(section: Any, transform: Transform, seed: int) -> ImageDataset:
    """The bundled photos cut to crop_id's training regions, so that no crop_id test pixel is pretrained on."""
    from ssl_zoo.data.crop_id import TrainRegionPhotos  # it builds on this module

    return TrainRegionPhotos(transform, seed, section.samples_per_epoch)


@DATASETS.register("flat_folder", schema=FolderConfig)
def build_flat_folder(section: Any, transform: Transform, seed: int) -> ImageDataset:
    return ImageDataset(list_images(Path(section.root).expanduser()), transform, seed)


@DATASETS.register("image_folder", schema=ImageFolderConfig)
def build_image_folder(section: Any, transform: Transform, seed: int) -> ImageDataset:
    """ImageNet layout; the class sub-folders are the labels, which evaluation (not pretraining) uses."""
    root = Path(section.root).expanduser()
    paths = list_images(root)
    classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    if not classes:
        raise FileNotFoundError(f"data.root '{root}' has no class sub-folders (ImageNet layout: root/<class>/<image>)"
                                "; for a folder of unlabeled images use data=flat_folder")
    dataset = ImageDataset(paths, transform, seed)
    dataset.labels = [classes.index(p.relative_to(root).parts[0]) for p in paths]
    dataset.classes = classes
    return dataset


@DATASETS.register("synthetic", schema=SyntheticConfig)
def build_synthetic(section: Any, transform: Transform, seed: int) -> SyntheticImages:
    return SyntheticImages(section.image_size, section.samples_per_epoch, transform, seed)
