"""The tokenizer's linear paths: joined through the colour path alone, encoder and decoder are the token-grid
thumbnail; through the patch path alone, they can pass every pixel."""
from __future__ import annotations

import torch

from ssl_zoo_peco.config import AutoencoderConfig
from ssl_zoo_peco.tokenizer_eval import thumbnail
from ssl_zoo_peco.vqgan import Decoder, Encoder


def test_colour_path_alone_is_the_thumbnail() -> None:
    cfg = AutoencoderConfig(base_width=8, channel_mult=[1, 2, 2], z_channels=8, colour_skip=True, patch_skip=False)
    encoder, decoder = Encoder(cfg), Decoder(cfg)
    with torch.no_grad():  # silence the conv paths; the colour convs copy RGB into z[:3] and back
        for conv in (encoder.layers[-1], decoder.last_layer):
            conv.weight.zero_()
            conv.bias.zero_()
        encoder.colour.weight.zero_()
        encoder.colour.bias.zero_()
        encoder.colour.weight[:3, :, 0, 0] = torch.eye(3)
        decoder.colour.weight.zero_()
        decoder.colour.bias.zero_()
        decoder.colour.weight[:, :3, 0, 0] = torch.eye(3)
        x = torch.rand(2, 3, 16, 16) * 2 - 1
        assert torch.allclose(decoder(encoder(x)), thumbnail(x, 4), atol=1e-6)


def test_patch_path_alone_can_carry_every_pixel() -> None:
    cfg = AutoencoderConfig(base_width=8, channel_mult=[1, 2], z_channels=12, colour_skip=False, patch_skip=True)
    encoder, decoder = Encoder(cfg), Decoder(cfg)  # factor 2: 3 x 2 x 2 = 12 pixel values per token
    with torch.no_grad():  # silence the conv paths; the patch convs copy each token's pixels into z and back
        for conv in (encoder.layers[-1], decoder.last_layer):
            conv.weight.zero_()
            conv.bias.zero_()
        encoder.patch.weight.copy_(torch.eye(12)[:, :, None, None])
        decoder.patch.weight.zero_()
        decoder.patch.weight[:, :, 1, 1] = torch.eye(12)  # the 3x3 conv's centre tap: the token's own latent
        for patch in (encoder.patch, decoder.patch):
            patch.bias.zero_()
        x = torch.rand(2, 3, 16, 16) * 2 - 1
        assert torch.allclose(decoder(encoder(x)), x, atol=1e-6)


def test_without_linear_paths_the_autoencoder_is_vqgans() -> None:
    cfg = AutoencoderConfig(base_width=8, channel_mult=[1, 2], z_channels=8, colour_skip=False, patch_skip=False)
    encoder, decoder = Encoder(cfg), Decoder(cfg)
    assert encoder.colour is None and decoder.colour is None and encoder.patch is None and decoder.patch is None
    assert not any("colour" in k or "patch" in k for k in [*encoder.state_dict(), *decoder.state_dict()])
