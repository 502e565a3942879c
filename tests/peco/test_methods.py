"""Stage 1 and stage 2 on a small fixed batch: losses fall, the GAN terms reach only their own side,
the frozen tokenizer stays frozen, transforms give the promised views."""
from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from ssl_zoo.config import ConfigError, load_config
from ssl_zoo.engine.strategy import TorchStrategy
from ssl_zoo_peco.config import tokenizer_image_size
from ssl_zoo_peco.discriminator import hinge_d_loss, hinge_g_loss
from ssl_zoo_peco.mim_method import Peco
from ssl_zoo_peco.tokenizer_method import PecoTokenizer

TINY = [
    "model.img_size=32", "model.embed_dim=32", "model.depth=2", "model.num_heads=2", "model.drop_path_rate=0.0",
    "method.tokenizer.autoencoder.base_width=8", "method.tokenizer.autoencoder.z_channels=16",
    "method.tokenizer.autoencoder.norm_groups=4", "method.tokenizer.quantizer.num_codes=16",
    "method.tokenizer.quantizer.dim=8", "method.tokenizer_loss.gan.width=8", "method.mask.num_masked=2",
    "method.mask.min_block=1", "method.kernel_impl=torch",
]


def images(n: int = 4, size: int = 32) -> torch.Tensor:
    torch.manual_seed(0)
    smooth = torch.nn.functional.interpolate(torch.rand(n, 3, 4, 4), size=size, mode="bilinear")
    return smooth * 2 - 1


def tokenizer_view(cfg, x: torch.Tensor) -> torch.Tensor:
    """The tokenizer's view of the ViT's images (its own size: grid x downsampling factor)."""
    return torch.nn.functional.interpolate(x, size=tokenizer_image_size(cfg), mode="bilinear", antialias=True)


def train(method: torch.nn.Module, batch: dict, steps: int, lr: float, betas=(0.9, 0.999)) -> list[float]:
    groups = method.param_groups(0.0)
    for g in groups:
        g.pop("lr_scale", None)
    opt = torch.optim.AdamW(groups, lr=lr, betas=betas)
    method.train()
    method.on_train_start(batch)
    losses = []
    for step in range(steps):
        out = method.training_step(batch, step)
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(out.loss.item())
    return losses


@pytest.fixture(scope="module")
def tokenizer_export(tmp_path_factory) -> Path:
    cfg = load_config(["method=peco_tokenizer", *TINY, "method.tokenizer_loss.gan.enabled=false"])
    method = PecoTokenizer(cfg)
    train(method, {"image": images()}, steps=5, lr=1e-3)
    path = tmp_path_factory.mktemp("tok") / "method.safetensors"
    save_file({k: v.contiguous() for k, v in method.state_dict().items()}, str(path))
    return path


def test_stage1_losses_fall_and_codebook_is_tracked() -> None:
    light = ["method.tokenizer.autoencoder.channel_mult=[1,2]", "method.tokenizer.image_size=16",
             "method.tokenizer.autoencoder.attention_at_lowest=false", "method.tokenizer_loss.perceptual.layers=[2]",
             "method.tokenizer_loss.gan.enabled=false"]  # few ops: this test is about the losses, not the size
    cfg = load_config(["method=peco_tokenizer", *TINY, *light])
    method = PecoTokenizer(cfg)
    losses = train(method, {"image": images(size=16)}, steps=25, lr=3e-3, betas=(0.5, 0.9))
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5
    summary = method.summary()
    assert 0 < summary["codebook_usage"] <= 1 and summary["codebook_perplexity"] >= 1
    assert {"final_loss_pixel", "final_loss_perceptual"} <= set(summary)


def test_gan_terms_reach_only_their_own_parameters() -> None:
    """One backward of the whole objective: the discriminator gets exactly its hinge loss's gradient (none from
    the generator's term) and the tokenizer exactly that of reconstruction + codebook + weighted generator term
    (none from the discriminator's loss). Both weights are nonzero, so a leak either way changes a gradient."""
    cfg = load_config(["method=peco_tokenizer", *TINY, "method.tokenizer_loss.gan.start_step=0"])
    pristine = PecoTokenizer(cfg).train()
    x = images()
    pristine.tokenizer.quantizer.kmeans_init(pristine.tokenizer.encode_latent(x))

    def run(step: int, objective=None) -> tuple[PecoTokenizer, dict]:
        """A fresh copy's forward (the quantiser's EMA moves on each one), backward of `objective` or the loss."""
        method = copy.deepcopy(pristine)
        torch.manual_seed(1)
        if objective is None:
            out = method.training_step({"image": x}, step)
            out.loss.backward()
            return method, out.metrics
        objective(method).backward()
        return method, {}

    def grads(module: torch.nn.Module) -> list[torch.Tensor]:
        return [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in module.parameters()
                if p.requires_grad]

    full, metrics = run(step=0)
    weight = metrics["gan_weight"]
    assert weight > 1e-3 and metrics["loss_d"] > 0  # both adversarial terms are live
    no_gan, _ = run(step=-1)  # before gan.start_step: reconstruction + codebook only
    generator, _ = run(0, lambda m: weight * hinge_g_loss(m.discriminator(m.tokenizer(x)[0])))
    discriminator, _ = run(0, lambda m: hinge_d_loss(m.discriminator(x), m.discriminator(m.tokenizer(x)[0].detach())))
    for got, rec, adv in zip(grads(full.tokenizer), grads(no_gan.tokenizer), grads(generator.tokenizer)):
        # float32 rounding of a sum of two backward passes: relative to the gradient's largest entry
        assert torch.allclose(got, rec + adv, rtol=1e-4, atol=1e-5 * float(got.abs().max()))
    for got, want in zip(grads(full.discriminator), grads(discriminator.discriminator)):
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-6)


def test_tokenizer_visualisations_are_written(tmp_path: Path) -> None:
    cfg = load_config(["method=peco_tokenizer", *TINY])
    method = PecoTokenizer(cfg)
    paths = method.visualize({"image": images()}, tmp_path)
    assert [p.name for p in paths] == ["reconstructions.png", "codebook_usage.png"]
    grid = Image.open(paths[0])
    assert grid.width > grid.height  # 4 pairs (input, reconstruction) side by side in one row


def stage2_batch(cfg) -> dict:
    gen = torch.Generator().manual_seed(0)
    masks = torch.stack([torch.randperm(4, generator=gen) < 2 for _ in range(8)]).view(8, 2, 2)
    x = torch.cat([images(), images().flip(0)])
    return {"image": x, "tokenizer_view": tokenizer_view(cfg, x), "mask": masks}


@pytest.mark.parametrize("temperature", ["null", "1.0"])
def test_stage2_loss_falls_tokenizer_stays_frozen_and_exports_for_timm(tokenizer_export: Path,
                                                                        temperature: str) -> None:
    cfg = load_config(["method=peco", *TINY, f"method.tokenizer.checkpoint={tokenizer_export}",
                       f"method.soft_target_temperature={temperature}"])
    method = Peco(cfg)
    frozen = {k: v.clone() for k, v in method.tokenizer.state_dict().items()}
    batch = stage2_batch(cfg)
    floor = 0.0  # the targets' entropy: what a soft cross-entropy keeps when the prediction is perfect
    if temperature != "null":
        rows = method.head.masked_rows(batch["mask"].flatten(1))
        soft = method.tokenizer.soft_tokenize(batch["tokenizer_view"], rows, float(temperature))
        floor = float(-(soft * soft.clamp_min(1e-12).log()).sum(-1).mean())
    losses = [loss - floor for loss in train(method, batch, steps=30, lr=3e-3)]
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5
    out = method.training_step(batch, 30)
    assert 0.0 <= out.metrics["mim_accuracy"] <= 1.0
    assert all(torch.equal(frozen[k], v) for k, v in method.tokenizer.state_dict().items())
    assert all(not p.requires_grad for p in method.tokenizer.parameters())
    assert "final_mim_accuracy" in method.summary()
    exported = method.backbone_state_dict()
    assert "blocks.1.attn.relative_position_bias_table" in exported and "mask_token" not in exported


def test_soft_targets_are_distributions_whose_mode_is_the_nearest_code(tokenizer_export: Path) -> None:
    cfg = load_config(["method=peco", *TINY, f"method.tokenizer.checkpoint={tokenizer_export}",
                       "method.soft_target_temperature=1.0"])
    method = Peco(cfg).eval()
    batch = stage2_batch(cfg)
    rows = method.head.masked_rows(batch["mask"].flatten(1))
    hard = method.tokenizer.tokenize(batch["tokenizer_view"]).gather(1, rows)
    soft = method.tokenizer.soft_tokenize(batch["tokenizer_view"], rows, 1.0)
    assert soft.shape == (*rows.shape, method.tokenizer.vocab_size)
    torch.testing.assert_close(soft.sum(-1), torch.ones(rows.shape))
    assert torch.equal(soft.argmax(-1), hard)
    assert (soft.max(-1).values < 0.999).any()  # at this temperature, more than the nearest code
    cold = method.tokenizer.soft_tokenize(batch["tokenizer_view"], rows, 1e-6)
    torch.testing.assert_close(cold, torch.nn.functional.one_hot(hard, method.tokenizer.vocab_size).float())


def test_soft_loss_of_one_hot_targets_is_the_fused_hard_loss(tokenizer_export: Path) -> None:
    cfg = load_config(["method=peco", *TINY, f"method.tokenizer.checkpoint={tokenizer_export}"])
    head = Peco(cfg).head
    torch.manual_seed(0)
    hidden = torch.randn(3, 2, head.in_features)
    codes = torch.randint(0, head.out_features, (3, 2))
    hard_loss, hard_accuracy = head(hidden, codes, 0.0)
    soft_loss, soft_accuracy = head(hidden, torch.nn.functional.one_hot(codes, head.out_features).float(), 0.0)
    torch.testing.assert_close(soft_loss, hard_loss)
    torch.testing.assert_close(soft_accuracy, hard_accuracy)


@pytest.mark.parametrize("overrides, key", [
    (["method.soft_target_temperature=1.0", "method.label_smoothing=0.1"], "method.label_smoothing"),
    (["method.soft_target_temperature=0"], "method.soft_target_temperature"),
])
def test_bad_soft_target_settings_are_one_line_errors(overrides: list[str], key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        load_config(["method=peco", *overrides])


def test_trainer_activation_checkpointing_reaches_the_backbone_in_the_plain_strategy(tokenizer_export: Path) -> None:
    cfg = load_config(["method=peco", *TINY, f"method.tokenizer.checkpoint={tokenizer_export}",
                       "trainer.activation_checkpointing=true"])
    strategy = TorchStrategy(cfg, Peco(cfg), torch.device("cpu"))
    assert strategy.method.backbone.grad_checkpointing
    x = images()
    masks = torch.stack([torch.randperm(4) < 2 for _ in range(4)]).view(4, 2, 2)
    result = strategy.step([{"image": x, "tokenizer_view": tokenizer_view(cfg, x), "mask": masks}], 0)
    assert math.isfinite(result.loss)


def test_activation_checkpointing_without_a_hook_is_refused() -> None:
    cfg = load_config(["method=peco_tokenizer", *TINY, "trainer.activation_checkpointing=true"])
    with pytest.raises(ValueError, match="set_grad_checkpointing"):
        TorchStrategy(cfg, PecoTokenizer(cfg), torch.device("cpu"))


def test_stage2_takes_the_tokenizer_runs_folder_or_its_export_folder(tokenizer_export: Path, tmp_path: Path) -> None:
    """`method.tokenizer.checkpoint=runs/peco/tokenizer` (the folder stage 1 wrote) works as its file does."""
    run = tmp_path / "tokenizer"
    (run / "export").mkdir(parents=True)
    (run / "export" / "method.safetensors").write_bytes(tokenizer_export.read_bytes())
    expected = Peco(load_config(["method=peco", *TINY, f"method.tokenizer.checkpoint={tokenizer_export}"]))
    for folder in (run, run / "export"):
        method = Peco(load_config(["method=peco", *TINY, f"method.tokenizer.checkpoint={folder}"]))
        for (name, value), (_, wanted) in zip(method.tokenizer.state_dict().items(),
                                              expected.tokenizer.state_dict().items()):
            assert torch.equal(value, wanted), name
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="is a folder; give the weights file in it"):
        Peco(load_config(["method=peco", *TINY, f"method.tokenizer.checkpoint={tmp_path / 'empty'}"]))


def test_stage2_rejects_a_tokenizer_of_another_grid(tokenizer_export: Path) -> None:
    with pytest.raises(ConfigError, match="method.tokenizer.image_size': 64; .*patch grid"):  # when composed
        load_config(["method=peco", *TINY, f"method.tokenizer.checkpoint={tokenizer_export}",
                     "method.tokenizer.image_size=64"])


def test_stage2_names_the_mismatching_keys_of_a_wrong_tokenizer(tokenizer_export: Path) -> None:
    cfg = load_config(["method=peco", *TINY, f"method.tokenizer.checkpoint={tokenizer_export}",
                       "method.tokenizer.quantizer.num_codes=32"])
    with pytest.raises(ValueError, match=r"shape mismatch: .*quantizer.codebook \(16, 8\) vs \(32, 8\)"):
        Peco(cfg)


def test_mim_transform_gives_two_views_of_one_crop_and_an_exact_mask() -> None:
    cfg = load_config(["method=peco", "model.img_size=64", "method.mask.num_masked=6",  # f = 16: equal view sizes
                       "method.tokenizer.autoencoder.channel_mult=[1,1,2,2,4]", "method.tokenizer.image_size=64"])
    transform = Peco.make_transform(cfg)
    photo = Image.fromarray((torch.rand(120, 160, 3) * 255).to(torch.uint8).numpy())
    sample = transform(photo, torch.Generator().manual_seed(3))
    assert sample["image"].shape == (3, 64, 64) and sample["tokenizer_view"].shape == (3, 64, 64)
    assert sample["mask"].shape == (4, 4) and int(sample["mask"].sum()) == 6
    assert sample["tokenizer_view"].min() >= -1 and sample["tokenizer_view"].max() <= 1
    # same crop: undo the two normalisations and compare
    mean, std = torch.tensor(cfg.method.view.mean)[:, None, None], torch.tensor(cfg.method.view.std)[:, None, None]
    assert torch.allclose(sample["image"] * std + mean, (sample["tokenizer_view"] + 1) / 2, atol=1e-5)
    again = transform(photo, torch.Generator().manual_seed(3))
    assert all(torch.equal(sample[k], again[k]) for k in sample)
