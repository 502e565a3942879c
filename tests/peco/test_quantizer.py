"""Vector quantiser: lookup against brute force, straight-through gradients, EMA update, k-means init,
dead-code restart and usage statistics."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ssl_zoo_peco.config import QuantizerConfig
from ssl_zoo_peco.quantizer import VectorQuantizer


def make(**kwargs) -> VectorQuantizer:
    torch.manual_seed(0)
    return VectorQuantizer(QuantizerConfig(**{"num_codes": 64, "dim": 8, **kwargs}), kernel_impl="torch")


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_nearest_matches_brute_force(metric: str) -> None:
    vq = make(metric=metric)
    z = torch.randn(500, 8) * 3
    if metric == "l2":
        expected = torch.cdist(z, vq.codebook.detach()).argmin(1)
    else:
        expected = (F.normalize(z, dim=1) @ F.normalize(vq.codebook.detach(), dim=1).T).argmax(1)
    assert torch.equal(vq.nearest(z), expected)


def test_encode_maps_feature_maps_to_a_token_grid() -> None:
    vq = make()
    z = torch.randn(2, 8, 3, 5)
    indices = vq.encode(z)
    assert indices.shape == (2, 3, 5) and indices.dtype == torch.int64
    assert torch.equal(indices[1, 2, 4], vq.nearest(z[1, :, 2, 4][None])[0])


def test_straight_through_output_is_the_code_and_passes_gradients_unchanged() -> None:
    vq = make(codebook_update="gradient")
    z = torch.randn(2, 8, 4, 4, requires_grad=True)
    out = vq(z)
    flat = out.z_q.permute(0, 2, 3, 1).reshape(-1, 8)
    assert torch.allclose(flat, vq.codebook[out.indices.flatten()].detach())
    upstream = torch.randn_like(out.z_q)
    (out.z_q * upstream).sum().backward()
    assert torch.allclose(z.grad, upstream)


def test_gradient_mode_trains_the_codebook_and_ema_mode_does_not() -> None:
    z = torch.randn(2, 8, 4, 4)
    grad_vq = make(codebook_update="gradient")
    grad_vq(z).loss.backward()
    assert grad_vq.codebook.grad is not None and grad_vq.codebook.grad.abs().sum() > 0
    ema_vq = make(codebook_update="ema")
    assert not ema_vq.codebook.requires_grad


def test_ema_update_moves_codes_towards_their_assigned_vectors() -> None:
    decay, eps = 0.9, 1e-5
    vq = make(codebook_update="ema", ema_decay=decay, ema_eps=eps, restart_dead=False)
    before = vq.codebook.detach().clone()
    z = torch.randn(1, 8, 10, 10)
    flat = z.permute(0, 2, 3, 1).reshape(-1, 8)
    indices = vq.nearest(flat)
    vq.train()
    vq(z)
    counts = torch.bincount(indices, minlength=64).float()
    sums = torch.zeros(64, 8).index_add_(0, indices, flat)
    ema_count = decay * torch.ones(64) + (1 - decay) * counts
    ema_sum = decay * before + (1 - decay) * sums
    total = ema_count.sum()
    smoothed = (ema_count + eps) / (total + 64 * eps) * total
    assert torch.allclose(vq.codebook.detach(), ema_sum / smoothed[:, None], atol=1e-5)
    assert torch.allclose(vq.ema_count, ema_count)


def test_eval_mode_changes_nothing() -> None:
    vq = make()
    state = {k: v.clone() for k, v in vq.state_dict().items()}
    vq.eval()
    vq(torch.randn(2, 8, 4, 4))
    assert all(torch.equal(state[k], v) for k, v in vq.state_dict().items())


def test_dead_codes_are_restarted_on_encoder_outputs() -> None:
    vq = make(dead_after_steps=3, codebook_update="ema")
    vq.train()
    z = torch.randn(1, 8, 2, 2)  # 4 vectors: at most 4 of 64 codes can be hit per step
    flat = z.permute(0, 2, 3, 1).reshape(-1, 8)
    for _ in range(3):  # a training step: restarts, then the lookup
        assert vq.restart_dead(z) == 0  # no code has been unused for more than 3 steps yet
        vq(z)
    hit_before = vq.last_hit >= 0
    assert hit_before.sum() <= 4
    moved = vq.restart_dead(z)  # step 3: codes unused in steps 0, 1, 2 move
    restarted = vq.last_restart == 3
    assert moved == int(restarted.sum()) == int((~hit_before).sum()) >= 64 - 4
    # every restarted code now sits exactly on one of the batch's vectors, EMA statistics reset with it
    codes = vq.codebook.detach()[restarted]
    assert (codes[:, None] - flat[None]).abs().amax(-1).min(1).values.max() < 1e-6
    assert torch.equal(vq.ema_sum[restarted], codes) and torch.all(vq.ema_count[restarted] == 1)
    vq(z)
    assert vq.restart_dead(z) == 0  # a restart counts as a use: nothing moves again at once


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_gradient_codebook_trains_through_restarts(metric: str) -> None:
    """A gradient codebook is saved for backward by the lookup (cosine: by the normalisation): restarts
    written after the lookup broke that step's backward (issue 14). The tokenizer's training step restarts
    codes before the lookup, so training goes on."""
    from ssl_zoo_peco.config import AutoencoderConfig, TokenizerConfig
    from ssl_zoo_peco.vqgan import VQTokenizer

    torch.manual_seed(0)
    cfg = TokenizerConfig(autoencoder=AutoencoderConfig(base_width=8, channel_mult=[1, 2], z_channels=8),
                          quantizer=QuantizerConfig(num_codes=64, dim=8, metric=metric, codebook_update="gradient",
                                                    dead_after_steps=1))
    tokenizer = VQTokenizer(cfg, image_size=8, kernel_impl="torch").train()
    optimizer = torch.optim.Adam(tokenizer.parameters(), lr=1e-3)
    images = torch.rand(2, 3, 8, 8) * 2 - 1
    for _ in range(4):
        recon, quantized = tokenizer(images)
        ((recon - images).abs().mean() + quantized.loss).backward()
        optimizer.step()
        optimizer.zero_grad()
    quantizer = tokenizer.quantizer
    assert (quantizer.last_restart >= 0).sum() > 0 and torch.isfinite(quantizer.codebook).all()


def test_kmeans_init_beats_a_random_codebook() -> None:
    vq = make(num_codes=16, kmeans_iters=10)
    centres = torch.randn(16, 8) * 5
    z = (centres[torch.randint(0, 16, (800,))] + 0.1 * torch.randn(800, 8)).T.reshape(1, 8, 40, 20)
    flat = z.permute(0, 2, 3, 1).reshape(-1, 8)

    def distortion() -> float:
        return float((flat - vq.codebook.detach()[vq.nearest(flat)]).pow(2).sum(1).mean())

    random_distortion = distortion()
    vq.kmeans_init(z)
    assert bool(vq.initialised)
    assert distortion() < 0.3 * random_distortion
    if vq.cfg.codebook_update == "ema":
        assert torch.allclose(vq.ema_sum, vq.codebook.detach()) and torch.all(vq.ema_count == 1)


def test_kmeans_init_with_fewer_vectors_than_codes_gives_distinct_codes() -> None:
    vq = make(num_codes=64)
    vq.kmeans_init(torch.randn(1, 8, 2, 5))
    assert torch.unique(vq.codebook.detach(), dim=0).shape[0] == 64


def test_usage_and_perplexity() -> None:
    vq = make(num_codes=4, dim=2, restart_dead=False, usage_window_steps=5)
    vq.codebook.data = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])
    vq.train()
    z = torch.tensor([[1.0, 0.1], [0.1, 1.0]]).T.reshape(1, 2, 1, 2)  # codes 0 and 1, once each
    out = vq(z)
    assert vq.usage() == pytest.approx(0.5)
    assert float(out.perplexity) == pytest.approx(2.0, rel=1e-4)
