"""The held-out tokenizer measurement: its floors are what they claim to be, and a tokenizer whose codes
carry nothing scores exactly its shuffled-codes floor."""
from __future__ import annotations

import torch

from ssl_zoo.config import load_config
from ssl_zoo_peco.tokenizer_eval import derangement, heldout_report, psnr, thumbnail
from ssl_zoo_peco.tokenizer_method import PecoTokenizer
from tests.peco.test_methods import TINY


def test_derangement_moves_every_index() -> None:
    for n in (2, 3, 17):
        source = derangement(n, seed=n)
        assert sorted(source.tolist()) == list(range(n))
        assert (source != torch.arange(n)).all()


def test_psnr_and_thumbnail_floors() -> None:
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    assert psnr(x, x).min() > 90
    assert torch.allclose(psnr(x * 0 + 1, x * 0 - 1), torch.zeros(2))  # black vs white on [0, 1]: 0 dB
    flat = torch.full((1, 3, 16, 16), 0.3)
    assert torch.allclose(thumbnail(flat, 4), flat)
    blocks = torch.rand(2, 3, 4, 4).repeat_interleave(4, 2).repeat_interleave(4, 3)  # one colour per token
    assert thumbnail(blocks, 4).shape == blocks.shape
    # it keeps each token's colour (blurred only across token edges): far closer than the constant floor
    assert psnr(thumbnail(blocks, 4), blocks).mean() > psnr(blocks.mean(dim=(0, 2, 3), keepdim=True), blocks).mean() + 3


def test_codes_that_carry_nothing_score_their_shuffled_floor() -> None:
    cfg = load_config(["method=peco_tokenizer", *TINY, "method.tokenizer_loss.gan.enabled=false"])
    method = PecoTokenizer(cfg)
    tokenizer = method.tokenizer
    images = (torch.rand(6, 3, 32, 32) * 255).to(torch.uint8)
    report, recon = heldout_report(tokenizer, method.perceptual, images, batch_size=4)
    assert recon.shape == (6, 3, 32, 32)
    assert set(report) == {"heldout_psnr", "heldout_psnr_thumbnail", "heldout_psnr_shuffled",
                           "heldout_psnr_constant", "heldout_perceptual", "heldout_perceptual_thumbnail",
                           "heldout_codes_used"}
    # random codebook: images use different codes, so shuffling changes the decoded pixels
    assert report["heldout_psnr"] != report["heldout_psnr_shuffled"]
    with torch.no_grad():  # a collapsed codebook (every code the same vector): nothing left to shuffle
        tokenizer.quantizer.codebook.copy_(tokenizer.quantizer.codebook[:1].expand_as(tokenizer.quantizer.codebook))
    collapsed, _ = heldout_report(tokenizer, method.perceptual, images, batch_size=4)
    assert collapsed["heldout_psnr"] == collapsed["heldout_psnr_shuffled"]
    assert tokenizer.training  # the measurement restores the training mode


def test_stage1_evaluates_on_heldout_crops_and_draws_them(tmp_path) -> None:
    cfg = load_config(["method=peco_tokenizer", *TINY, "method.tokenizer_eval.crops_per_photo=1"])
    method = PecoTokenizer(cfg)
    report = method.evaluate()
    assert report["heldout_psnr_constant"] < report["heldout_psnr_thumbnail"]
    paths = method.visualize({"image": torch.zeros(4, 3, 32, 32)}, tmp_path)
    inputs, _ = method._heldout_recon
    assert len(inputs) == 9  # one crop per bundled photo, drawn instead of the training batch
    assert paths[0].is_file()
