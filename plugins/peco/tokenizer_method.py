"""Stage 1, `method=peco_tokenizer`: train the perceptual codebook (a VQGAN with a perceptual loss).

Loss = L1 pixel + perceptual + codebook/commitment, plus after `gan.start_step` the VQGAN adversarial pair:
the generator's hinge term, weighted adaptively by the ratio of gradient norms of the reconstruction and
GAN losses at the decoder's last layer, and the discriminator's hinge loss. The trainer has ONE optimiser,
so each adversarial term is built to reach only its own side: the generator's term goes through the
discriminator by its input gradient alone (`_generator_term`), the discriminator's sees detached
reconstructions. A single backward then trains both, each in its own parameter group.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch
from omegaconf import DictConfig
from torchvision.utils import save_image

from ssl_zoo.method import Method, StepOutput
from ssl_zoo.registry import METHODS

from .config import PecoTokenizerConfig, tokenizer_image_size
from .discriminator import PatchDiscriminator, hinge_d_loss, hinge_g_loss
from .perceptual import PerceptualLoss
from .tokenizer_eval import heldout_report
from .transforms import TokenizerTransform
from .vqgan import VQTokenizer


@METHODS.register("peco_tokenizer", schema=PecoTokenizerConfig)
class PecoTokenizer(Method):
    def __init__(self, cfg: DictConfig) -> None:
        super().__init__()
        section = cfg.method
        self.losses = section.tokenizer_loss
        image_size = tokenizer_image_size(cfg)
        self.tokenizer = VQTokenizer(section.tokenizer, image_size, section.kernel_impl)
        self.perceptual = PerceptualLoss(self.losses.perceptual, image_size)
        gan = self.losses.gan
        self.discriminator = PatchDiscriminator(gan.num_layers, gan.width) if gan.enabled else None
        self.memory_format = torch.channels_last if section.channels_last else torch.contiguous_format
        self.to(memory_format=self.memory_format)
        self.last_metrics: dict[str, torch.Tensor] = {}  # the last step's, read by `summary`
        self.eval_cfg = section.tokenizer_eval
        self._heldout_recon: tuple[torch.Tensor, torch.Tensor] | None = None  # (inputs, reconstructions)

    @classmethod
    def make_transform(cls, cfg: DictConfig) -> Callable[[Any, torch.Generator], dict[str, torch.Tensor]]:
        return TokenizerTransform(cfg.method.view, tokenizer_image_size(cfg))

    def param_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        groups = [{"params": [p for p in self.tokenizer.parameters() if p.requires_grad], "weight_decay": weight_decay}]
        if self.discriminator is not None:
            groups.append({"params": list(self.discriminator.parameters()), "weight_decay": weight_decay,
                           "lr_scale": self.losses.gan.lr_scale})
        return groups

    @torch.no_grad()
    def on_train_start(self, batch: dict[str, torch.Tensor]) -> None:
        quantizer = self.tokenizer.quantizer
        if quantizer.cfg.kmeans_init and not bool(quantizer.initialised):
            quantizer.kmeans_init(self.tokenizer.encode_latent(batch["image"].contiguous(memory_format=self.memory_format)))

    def _adaptive_weight(self, rec_loss: torch.Tensor, g_loss: torch.Tensor) -> torch.Tensor:
        """VQGAN's balance: ||d rec / d W_last|| / ||d gan / d W_last||, clamped, times `gan.weight`."""
        last = self.tokenizer.decoder.last_layer.weight
        rec_grad = torch.autograd.grad(rec_loss, last, retain_graph=True)[0]
        g_grad = torch.autograd.grad(g_loss, last, retain_graph=True)[0]
        weight = rec_grad.norm() / (g_grad.norm() + 1e-4)
        return weight.clamp(0.0, self.losses.gan.max_adaptive_weight).detach() * self.losses.gan.weight

    def _generator_term(self, recon: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The generator's hinge loss (detached) and a surrogate with its gradient for the reconstruction only.

        The gradient d g / d recon goes through the discriminator's own forward and `autograd.grad` with
        respect to its input alone, so the discriminator's parameters get none of it, under every strategy:
        calling the discriminator with substituted (detached) parameters instead would bypass the hooks by
        which ZeRO-3 gathers a module's partitioned parameters."""
        fake = recon.detach().requires_grad_(True)
        g_loss = hinge_g_loss(self.discriminator(fake))
        (grad,) = torch.autograd.grad(g_loss, fake)
        return g_loss.detach(), (recon * grad).sum()

    def training_step(self, batch: dict[str, torch.Tensor], step: int) -> StepOutput:
        images = batch["image"].contiguous(memory_format=self.memory_format)
        recon, quantized = self.tokenizer(images)
        pixel = (recon.float() - images.float()).abs().mean()
        perceptual = self.perceptual(recon, images)
        rec_loss = self.losses.pixel_weight * pixel + self.losses.perceptual_weight * perceptual
        loss = rec_loss + self.losses.codebook_weight * quantized.loss
        metrics = {  # tensors: read at log steps only
            "loss_pixel": pixel.detach(),
            "loss_perceptual": perceptual.detach(),
            "loss_codebook": quantized.loss.detach(),
            "codebook_usage": self.tokenizer.quantizer.usage_share(),
            "perplexity": quantized.perplexity.detach(),
        }
        gan = self.losses.gan
        if self.discriminator is not None and step >= gan.start_step:
            g_loss, g_surrogate = self._generator_term(recon)
            d_weight = self._adaptive_weight(rec_loss, g_surrogate)
            d_loss = hinge_d_loss(self.discriminator(images), self.discriminator(recon.detach()))
            loss = loss + d_weight * (g_surrogate - g_surrogate.detach() + g_loss) + d_loss  # value: g_loss
            metrics.update(loss_g=g_loss.detach(), loss_d=d_loss.detach(), gan_weight=d_weight.detach())
        self.last_metrics = {"loss": loss.detach(), **metrics}
        return StepOutput(loss, metrics)

    def extract_features(self, images: torch.Tensor) -> torch.Tensor:
        """Mean-pooled pre-quantisation latents (the tokenizer has no ViT backbone)."""
        return self.tokenizer.encode_latent(images).mean(dim=(2, 3))

    def backbone_state_dict(self) -> dict[str, torch.Tensor]:
        """The tokenizer alone (what stage 2 loads): no discriminator, no frozen perceptual network."""
        return {f"tokenizer.{k}": v for k, v in self.tokenizer.state_dict().items()}

    def heldout_images(self) -> torch.Tensor:
        """crop_id's test crops at the tokenizer's size (uint8): pixels no pretraining run ever sees."""
        from ssl_zoo.data.crop_id import crop_id_split

        images, _ = crop_id_split("test", self.tokenizer.image_size, self.eval_cfg.crops_per_photo, self.eval_cfg.seed)
        return images

    def evaluate(self) -> dict[str, float]:
        """Held-out PSNR and perceptual distance with their floors (see tokenizer_eval.py)."""
        if self.eval_cfg.crops_per_photo < 1:
            return {}
        device = next(self.tokenizer.parameters()).device
        images = self.heldout_images().to(device)
        report, recon = heldout_report(self.tokenizer, self.perceptual, images, self.eval_cfg.batch_size,
                                       self.memory_format)
        self._heldout_recon = (images, recon)
        return report

    @torch.no_grad()
    def visualize(self, batch: dict[str, torch.Tensor], out_dir: Path) -> list[Path]:
        """Inputs and their reconstructions, in pairs: held-out crops (one per photo) once `evaluate` has
        run, the given training batch otherwise."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        if self._heldout_recon is not None:
            images, recon = self._heldout_recon
            per_photo = max(self.eval_cfg.crops_per_photo, 1)
            picks = torch.arange(0, len(images), per_photo)  # the first crop of each photo
            images, recon = images[picks].float() / 127.5 - 1, recon[picks]
        else:
            was_training = self.training
            self.eval()
            images = batch["image"][:9]
            recon, _ = self.tokenizer(images.contiguous(memory_format=self.memory_format))
            self.train(was_training)
        pairs = torch.stack([images.float(), recon.float()], dim=1).flatten(0, 1).cpu()
        grid_path = out_dir / "reconstructions.png"
        save_image((pairs.clamp(-1, 1) + 1) / 2, grid_path, nrow=6, padding=2)  # input, reconstruction, ...
        return [grid_path, self._usage_histogram(out_dir / "codebook_usage.png")]

    def _usage_histogram(self, path: Path) -> Path:
        import matplotlib  # late: only the end of a run draws

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        quantizer = self.tokenizer.quantizer
        counts = quantizer.recent_counts.float().cpu().sort(descending=True).values
        fig, ax = plt.subplots(figsize=(7, 3))
        ax.bar(range(len(counts)), counts.numpy(), width=1.0)
        ax.set_yscale("symlog")
        ax.set_xlabel("code (sorted by use)")
        ax.set_ylabel("recent assignments")
        ax.set_title(f"codebook usage {quantizer.usage():.0%} of {len(counts)} codes, "
                     f"perplexity {self._window_perplexity():.0f}")
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return path

    def _window_perplexity(self) -> float:
        counts = self.tokenizer.quantizer.recent_counts.float()
        probs = counts / counts.sum().clamp_min(1e-12)
        return float(torch.exp(-(probs * probs.clamp_min(1e-12).log()).sum()))

    def summary(self) -> dict[str, Any]:
        quantizer = self.tokenizer.quantizer
        return {
            "codebook_size": quantizer.cfg.num_codes,
            "codebook_usage": round(quantizer.usage(), 4),
            "codebook_perplexity": round(self._window_perplexity(), 1),
            **{f"final_{k}": round(float(v), 4) for k, v in self.last_metrics.items() if k.startswith("loss")},
        }
