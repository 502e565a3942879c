"""MAE: masking, what the encoder sees, where the decoder puts tokens, the loss, sizes, timm export, configs."""
from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
from PIL import Image

from ssl_zoo.config import load_config
from ssl_zoo.engine.strategy import TorchStrategy
from ssl_zoo.run import main
import ssl_zoo_mae
from ssl_zoo_mae.method import Mae, patchify, unpatchify
from ssl_zoo_mae.vit import build_mae_vit

#: ViT with 2 blocks on a 4 x 4 grid of 8-px patches, decoder of 1 block: milliseconds per step
TINY = ["method=mae", "model.img_size=32", "model.patch_size=8", "model.embed_dim=32", "model.depth=2",
        "model.num_heads=2", "model.decoder_embed_dim=16", "model.decoder_depth=1", "model.decoder_num_heads=2"]
EXPERIMENTS = sorted(p.stem for p in (Path(ssl_zoo_mae.__file__).parent / "configs" / "experiment")
                     .glob("mae_vit_*ep.yaml"))


def tiny(*extra: str) -> Mae:
    torch.manual_seed(0)
    return Mae(load_config([*TINY, *extra]))


def batch(n: int = 4, size: int = 32, patches: int = 16, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    smooth = torch.nn.functional.interpolate(torch.rand(n, 3, 4, 4, generator=gen), size=size, mode="bilinear")
    return {"image": smooth * 2 - 1 + 0.1 * torch.randn(n, 3, size, size, generator=gen),
            "noise": torch.rand(n, patches, generator=gen)}


def test_mask_hides_the_patches_of_highest_noise_per_sample() -> None:
    method, b = tiny(), batch()
    _, mask, ids_restore = method.encoder(b["image"], b["noise"], method.num_keep)
    assert method.num_keep == 4  # 25% of 16
    assert mask.sum(dim=1).tolist() == [12.0] * 4
    rank = b["noise"].argsort(dim=1).argsort(dim=1)
    assert torch.equal(mask.bool(), rank >= method.num_keep)
    assert torch.equal(ids_restore, rank)
    assert not torch.equal(mask[0], mask[1])  # per sample, not one mask for the batch


def test_encoder_sees_only_the_visible_patches() -> None:
    method, b = tiny().eval(), batch()
    latent, mask, _ = method.encoder(b["image"], b["noise"], method.num_keep)
    assert latent.shape == (4, 1 + method.num_keep, 32)
    hidden_pixels = unpatchify(mask.unsqueeze(-1).expand(-1, -1, 8 * 8 * 3), 8, (4, 4)).bool()
    changed = b["image"].masked_fill(hidden_pixels, 7.0)
    assert torch.allclose(method.encoder(changed, b["noise"], method.num_keep)[0], latent)
    visible_changed = b["image"].masked_fill(~hidden_pixels, 7.0)
    assert not torch.allclose(method.encoder(visible_changed, b["noise"], method.num_keep)[0], latent)


def test_decoder_puts_visible_tokens_back_in_place_and_mask_tokens_elsewhere() -> None:
    method, b = tiny().eval(), batch()
    latent, mask, ids_restore = method.encoder(b["image"], b["noise"], method.num_keep)
    seen = {}
    method.decoder.blocks[0].register_forward_pre_hook(lambda _, args: seen.setdefault("x", args[0]))
    method.decoder(latent, ids_restore)
    tokens = seen["x"][:, 1:] - method.decoder.pos_embed[:, 1:]
    embedded = method.decoder.embed(latent[:, 1:])
    for i in range(4):
        visible = (~mask[i].bool()).nonzero().flatten()
        order = b["noise"][i, visible].argsort()  # kept tokens come in order of rising noise
        assert torch.allclose(tokens[i, visible[order]], embedded[i], atol=1e-6)
        hidden = mask[i].bool()
        assert torch.allclose(tokens[i, hidden], method.decoder.mask_token[0].expand(int(hidden.sum()), -1))


def test_loss_counts_only_the_hidden_patches() -> None:
    method, b = tiny(), batch()
    captured = {}

    def keep(_, __, out):
        out.retain_grad()
        captured["pred"] = out

    method.decoder.register_forward_hook(keep)
    _, mask, _ = method.encoder(b["image"], b["noise"], method.num_keep)
    method.training_step(b, 0).loss.backward()
    grad_norm = captured["pred"].grad.norm(dim=-1)
    assert torch.all(grad_norm[~mask.bool()] == 0) and torch.all(grad_norm[mask.bool()] > 0)


@pytest.mark.parametrize("norm_pix", [True, False])
def test_targets_are_pixels_normalised_per_patch(norm_pix: bool) -> None:
    method, b = tiny(f"method.norm_pix_loss={norm_pix}"), batch()
    target, mean, std = method._targets(b["image"])
    raw = patchify(b["image"], 8)
    if norm_pix:
        assert torch.allclose(target.mean(dim=-1), torch.zeros(4, 16), atol=1e-5)
        assert torch.allclose(target.std(dim=-1), torch.ones(4, 16), atol=1e-3)
        assert torch.allclose(target * std + mean, raw, atol=1e-5)
    else:
        assert torch.equal(target, raw)


def test_patchify_is_row_major_and_inverts() -> None:
    images = torch.arange(2 * 3 * 16 * 24, dtype=torch.float32).view(2, 3, 16, 24)
    patches = patchify(images, 8)
    assert patches.shape == (2, 6, 8 * 8 * 3)
    assert torch.equal(patches[0, 1].view(8, 8, 3).permute(2, 0, 1), images[0, :, :8, 8:16])  # row 0, column 1
    assert torch.equal(unpatchify(patches, 8, (2, 3)), images)


def test_loss_falls_on_a_fixed_batch() -> None:
    method, b = tiny(), batch(n=8)
    optimizer = torch.optim.AdamW(method.parameters(), lr=3e-3, betas=(0.9, 0.95))
    losses = []
    for step in range(40):
        loss = method.training_step(b, step).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert sum(losses[-5:]) < 0.75 * sum(losses[:5])


@pytest.mark.parametrize(("size", "architecture", "millions"), [
    ("tiny", "vit_tiny_patch16_224", None), ("small", "vit_small_patch16_224", None),
    ("base", "vit_base_patch16_224", 86), ("large", "vit_large_patch16_224", 304),
    ("huge", "vit_huge_patch14_224", 632)])
def test_encoders_have_timm_and_paper_sizes(size: str, architecture: str, millions: int | None) -> None:
    cfg = load_config(["method=mae", f"model=mae_vit_{size}"])
    encoder = build_mae_vit(cfg.model, device="meta")
    ours = sum(t.numel() for t in [*encoder.parameters(), *encoder.buffers()])
    with torch.device("meta"):
        reference = timm.create_model(architecture, num_classes=0, img_size=cfg.model.img_size)
    assert ours == sum(p.numel() for p in reference.parameters())
    if millions:  # the paper counts the encoder with its 1000-class head
        assert (ours + 1001 * cfg.model.embed_dim) / 1e6 == pytest.approx(millions, rel=0.01)
    if size in ("base", "large", "huge"):
        assert (cfg.model.decoder_depth, cfg.model.decoder_embed_dim, cfg.model.decoder_num_heads) == (8, 512, 16)


@pytest.mark.parametrize("pool", ["avg", "token"])
def test_backbone_loads_into_its_timm_form_with_only_the_head_missing_and_gives_the_same_features(pool: str) -> None:
    cfg = load_config([*TINY, f"model.global_pool={pool}"])
    torch.manual_seed(0)
    method = Mae(cfg).eval()
    spec = Mae.timm_spec(cfg)
    assert spec.architecture.startswith("vit_") and spec.input_size == (3, 32, 32)
    model = timm.create_model(spec.architecture, num_classes=5, **spec.model_args).eval()
    result = model.load_state_dict(method.backbone_state_dict(), strict=False)
    assert sorted(result.missing_keys) == ["head.bias", "head.weight"] and not result.unexpected_keys
    images = batch()["image"]
    with torch.no_grad():
        ours = method.extract_features(images)
        theirs = model.forward_head(model.forward_features(images), pre_logits=True)
    assert ours.shape == (4, 32)
    assert torch.allclose(ours, theirs, atol=1e-5)


def test_transform_is_one_deterministic_crop_with_patch_noise() -> None:
    cfg = load_config([*TINY])
    transform = Mae.make_transform(cfg)
    photo = Image.fromarray((torch.rand(120, 160, 3) * 255).to(torch.uint8).numpy())
    sample = transform(photo, torch.Generator().manual_seed(3))
    assert set(sample) == {"image", "noise"}
    assert sample["image"].shape == (3, 32, 32) and sample["noise"].shape == (16,)
    assert 0 <= sample["noise"].min() and sample["noise"].max() < 1
    again = transform(photo, torch.Generator().manual_seed(3))
    assert all(torch.equal(sample[k], again[k]) for k in sample)
    other = transform(photo, torch.Generator().manual_seed(4))
    assert not torch.equal(sample["noise"], other["noise"])


def test_reconstruction_picture_has_masked_reconstruction_and_original(tmp_path: Path) -> None:
    method = tiny()
    (path,) = method.visualize(batch(), tmp_path)
    grid = Image.open(path)
    assert path.name == "reconstructions.png"
    assert grid.width == 3 * 32 + 4 * 2 and grid.height == 4 * 32 + 5 * 2  # 4 rows of 3 pictures, 2-px gaps
    assert method.training  # the mode it was in


def test_activation_checkpointing_reaches_encoder_and_decoder() -> None:
    cfg = load_config([*TINY, "trainer.activation_checkpointing=true", "trainer.batch_size=4"])
    torch.manual_seed(0)
    strategy = TorchStrategy(cfg, Mae(cfg), torch.device("cpu"))
    assert strategy.method.encoder.grad_checkpointing and strategy.method.decoder.grad_checkpointing
    plain = tiny()
    b = batch()
    assert torch.allclose(strategy.method.training_step(b, 0).loss, plain.training_step(b, 0).loss)


def test_method_selects_its_own_model_family_and_a_command_line_model_wins() -> None:
    assert load_config(["method=mae"]).model.name == "mae_vit"
    assert load_config(["method=mae", "model=mae_vit_base"]).model.embed_dim == 768
    assert load_config(["method=peco"]).model.name == "beit"  # other methods keep the root's default


@pytest.mark.parametrize(("overrides", "message"), [
    (["model=beit_base"], "method=mae needs a model of the mae_vit family"),
    (["method.mask_ratio=1.0"], "'method.mask_ratio': 1.0; allowed: > 0, < 1"),
    (["model.img_size=16", "method.mask_ratio=0.9"], "'method.mask_ratio': 0.9; allowed: one that keeps a patch of 1"),
    (["model.img_size=100"], "'model.img_size': 100; allowed: a multiple of model.patch_size (16)"),
    (["model.decoder_num_heads=3"], "'model.decoder_embed_dim': 128; allowed: a multiple of 4 (sin-cos position terms) "
                                    "and of model.decoder_num_heads (3)"),
    (["model.global_pool=max"], "'model.global_pool': 'max'; allowed: one of avg, token"),
])
def test_bad_settings_fail_before_any_work_with_one_line(overrides: list[str], message: str, capsys,
                                                         tmp_path: Path) -> None:
    assert main(["method=mae", *overrides, f"output_dir={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_paper_recipes_compose(experiment: str) -> None:
    for prefix in ([], ["method=mae"]):
        cfg = load_config([*prefix, f"experiment={experiment}", "data.root=/imagenet/train"])
        assert cfg.method.name == "mae" and cfg.model.name == "mae_vit" and cfg.data.name == "image_folder"
    assert cfg.model.embed_dim == {"base": 768, "large": 1024, "huge": 1280}[experiment.split("_")[2]]
    batch_size = cfg.trainer.batch_size * cfg.trainer.accumulate * 64  # per process, 8 nodes x 8 GPUs
    assert batch_size == 4096
    assert cfg.trainer.lr == pytest.approx(1.5e-4 * batch_size / 256)
    assert cfg.trainer.weight_decay == 0.05 and list(cfg.trainer.betas) == [0.9, 0.95]
    steps_per_epoch = 1281167 / batch_size
    assert cfg.trainer.warmup_steps == round(40 * steps_per_epoch)
    epochs = int(experiment.split("_")[-1].removesuffix("ep"))
    assert epochs in (800, 1600) and cfg.trainer.max_steps == round(epochs * steps_per_epoch)
    assert cfg.method.mask_ratio == 0.75 and cfg.method.norm_pix_loss
    assert list(cfg.method.view.scale) == [0.2, 1.0] and cfg.method.view.flip_prob == 0.5
