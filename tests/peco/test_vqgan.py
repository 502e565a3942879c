"""The tokenizer's colour path: encoder and decoder joined through it alone are the token-grid thumbnail."""
from __future__ import annotations

import torch

from ssl_zoo_peco.config import AutoencoderConfig
from ssl_zoo_peco.tokenizer_eval import thumbnail
from ssl_zoo_peco.vqgan import Decoder, Encoder


def test_colour_path_alone_is_the_thumbnail() -> None:
    cfg = AutoencoderConfig(base_width=8, channel_mult=[1, 2, 2], z_channels=8, colour_skip=True)
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


def test_without_colour_path_the_autoencoder_is_vqgans() -> None:
    cfg = AutoencoderConfig(base_width=8, channel_mult=[1, 2], z_channels=8, colour_skip=False)
    encoder, decoder = Encoder(cfg), Decoder(cfg)
    assert encoder.colour is None and decoder.colour is None
    assert not any("colour" in k for k in [*encoder.state_dict(), *decoder.state_dict()])
