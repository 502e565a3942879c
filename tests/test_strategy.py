"""The strategy seam: one step skeleton over backend hooks, and `full_state_dict` without side effects."""
from __future__ import annotations

import math
from typing import Any

import torch
from omegaconf import OmegaConf

from ssl_zoo.config import load_config
from ssl_zoo.engine.deepspeed_strategy import DeepSpeedStrategy
from ssl_zoo.engine.strategy import Strategy, StepSkeleton, TorchStrategy
from ssl_zoo.method import StepOutput
from ssl_zoo.registry import METHODS
from tests.conftest import TOY


class RecordingBackend(StepSkeleton):
    """A backend whose hooks record what the skeleton hands them; each micro-batch's loss is its `loss` entry."""

    def __init__(self, grad_clip: float) -> None:
        self.trainer = OmegaConf.create({"grad_clip": grad_clip})
        self.method = torch.nn.Linear(1, 1)
        self.calls: list[Any] = []

    def _current_lr(self) -> float:
        return 0.5

    def _forward_backward(self, batch: dict[str, Any], step: int, last: bool, count: int) -> StepOutput:
        self.calls.append(("micro", last, count))
        return StepOutput(torch.tensor(batch["loss"]), {"acc": batch["acc"]})

    def _optimizer_step(self, finite_loss: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.calls.append(("step", bool(finite_loss)))
        return torch.tensor(2.0), ~finite_loss


def test_the_skeleton_means_metrics_over_micro_batches_and_checks_the_loss_once() -> None:
    backend = RecordingBackend(grad_clip=1.0)
    result = backend.step([{"loss": 1.0, "acc": 0.0}, {"loss": 3.0, "acc": 1.0}], step=0)
    assert backend.calls == [("micro", False, 2), ("micro", True, 2), ("step", True)]
    assert result.loss.item() == 2.0 and result.metrics["acc"].item() == 0.5
    assert result.metrics["lr"] == 0.5 and result.metrics["grad_norm"].item() == 2.0 and not result.skipped


def test_a_non_finite_loss_reaches_the_backend_as_a_bad_step_and_no_clip_logs_no_norm() -> None:
    backend = RecordingBackend(grad_clip=0.0)
    result = backend.step([{"loss": math.nan, "acc": 0.0}], step=0)
    assert backend.calls[-1] == ("step", False) and result.skipped
    assert "grad_norm" not in result.metrics


def test_both_backends_follow_the_protocol_the_loop_is_written_against() -> None:
    members = [m for m in Strategy.__dict__ if not m.startswith("_")] + list(Strategy.__annotations__)
    for cls in (TorchStrategy, DeepSpeedStrategy):
        assert issubclass(cls, StepSkeleton)
        assert all(m in dir(cls) or m in cls.__init__.__code__.co_names for m in members), cls


def test_full_state_dict_returns_the_weights_and_leaves_the_method_in_place() -> None:
    cfg = load_config([*TOY, "trainer.device=cpu"])
    method = METHODS.get(cfg.method.name)(cfg)
    strategy = TorchStrategy(cfg, method, torch.device("cpu"))
    weights = strategy.full_state_dict()
    assert strategy.method is method and not strategy.shards_parameters
    assert weights.keys() == method.state_dict().keys()
    assert all(torch.equal(weights[k], v) for k, v in method.state_dict().items())
