"""Labelled data: crop_id (disjoint train/test regions, dropped borders, determinism; pretraining sees only the
training regions) and Fashion-MNIST from Debian's files."""
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ssl_zoo.data.crop_id import (CROP_ID_PHOTOS, MIN_CROP_STD, TRAIN_SHARE, load_photo, photo_region,
                                  crop_id_split)
from ssl_zoo.data.datasets import EMBEDDED_PHOTOS, build_embedded
from ssl_zoo.data.labelled import FASHION_MNIST_DIR, fashion_mnist_labelled


class Section(dict):
    __getattr__ = dict.__getitem__


def test_regions_split_each_photo_at_60_percent_without_overlap():
    img = Image.fromarray(np.arange(100 * 7 * 3, dtype=np.uint8).reshape(7, 100, 3) % 251)
    train, test = photo_region(img, "train"), photo_region(img, "test")
    assert train.size == (60, 7) and test.size == (40, 7)
    glued = np.concatenate([np.asarray(train), np.asarray(test)], axis=1)
    assert np.array_equal(glued, np.asarray(img))
    with pytest.raises(ValueError, match="split 'val'"):
        photo_region(img, "val")


def test_splits_are_labelled_deterministic_and_seed_dependent():
    images, labels = crop_id_split("train", 32, 4, seed=0)
    assert images.dtype == torch.uint8 and images.shape == (4 * len(CROP_ID_PHOTOS), 3, 32, 32)
    assert labels.dtype == torch.int64 and labels.tolist() == [c for c in range(len(CROP_ID_PHOTOS)) for _ in range(4)]
    again, _ = crop_id_split("train", 32, 4, seed=0)
    other, _ = crop_id_split("train", 32, 4, seed=1)
    assert torch.equal(images, again) and not torch.equal(images, other)
    assert CROP_ID_PHOTOS == EMBEDDED_PHOTOS


def test_near_constant_crops_are_dropped(monkeypatch):
    """Photos whose left half is black (a border): the black crops drawn there are replaced by others."""
    from ssl_zoo.data import crop_id

    pixels = np.random.default_rng(0).integers(0, 256, (200, 300, 3), dtype=np.uint8)
    pixels[:, :150] = 0
    monkeypatch.setattr(crop_id, "load_photo", lambda name: Image.fromarray(pixels))
    drawn = []
    original = crop_id._random_square
    monkeypatch.setattr(crop_id, "_random_square", lambda *args: drawn.append(original(*args)) or drawn[-1])
    images, _ = crop_id_split("train", 16, 10, seed=0)
    stds = images.float().flatten(1).std(dim=1, correction=0)
    assert stds.min() >= MIN_CROP_STD
    assert len(drawn) > len(images)  # some drawn crops were black and dropped


def test_test_crops_come_from_the_right_region_only():
    """Every test crop must be found inside its photo's right 40% (exact pixels, before the resize)."""
    from ssl_zoo.data import crop_id

    seen = []
    original = crop_id._random_square

    def spy(region, shorter_side, gen):
        crop = original(region, shorter_side, gen)
        seen.append((region.size, crop.size))
        return crop

    crop_id._random_square = spy
    try:
        crop_id_split("test", 16, 2, seed=0)
    finally:
        crop_id._random_square = original
    for (photo_name, (region_size, crop_size)) in zip([n for n in CROP_ID_PHOTOS for _ in range(2)], seen):
        width = load_photo(photo_name).width
        assert region_size[0] == width - round(width * TRAIN_SHARE)
        assert crop_size[0] <= region_size[0] and crop_size[1] <= region_size[1]


def test_pretraining_images_are_the_training_regions():
    dataset = build_embedded(Section(samples_per_epoch=len(EMBEDDED_PHOTOS)), lambda img, gen: {}, seed=0)
    for i, name in enumerate(EMBEDDED_PHOTOS):
        full = load_photo(name)
        seen = dataset.load(i)
        assert seen.size == (round(full.width * TRAIN_SHARE), full.height)
        assert np.array_equal(np.asarray(seen), np.asarray(full)[:, :seen.width])


@pytest.mark.skipif(not Path(FASHION_MNIST_DIR, "t10k-images-idx3-ubyte.gz").is_file(),
                    reason="needs Debian's dataset-fashion-mnist (.ci/run installs it)")
def test_fashion_mnist_reads_the_official_split_from_the_debian_files():
    section = Section(name="fashion_mnist", root=FASHION_MNIST_DIR, image_size=None, max_train=50, max_test=0)
    test = fashion_mnist_labelled(section, "test", seed=0, size=32)
    train = fashion_mnist_labelled(section, "train", seed=0, size=32)
    assert len(test) == 10_000 and len(train) == 50 and test.num_classes == 10
    assert torch.bincount(test.labels).tolist() == [1000] * 10  # the official test split is balanced
    image, label = test[0]
    assert image.shape == (3, 32, 32) and image.dtype == torch.uint8 and image.float().std() > 10
    assert torch.equal(image[0], image[2])  # grey, repeated over channels


def test_fashion_mnist_absent_names_the_install_command(tmp_path):
    section = Section(name="fashion_mnist", root=FASHION_MNIST_DIR, image_size=32, max_train=0, max_test=0)
    if Path(FASHION_MNIST_DIR, "train-images-idx3-ubyte.gz").is_file():
        section = Section(section, root=str(tmp_path))
        with pytest.raises(FileNotFoundError, match="point data.root at the folder"):
            fashion_mnist_labelled(section, "train", seed=0)
    else:
        with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
            fashion_mnist_labelled(section, "train", seed=0)
