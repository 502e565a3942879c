"""A tiny method that lives outside the package, loaded as a plugin: proves the core knows no method.

It learns to reconstruct 8x8-pooled images through a small bottleneck with an MSE loss.
"""
import dataclasses
import time

import torch
import torch.nn.functional as F
from torch import nn

from ssl_zoo import BACKBONES, METHODS, Method, StepOutput

POOLED_DIM = 3 * 8 * 8


@dataclasses.dataclass
class ToyBackboneConfig:
    name: str = "toy_mlp"
    hidden: int = 32
    dropout: float = 0.1


@BACKBONES.register("toy_mlp", schema=ToyBackboneConfig)
def build_toy_mlp(section) -> nn.Module:
    return nn.Sequential(nn.Linear(POOLED_DIM, section.hidden), nn.GELU(), nn.Dropout(section.dropout))


@dataclasses.dataclass
class ToyConfig:
    name: str = "toy_autoencoder"
    step_delay_s: float = 0.0  # slows steps so a test can kill the run between two checkpoints
    save_delay_s: float = 0.0  # slows state_dict (called while a checkpoint is written) so a test can kill it then
    nan_from_step: int = -1  # fault injection: the loss is NaN from this step on (-1: never) ...
    nan_steps: int = 0  # ... for this many steps


@METHODS.register("toy_autoencoder", schema=ToyConfig)
class ToyAutoencoder(Method):
    def __init__(self, cfg):
        super().__init__()
        self.encoder = BACKBONES.build(cfg.model)
        self.decoder = nn.Linear(cfg.model.hidden, POOLED_DIM)
        self.step_delay_s = cfg.method.step_delay_s
        self.save_delay_s = cfg.method.save_delay_s
        self.nan_steps = range(cfg.method.nan_from_step, cfg.method.nan_from_step + cfg.method.nan_steps)

    def state_dict(self, *args, **kwargs):
        time.sleep(self.save_delay_s)
        return super().state_dict(*args, **kwargs)

    def _pooled(self, images: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(images, 8).flatten(1)

    def training_step(self, batch, step):
        time.sleep(self.step_delay_s)
        target = self._pooled(batch["image"])
        loss = F.mse_loss(self.decoder(self.encoder(target)), target)
        if step in self.nan_steps:
            loss = loss * float("nan")
        return StepOutput(loss, {"target_std": target.std().detach()})

    def extract_features(self, images):
        return self.encoder(self._pooled(images))
