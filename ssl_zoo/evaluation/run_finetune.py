"""`protocol=finetune`: the fine-tuning run (through the configured launcher) and its test-split score.

The run lives in `<eval output_dir>/finetune` with its own config, checkpoints and metrics, so rerunning the
same eval command resumes it; a run directory that holds a fine-tune of other weights is refused, not resumed.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from ssl_zoo import config as config_lib
from ssl_zoo.data.labelled import LabelledSplit
from ssl_zoo.errors import UserError
from ssl_zoo.evaluation.backbone import Backbone
from ssl_zoo.evaluation.features import compute_features
from ssl_zoo.evaluation.protocols import top_k_accuracies
from ssl_zoo.registry import LAUNCHERS


def training_config(cfg: DictConfig, backbone: Backbone, num_classes: int, run_dir: Path) -> DictConfig:
    """The fine-tuning run's config: method=finetune, model=timm (the backbone), the eval's data, trainer and
    strategy."""
    spec = backbone.spec
    protocol = OmegaConf.to_container(cfg.protocol, resolve=True)
    if protocol["num_classes"] and protocol["num_classes"] != num_classes:
        raise UserError(f"protocol.num_classes={protocol['num_classes']} does not match data '{cfg.data.name}', "
                         f"which has {num_classes} classes; leave it 0 to take the dataset's")
    data = OmegaConf.to_container(cfg.data, resolve=True)
    data["image_size"] = data.get("image_size") or spec.input_size[-1]
    container = {
        "output_dir": str(run_dir), "seed": cfg.seed, "plugins": list(cfg.plugins),
        "method": {**protocol, "num_classes": num_classes},
        "model": {"name": "timm", "architecture": spec.architecture, "model_args": dict(spec.model_args),
                  "input_size": list(spec.input_size), "mean": list(spec.mean), "std": list(spec.std),
                  "weights": str(backbone.weights) if backbone.weights else None},
        "data": data,
        "trainer": OmegaConf.to_container(cfg.trainer, resolve=True),
        "strategy": OmegaConf.to_container(cfg.strategy, resolve=True),
        "launcher": OmegaConf.to_container(cfg.launcher, resolve=True),
    }
    return config_lib.from_container(container)


def _refuse_other_weights(run_dir: Path, train_cfg: DictConfig) -> None:
    previous = run_dir / "config.yaml"
    if previous.is_file():
        before = OmegaConf.load(previous).model.get("weights")
        if before != train_cfg.model.weights:
            raise UserError(f"'{run_dir}' holds a fine-tune of other weights ({before or 'random init'}); "
                             "set output_dir=... to fine-tune these into a new run directory")


def finetune(cfg: DictConfig, backbone: Backbone, train: LabelledSplit, test: LabelledSplit,
             run_dir: Path) -> dict[str, Any]:
    from ssl_zoo.engine.checkpoint import load_weights
    from ssl_zoo.evaluation.finetune import build_timm
    from ssl_zoo.train import pick_device

    train_cfg = training_config(cfg, backbone, train.num_classes, run_dir)
    _refuse_other_weights(run_dir, train_cfg)
    summary = LAUNCHERS.build(train_cfg.launcher, train_cfg) or {}
    state = load_weights(run_dir / "export" / "method.safetensors")
    model = build_timm(OmegaConf.merge(train_cfg.model, {"weights": None}), train.num_classes)
    model.load_state_dict({k.removeprefix("model."): v for k, v in state.items()})
    device = pick_device(cfg.trainer.device)
    model.to(device).eval()
    spec = backbone.spec
    logits, rate = compute_features(model, test, spec.mean, spec.std, cfg.protocol.eval_batch_size, device,
                                    progress=cfg.trainer.progress, desc="test")
    result = top_k_accuracies(logits["pooled"], test.labels)
    return {**result, "test_images_per_s": round(rate, 1), "steps": summary.get("steps"),
            "final_loss": summary.get("final_loss"), "train_wall_time_s": summary.get("wall_time_s"),
            "run_dir": str(run_dir)}
