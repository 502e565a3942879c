"""Consolidate a run's checkpoint into plain weights: `python -m ssl_zoo.export RUN_DIR [--checkpoint DIR] [--out DIR]
[--format safetensors|timm]`.

Works on one CPU process without DeepSpeed's runtime or a process group: a DeepSpeed checkpoint (ZeRO 1, 2 or
3 shards, from any number of ranks) is merged by DeepSpeed's `zero_to_fp32` reader, a plain one is read as is.
Writes `method.safetensors` (the whole method) and `backbone.safetensors` (what downstream tasks load), the
same two files a finished run writes to `RUN_DIR/export/`, so a run killed between checkpoints can still be
exported from its last complete one.

`--format timm` writes the backbone as timm's local folder (and the Hugging Face hub's layout): `config.json`
(architecture, num_classes, model_args, pretrained_cfg with input size, mean and std, from the method's
`timm_spec`) and `model.safetensors`, to `RUN_DIR/export/timm` by default, so that
`timm.create_model("local-dir:PATH", pretrained=True, num_classes=N)` builds and loads it with no other code.
RUN_DIR may be a multi-stage run (its last stage is exported).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch
from omegaconf import OmegaConf

from ssl_zoo.engine.checkpoint import (CheckpointManager, check_files, deepspeed_data_classes, safe_load,
                                       save_safetensors)
from ssl_zoo.errors import UserError
from ssl_zoo.method import TimmSpec


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


def timm_config(spec: TimmSpec) -> dict:
    """timm's config.json for a backbone without classifier (`num_classes=N` at load adds a new head)."""
    return {"architecture": spec.architecture, "num_classes": 0, "model_args": dict(spec.model_args),
            "pretrained_cfg": {"input_size": list(spec.input_size), "mean": list(spec.mean), "std": list(spec.std),
                               "interpolation": "bicubic", "crop_pct": 0.9, "num_classes": 0, "classifier": "head"}}


def export_timm(run_dir: Path, checkpoint: Path | None = None, out: Path | None = None) -> list[Path]:
    """The backbone of a run (its last stage if multi-stage) as a timm local folder; written from the run's
    export, which is made from its last checkpoint first if the run did not finish (or from `checkpoint`)."""
    from ssl_zoo.engine.checkpoint import atomic_write
    from ssl_zoo.evaluation.backbone import Backbone, last_stage, spec_of_run, read_weights

    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file() and (run_dir / "summary.json").is_file():
        run_dir = last_stage(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise FileNotFoundError(f"'{run_dir}' is not a run directory (no config.yaml)")
    spec = spec_of_run(run_dir)
    out = out or run_dir / "export" / "timm"
    with tempfile.TemporaryDirectory() as consolidated:
        weights = run_dir / "export" / "backbone.safetensors"
        if checkpoint is not None or not weights.is_file():
            weights = export(run_dir, checkpoint, Path(consolidated))[1]
        Backbone(spec, weights, str(run_dir)).build()  # weights that do not fit fail before anything is written
        save_safetensors(read_weights(weights), out / "model.safetensors", {"format": "pt"})
    atomic_write(out / "config.json", lambda tmp: tmp.write_text(json.dumps(timm_config(spec), indent=2) + "\n"))
    return [out / "config.json", out / "model.safetensors"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ssl_zoo.export", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="the run's output_dir (holds config.yaml and checkpoints/)")
    parser.add_argument("--checkpoint", type=Path, help="a checkpoint directory (default: checkpoints/last)")
    parser.add_argument("--out", type=Path, help="where to write (default: RUN_DIR/export, RUN_DIR/export/timm)")
    parser.add_argument("--format", choices=("safetensors", "timm"), default="safetensors",
                        help="safetensors: method + backbone files; timm: a folder for timm's local-dir:")
    args = parser.parse_args(argv)
    try:
        write = export_timm if args.format == "timm" else export
        paths = write(args.run_dir, args.checkpoint, args.out)
    except (FileNotFoundError, ValueError, UserError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for path in paths:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
