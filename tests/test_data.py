"""Data: resumable rank-sharded sampling, reproducible samples, the embedded photos and the folder datasets."""
import itertools

import torch
from PIL import Image

from ssl_zoo.data.datasets import EMBEDDED_PHOTOS, build_embedded, build_flat_folder, build_image_folder
from ssl_zoo.data.loader import ResumableBatchSampler, make_loader
from ssl_zoo.data.transforms import DefaultTransform


class Section(dict):
    __getattr__ = dict.__getitem__


def take(iterable, n):
    return list(itertools.islice(iter(iterable), n))


def test_ranks_split_each_epoch_without_overlap():
    length, batch, world = 103, 5, 3
    per_rank = [take(ResumableBatchSampler(length, batch, seed=1, rank=r, world_size=world), 7) for r in range(world)]
    epoch0 = [key for r in range(world) for b in per_rank[r] for key in b if key[0] == 0]
    assert len(epoch0) == len(set(epoch0)) == (length // (batch * world)) * batch * world
    assert all(e == 0 for e, _ in epoch0) and any(key[0] == 1 for b in per_rank[0] for key in b)


def test_sampler_resumes_at_a_position():
    straight = take(ResumableBatchSampler(50, 4, seed=7), 30)
    resumed = take(ResumableBatchSampler(50, 4, seed=7, start=17), 13)
    assert resumed == straight[17:]
    assert straight[:12] != take(ResumableBatchSampler(50, 4, seed=8), 12)


def test_samples_do_not_depend_on_worker_count():
    dataset = build_embedded(Section(samples_per_epoch=64), DefaultTransform(32), seed=0)
    in_process = [b["image"] for b in take(make_loader(dataset, 8, 0, 0, 0, 1, start=0), 3)]
    workers = [b["image"] for b in take(make_loader(dataset, 8, 2, 0, 0, 1, start=0), 3)]
    assert all(torch.equal(a, b) for a, b in zip(in_process, workers))
    assert in_process[0].shape == (8, 3, 32, 32) and not torch.equal(in_process[0], in_process[1])


def test_embedded_photos_are_real_colour_images():
    dataset = build_embedded(Section(samples_per_epoch=len(EMBEDDED_PHOTOS)), DefaultTransform(32), seed=0)
    for i in range(len(EMBEDDED_PHOTOS)):
        img = dataset.load(i)
        assert img.mode == "RGB" and min(img.size) >= 256
        channels = torch.tensor(list(img.resize((32, 32)).getdata()), dtype=torch.float).T
        assert (channels[0] - channels[2]).abs().mean() > 1  # not greyscale


def test_image_folder_labels_and_flat_folder(tmp_path):
    for cls in ("cat", "dog"):
        (tmp_path / cls).mkdir()
        for i in range(3):
            Image.new("RGB", (20, 20), (i, 0, 0)).save(tmp_path / cls / f"{i}.jpg")
    labelled = build_image_folder(Section(root=str(tmp_path)), DefaultTransform(16), seed=0)
    assert labelled.classes == ["cat", "dog"] and sorted(labelled.labels) == [0, 0, 0, 1, 1, 1]
    flat = build_flat_folder(Section(root=str(tmp_path)), DefaultTransform(16), seed=0)
    assert len(flat) == 6 and flat[(0, 4)]["image"].shape == (3, 16, 16)
