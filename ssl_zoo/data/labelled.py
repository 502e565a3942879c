"""Labelled datasets for evaluation: crop_id (bundled photos), Fashion-MNIST (Debian's package), ImageFolder.

Each is registered twice: in `DATASETS` (a `data=` option; its training split as a training dataset whose
samples carry a `label`, which fine-tuning trains on) and in `LABELLED_SPLITS`, which gives the frozen-feature
protocols either split as uint8 images at the model's input size. Splits are the datasets' own: crop_id's
disjoint photo regions, Fashion-MNIST's official 60k / 10k, ImageFolder's `root` / `val_root`.
"""
from __future__ import annotations

import dataclasses
import gzip
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image

from ssl_zoo.data.crop_id import crop_id_split
from ssl_zoo.data.datasets import Transform, list_images, sample_generator
from ssl_zoo.registry import DATASETS, Registry
from ssl_zoo.schema import checked

LABELLED_SPLITS: Registry[Any] = Registry("labelled dataset")
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
                       "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}
EVAL_RESIZE_RATIO = 0.875  # ImageFolder evaluation: shorter side to size / 0.875, then a centre crop (timm's)


class LabelledSplit(torch.utils.data.Dataset):
    """One split: `split[i]` is a (uint8 (3, size, size) image, label) pair; `labels` are all of them."""

    def __init__(self, labels: torch.Tensor, num_classes: int, images: Optional[torch.Tensor] = None) -> None:
        self.labels, self.num_classes, self.images = labels, num_classes, images

    def __len__(self) -> int:
        return len(self.labels)

    def image(self, i: int) -> torch.Tensor:
        return self.images[i]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.image(i), int(self.labels[i])


class GreyImages(LabelledSplit):
    """Small grey images (Fashion-MNIST's 28 x 28) upsampled to the model's size and repeated to 3 channels."""

    def __init__(self, grey: np.ndarray, labels: torch.Tensor, num_classes: int, size: int) -> None:
        super().__init__(labels, num_classes)
        self.grey, self.size = grey, size

    def image(self, i: int) -> torch.Tensor:
        img = Image.fromarray(self.grey[i]).resize((self.size, self.size), Image.BICUBIC)
        return torch.from_numpy(np.asarray(img).copy()).expand(3, -1, -1)


class FolderImages(LabelledSplit):
    def __init__(self, paths: list[Path], labels: torch.Tensor, num_classes: int, size: int) -> None:
        super().__init__(labels, num_classes)
        self.paths, self.size = paths, size

    def image(self, i: int) -> torch.Tensor:
        with Image.open(self.paths[i]) as img:
            img = TF.resize(img.convert("RGB"), int(self.size / EVAL_RESIZE_RATIO),
                            interpolation=TF.InterpolationMode.BICUBIC)
        return TF.pil_to_tensor(TF.center_crop(img, [self.size, self.size]))


class TrainingSplit(torch.utils.data.Dataset):
    """A labelled split as a training dataset: `(epoch, index)` -> transform(PIL image, generator) + label."""

    def __init__(self, split: LabelledSplit, transform: Transform, seed: int) -> None:
        self.split, self.transform, self.seed = split, transform, seed
        self.labels, self.num_classes = split.labels, split.num_classes

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        epoch, index = key
        image, label = self.split[index]
        sample = self.transform(TF.to_pil_image(image), sample_generator(self.seed, epoch, index))
        return {**sample, "label": torch.tensor(label), "skipped_images": torch.tensor(0)}


def resolve_size(section: Any, default: Optional[int]) -> int:
    size = section.image_size or default
    if not size:
        raise ValueError(f"data.image_size is not set and no model input size is known: set data.image_size=N")
    return size


# ---- crop_id ----------------------------------------------------------------------------------------------
@dataclasses.dataclass
class CropIdConfig:
    name: str = "crop_id"
    image_size: Optional[int] = checked(None, ge=8)  # None: the evaluated model's input size
    train_crops_per_photo: int = checked(200, ge=1)
    test_crops_per_photo: int = checked(100, ge=1)
    num_workers: int = checked(0, ge=0)


@LABELLED_SPLITS.register("crop_id")
def crop_id_labelled(section: Any, split: str, seed: int, size: Optional[int] = None) -> LabelledSplit:
    count = section.train_crops_per_photo if split == "train" else section.test_crops_per_photo
    images, labels = crop_id_split(split, resolve_size(section, size), count, seed)
    return LabelledSplit(labels, int(labels.max()) + 1, images)


# ---- Fashion-MNIST ----------------------------------------------------------------------------------------
@dataclasses.dataclass
class FashionMnistConfig:
    name: str = "fashion_mnist"
    root: str = FASHION_MNIST_DIR
    image_size: Optional[int] = None  # None: the evaluated model's input size (the images are 28 x 28)
    max_train: int = 0  # 0: all 60 000; else the first N (frozen-feature protocols on small CPUs)
    max_test: int = 0  # 0: all 10 000
    num_workers: int = 0


def _read_idx(path: Path, offset: int) -> np.ndarray:
    with gzip.open(path) as f:
        return np.frombuffer(f.read(), dtype=np.uint8, offset=offset)


@LABELLED_SPLITS.register("fashion_mnist")
def fashion_mnist_labelled(section: Any, split: str, seed: int, size: Optional[int] = None) -> LabelledSplit:
    root = Path(section.root)
    image_file, label_file = (root / name for name in FASHION_MNIST_FILES[split])
    if not image_file.is_file() or not label_file.is_file():
        hint = "install it: apt-get install dataset-fashion-mnist" if section.root == FASHION_MNIST_DIR else \
            "point data.root at the folder of the four gzipped IDX files"
        raise FileNotFoundError(f"Fashion-MNIST not found: no {image_file} ({hint})")
    labels = torch.from_numpy(_read_idx(label_file, 8).astype(np.int64))
    grey = _read_idx(image_file, 16).reshape(-1, 28, 28)
    limit = section.max_train if split == "train" else section.max_test
    if limit:
        grey, labels = grey[:limit], labels[:limit]
    return GreyImages(grey, labels, 10, resolve_size(section, size))


# ---- ImageFolder (ImageNet layout) ------------------------------------------------------------------------
@LABELLED_SPLITS.register("image_folder")
def image_folder_labelled(section: Any, split: str, seed: int, size: Optional[int] = None) -> LabelledSplit:
    key = "root" if split == "train" else "val_root"
    if section[key] is None:
        raise ValueError(f"data.{key} is not set: point it at the {split} images (ImageNet layout: <class>/<image>)")
    root = Path(section[key]).expanduser()
    classes = sorted(d.name for d in root.iterdir() if d.is_dir()) if root.is_dir() else []
    if not classes:
        raise FileNotFoundError(f"data.{key} '{root}' has no class sub-folders (ImageNet layout: <class>/<image>)")
    paths = list_images(root)
    labels = torch.tensor([classes.index(p.relative_to(root).parts[0]) for p in paths])
    return FolderImages(paths, labels, len(classes), resolve_size(section, size))


# ---- as training data (fine-tuning) -----------------------------------------------------------------------
@DATASETS.register("crop_id", schema=CropIdConfig)
def build_crop_id(section: Any, transform: Transform, seed: int) -> TrainingSplit:
    """crop_id's training crops (the photos' left 60%), each with its photo's label."""
    return TrainingSplit(crop_id_labelled(section, "train", seed), transform, seed)


@DATASETS.register("fashion_mnist", schema=FashionMnistConfig)
def build_fashion_mnist(section: Any, transform: Transform, seed: int) -> TrainingSplit:
    return TrainingSplit(fashion_mnist_labelled(section, "train", seed), transform, seed)
