"""Reading perceptual-network checkpoints in the public formats, and the stage-1 tokenizer export.

The paper's perceptual network is a self-supervised ViT-B/16. Users bring one in the layout of the code
that trained it; all of these name the ViT's own weights as timm does once their prefix is removed:
- MoCo v3: `{"state_dict": {"module.base_encoder.<timm key>", "module.momentum_encoder...", ...}}`; the
  `head.*` of the base encoder is MoCo's projection MLP, not part of the backbone.
- DINO: a training checkpoint `{"teacher": {"backbone.<key>", "head.<key>"}, "student": {"module.backbone..."}}`,
  or a released backbone file with plain keys.
- timm: a plain state dict, possibly under "model" / "state_dict", possibly with a "module." prefix.
A checkpoint that does not fit the model fails with the lists of missing and unexpected keys.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ssl_zoo.engine.checkpoint import load_safetensors, safe_load

FORMATS = ("auto", "mocov3", "dino", "timm")


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a .safetensors or torch file without executing arbitrary pickled code."""
    path = Path(path)
    if path.is_dir():
        raise FileNotFoundError(f"checkpoint '{path}' is a folder; give the weights file in it")
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint '{path}' does not exist")
    if path.suffix == ".safetensors":
        return load_safetensors(path)
    # DINO's training checkpoints keep their argparse.Namespace of arguments next to the weights
    return safe_load(path, allowed=[argparse.Namespace])


def _strip(state: dict[str, Any], prefix: str) -> dict[str, Any]:
    """Keys under `prefix` with the prefix removed (all others dropped); unchanged if none has it."""
    inner = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    return inner if inner else state


def detect_format(ckpt: dict[str, Any]) -> str:
    if "teacher" in ckpt or "student" in ckpt:
        return "dino"
    state = ckpt.get("state_dict")
    if isinstance(state, dict) and any(".base_encoder." in k or k.startswith("base_encoder.") for k in state):
        return "mocov3"
    return "timm"


def backbone_state(ckpt: dict[str, Any], fmt: str = "auto", dino_key: str = "teacher") -> tuple[dict[str, torch.Tensor], str]:
    """The ViT's own weights under timm names, and the format they were read as."""
    if fmt not in FORMATS:
        raise ValueError(f"perceptual.checkpoint_format must be one of {FORMATS}, got '{fmt}'")
    fmt = detect_format(ckpt) if fmt == "auto" else fmt
    if fmt == "mocov3":
        state = _strip(_strip(ckpt.get("state_dict", ckpt), "module."), "base_encoder.")
    elif fmt == "dino":
        if dino_key in ckpt:
            state = _strip(_strip(ckpt[dino_key], "module."), "backbone.")
        elif "teacher" in ckpt or "student" in ckpt:
            raise KeyError(f"DINO checkpoint has no '{dino_key}' network; it has: {', '.join(ckpt)}")
        else:  # a released backbone-only file
            state = _strip(ckpt, "backbone.")
    else:
        state = ckpt
        for container in ("model", "state_dict"):
            if isinstance(state.get(container), dict):
                state = state[container]
        state = _strip(state, "module.")
    return {k: v for k, v in state.items() if not k.startswith("head.") and k != "head"}, fmt


def _listing(keys: list[str], limit: int = 8) -> str:
    shown = ", ".join(keys[:limit])
    return f"{shown}, ... ({len(keys)} in all)" if len(keys) > limit else shown


def load_strict(model: nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """Load every weight of `model` from `state`, or raise naming the missing/unexpected/misshapen keys."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    misshapen = sorted(k for k in set(expected) & set(state) if tuple(expected[k].shape) != tuple(state[k].shape))
    problems = []
    if missing:
        problems.append(f"missing keys: {_listing(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_listing(unexpected)}")
    if misshapen:
        problems.append("shape mismatch: " + _listing(
            [f"{k} {tuple(state[k].shape)} vs {tuple(expected[k].shape)}" for k in misshapen]))
    if problems:
        raise ValueError(f"{what} does not match the model: " + "; ".join(problems))
    model.load_state_dict(state)


def tokenizer_state(path: str | Path) -> dict[str, torch.Tensor]:
    """The tokenizer's weights from a stage-1 export (`method.safetensors`, keys `tokenizer.*`; its folder or
    the stage-1 run's folder, as `runs/peco/tokenizer`, name it too) or from a file that holds the tokenizer
    alone."""
    path = Path(path)
    for inside in ("export/method.safetensors", "method.safetensors"):
        if path.is_dir() and (path / inside).is_file():
            path = path / inside
            break
    state = read_checkpoint(path)
    state = state.get("model", state) if isinstance(state.get("model"), dict) else state
    return _strip(state, "tokenizer.")
