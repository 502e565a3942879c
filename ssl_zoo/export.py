"""Consolidate a run's checkpoint into plain weights: `python -m ssl_zoo.export RUN_DIR [--checkpoint DIR] [--out DIR]`.

Works on one CPU process without DeepSpeed's runtime or a process group: a DeepSpeed checkpoint (ZeRO 1, 2 or
3 shards, from any number of ranks) is merged by DeepSpeed's `zero_to_fp32` reader, a plain one is read as is.
Writes `method.safetensors` (the whole method) and `backbone.safetensors` (what downstream tasks load), the
same two files a finished run writes to `RUN_DIR/export/`, so a run killed between checkpoints can still be
exported from its last complete one.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf

from ssl_zoo.engine.checkpoint import (CheckpointManager, check_files, deepspeed_data_classes, safe_load,
                                       save_safetensors)
from ssl_zoo.errors import UserError


def checkpoint_state_dict(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The full fp32 state dict of the method saved in a checkpoint directory, whichever strategy wrote it."""
    from ssl_zoo.engine.deepspeed_strategy import ZERO_DIR, ZERO_TAG

    if (checkpoint / ZERO_DIR).is_dir():
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        check_files(checkpoint / ZERO_DIR, deepspeed_data_classes())  # zero_to_fp32 unpickles with weights_only=False
        return get_fp32_state_dict_from_zero_checkpoint(str(checkpoint / ZERO_DIR), tag=ZERO_TAG)
    if (checkpoint / "state.pt").is_file():
        return safe_load(checkpoint / "state.pt")["model"]
    raise FileNotFoundError(f"'{checkpoint}' holds neither a DeepSpeed checkpoint ({ZERO_DIR}/) nor state.pt")


def export(run_dir: Path, checkpoint: Path | None = None, out: Path | None = None) -> list[Path]:
    """Write method.safetensors and backbone.safetensors for `checkpoint` (default: the run's last complete one)."""
    from ssl_zoo.config import from_container
    from ssl_zoo.registry import METHODS

    run_dir = Path(run_dir)
    checkpoint = checkpoint or CheckpointManager(run_dir).latest()
    if checkpoint is None:
        raise FileNotFoundError(f"no complete checkpoint under '{run_dir / 'checkpoints'}'")
    out = out or run_dir / "export"
    cfg = from_container(OmegaConf.to_container(OmegaConf.load(run_dir / "config.yaml"), resolve=True))
    state = checkpoint_state_dict(Path(checkpoint))
    method = METHODS.get(cfg.method.name)(cfg)  # built to learn which weights form the backbone
    missing, unexpected = method.load_state_dict(state, strict=False)
    trainable = {name for name, param in method.named_parameters() if param.requires_grad}
    lost = [key for key in missing if key in trainable]
    if unexpected or lost:
        raise ValueError(f"checkpoint '{checkpoint}' does not fit method '{cfg.method.name}': "
                         f"missing {lost[:5]}, unexpected {unexpected[:5]}")
    # ZeRO's reader returns what the optimiser owned; frozen parts (PeCo's tokenizer) come from the method as
    # its config builds it, i.e. from the same files the run loaded them from
    state = method.state_dict()
    meta = {"method": cfg.method.name, "checkpoint": str(checkpoint)}
    paths = [out / "method.safetensors", out / "backbone.safetensors"]
    save_safetensors(state, paths[0], meta)
    save_safetensors(method.backbone_state_dict(), paths[1], meta)
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ssl_zoo.export", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="the run's output_dir (holds config.yaml and checkpoints/)")
    parser.add_argument("--checkpoint", type=Path, help="a checkpoint directory (default: checkpoints/last)")
    parser.add_argument("--out", type=Path, help="where to write (default: RUN_DIR/export)")
    args = parser.parse_args(argv)
    try:
        paths = export(args.run_dir, args.checkpoint, args.out)
    except (FileNotFoundError, ValueError, UserError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for path in paths:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
