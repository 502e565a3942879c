"""Which model a checkpoint argument names, as a timm model: a run, one stage of it, an export, or random init.

Accepted forms of `checkpoint`:
- a stage's run directory (holds `config.yaml`): its method's `timm_spec(cfg)` gives the architecture and
  `export/backbone.safetensors` the weights;
- a multi-stage run directory (holds `summary.json` listing its stages): its last stage;
- a run's `export/` folder or its `backbone.safetensors` file;
- a timm folder written by `python -m ssl_zoo.export RUN --format timm` (`config.json` + `model.safetensors`);
- `random`: the architecture of `architecture=` (any of the above) at random initialisation.
Every check (path, weights present, weights fitting the architecture) runs here, before any work.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Optional

import torch
from omegaconf import OmegaConf

from ssl_zoo.errors import UserError
from ssl_zoo.method import TimmSpec

RANDOM = "random"


@dataclasses.dataclass
class Backbone:
    """A timm architecture and, unless randomly initialised, the file of its weights."""

    spec: TimmSpec
    weights: Optional[Path]
    source: str  # the run or folder it came from, for eval.json

    @property
    def label(self) -> str:
        return "random init" if self.weights is None else str(self.source)

    def build(self, num_classes: int = 0, **model_kwargs: Any) -> torch.nn.Module:
        """The timm model with these weights (the classifier head, if any, stays at its initialisation)."""
        import timm

        model = timm.create_model(self.spec.architecture, num_classes=num_classes,
                                  **{**self.spec.model_args, **model_kwargs})
        if self.weights is not None:
            load_backbone_weights(model, read_weights(self.weights), str(self.weights))
        return model

    def random(self) -> "Backbone":
        return dataclasses.replace(self, weights=None)


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    from ssl_zoo.engine.checkpoint import load_weights

    return load_weights(path)


def load_backbone_weights(model: torch.nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    """Load strictly except for the classifier head (`head.*`, new for every task); name what does not fit."""
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith("head.")]
    if missing or unexpected:
        raise UserError(f"weights '{where}' do not fit the architecture: missing keys {missing[:5]}"
                         f"{' ...' if len(missing) > 5 else ''}, unexpected keys {unexpected[:5]}"
                         f"{' ...' if len(unexpected) > 5 else ''}; give the run they were trained in")


def spec_of_run(stage_dir: Path) -> TimmSpec:
    from ssl_zoo.config import from_container
    from ssl_zoo.registry import METHODS

    cfg = from_container(OmegaConf.to_container(OmegaConf.load(stage_dir / "config.yaml"), resolve=True))
    spec = METHODS.get(cfg.method.name).timm_spec(cfg)
    if spec is None:
        raise UserError(f"run '{stage_dir}' is a '{cfg.method.name}' run, whose backbone has no timm form "
                         "(its method defines no timm_spec); give the stage that trains the backbone")
    return spec


def _spec_of_timm_folder(folder: Path) -> TimmSpec:
    config = json.loads((folder / "config.json").read_text())
    pretrained = config.get("pretrained_cfg", {})
    return TimmSpec(config["architecture"], config.get("model_args", {}),
                    tuple(pretrained.get("input_size", (3, 224, 224))), tuple(pretrained.get("mean", (0.5,) * 3)),
                    tuple(pretrained.get("std", (0.5,) * 3)))


def last_stage(run_dir: Path) -> Path:
    summary = json.loads((run_dir / "summary.json").read_text())
    stages = [Path(s["output_dir"]) for s in summary if isinstance(s, dict) and s.get("output_dir")] \
        if isinstance(summary, list) else []
    named = [run_dir / s.name for s in stages if (run_dir / s.name / "config.yaml").is_file()]
    if not named:
        raise FileNotFoundError(f"run '{run_dir}' lists no stage with a config.yaml in its summary.json")
    return named[-1]


def _weights_of_stage(stage_dir: Path) -> Path:
    weights = stage_dir / "export" / "backbone.safetensors"
    if weights.is_file():
        return weights
    if (stage_dir / "checkpoints").is_dir():
        raise FileNotFoundError(f"run '{stage_dir}' has no exported weights ({weights}): it has not finished; "
                                f"write them from its last checkpoint with `python -m ssl_zoo.export {stage_dir}`")
    raise FileNotFoundError(f"run '{stage_dir}' holds no weights (no {weights}, no checkpoints/)")


def resolve(checkpoint: str, architecture: Optional[str] = None, with_weights: bool = True) -> Backbone:
    """The backbone `checkpoint` names (see the module docstring); its weights are checked to fit.
    `with_weights=False` reads only the architecture (a run that has not finished will do)."""
    if checkpoint == RANDOM:
        if not architecture:
            raise UserError("checkpoint=random needs architecture=RUN_DIR: the run (or export) whose "
                             "architecture to build at random initialisation")
        return resolve(architecture, with_weights=False)
    path = Path(checkpoint).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"checkpoint '{checkpoint}' does not exist: give a run directory, one stage "
                                "of it, an export folder, or checkpoint=random")
    if path.is_file():
        if path.suffix != ".safetensors" or not (path.parent.parent / "config.yaml").is_file():
            raise UserError(f"checkpoint '{checkpoint}' is a file but not a run's export/backbone.safetensors; "
                             "give the run directory instead")
        backbone = Backbone(spec_of_run(path.parent.parent), path, str(path.parent.parent))
    elif (path / "config.json").is_file():
        weights = path / "model.safetensors"
        if not weights.is_file():
            raise FileNotFoundError(f"timm folder '{path}' has config.json but no model.safetensors")
        backbone = Backbone(_spec_of_timm_folder(path), weights, str(path))
    elif (path / "config.yaml").is_file():
        backbone = Backbone(spec_of_run(path), _weights_of_stage(path) if with_weights else None, str(path))
    elif (path / "backbone.safetensors").is_file() and (path.parent / "config.yaml").is_file():
        backbone = Backbone(spec_of_run(path.parent), path / "backbone.safetensors", str(path.parent))
    elif (path / "summary.json").is_file():
        stage = last_stage(path)
        backbone = Backbone(spec_of_run(stage), _weights_of_stage(stage) if with_weights else None, str(stage))
    else:
        raise FileNotFoundError(f"checkpoint '{checkpoint}' is not a run directory (no config.yaml or "
                                "summary.json), an export folder, nor a timm folder (config.json)")
    if not with_weights:
        return backbone.random()
    backbone.build()  # weights that do not fit fail here, before any data is made
    return backbone
