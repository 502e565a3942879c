"""PeCo configs: composition, strict keys, stages of the main job, and the paper recipes."""
from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

import pytest

from ssl_zoo.config import ConfigError, TrainerConfig, load_config, trainer_subset
import ssl_zoo_peco
from ssl_zoo.registry import METHODS
from ssl_zoo.run import stage_config
from ssl_zoo_peco.beit import build_beit
from ssl_zoo_peco.config import StageTrainingConfig, tokenizer_image_size

EXPERIMENTS = sorted(p.stem for p in (Path(ssl_zoo_peco.__file__).parent / "configs" / "experiment")
                     .glob("peco_vit_*ep.yaml"))


def test_tokenizer_training_has_the_trainer_schemas_keys_types_and_limits() -> None:
    """Its schema is derived from TrainerConfig (only the defaults are stage 1's), so the two cannot drift."""
    trainer, hints = {f.name: f for f in dataclasses.fields(TrainerConfig)}, typing.get_type_hints(TrainerConfig)
    for field in dataclasses.fields(StageTrainingConfig):
        assert field.metadata == trainer[field.name].metadata and field.type == hints[field.name], field.name
    with pytest.raises(ConfigError, match=r"'method.tokenizer_training.betas': \[0.9\]; allowed: a list of 2"):
        load_config(["method=peco", "method.tokenizer_training.betas=[0.9]"])
    with pytest.raises(TypeError, match="'lrr' is not a TrainerConfig key"):
        trainer_subset("Stage", "a stage's trainer keys", lrr=1.0)


def test_main_job_without_checkpoint_is_two_stages_with_the_tokenizer_training_settings() -> None:
    cfg = load_config(["method=peco", "output_dir=/tmp/x", "method.tokenizer_training.max_steps=7"])
    stages = METHODS.get("peco").stages(cfg)
    assert [s.name for s in stages] == ["tokenizer", "mim"]
    assert stages[0].method == "peco_tokenizer" and stages[1].method is None
    assert stages[0].settings["trainer.max_steps"] == 7 and list(stages[0].settings["trainer.betas"]) == [0.9, 0.99]
    assert stages[1].settings == {"method.tokenizer.checkpoint": "/tmp/x/tokenizer/export/method.safetensors"}
    # the stage configs compose: user overrides for PeCo are valid in both stages
    user = ["method=peco", "output_dir=/tmp/x", "method.mask.num_masked=10"]
    for stage in stages:
        stage_cfg = stage_config(user, stage, f"/tmp/x/{stage.name}")
        assert stage_cfg.method.mask.num_masked == 10 and stage_cfg.output_dir == f"/tmp/x/{stage.name}"
    first = stage_config(user, stages[0], "/tmp/x/tokenizer")
    assert first.method.name == "peco_tokenizer" and first.trainer.max_steps == 7
    assert list(first.trainer.betas) == [0.9, 0.99]  # tokenizer_training, not stage 2's (0.9, 0.999)
    # every key of tokenizer_training becomes the trainer key of that name in stage 1 (derived from its schema)
    assert all(first.trainer[key] == value for key, value in cfg.method.tokenizer_training.items())
    # activation checkpointing is the ViT's setting: stage 2 keeps it, the conv tokenizer of stage 1 has no hook
    user.append("trainer.activation_checkpointing=true")
    assert not stage_config(user, stages[0], "/tmp/x/tokenizer").trainer.activation_checkpointing
    assert stage_config(user, stages[1], "/tmp/x/mim").trainer.activation_checkpointing


def test_with_a_checkpoint_it_is_a_single_run() -> None:
    cfg = load_config(["method=peco", "method.tokenizer.checkpoint=/some/tokenizer.safetensors"])
    assert METHODS.get("peco").stages(cfg) == []


def test_typos_and_bad_values_fail_naming_the_key() -> None:
    with pytest.raises(ConfigError, match="method.tokenizer.quantizer.num_codez"):
        load_config(["method=peco", "method.tokenizer.quantizer.num_codez=3"])
    with pytest.raises(ConfigError, match="method.mask.num_masked"):
        load_config(["method=peco", "method.mask.num_masked=many"])


def test_tokenizer_view_size_follows_the_vit_grid() -> None:
    assert tokenizer_image_size(load_config(["method=peco"])) == 48  # 6 x 6 grid, f = 8
    assert tokenizer_image_size(load_config(["method=peco", "model=beit_base"])) == 112  # 14 x 14 grid, f = 8
    f16 = "method.tokenizer.autoencoder.channel_mult=[1,1,2,2,4]"  # the paper recipes' VQGAN shape
    assert tokenizer_image_size(load_config(["method=peco", "model=beit_base", f16])) == 224
    assert tokenizer_image_size(load_config(["method=peco", "model=beit_huge", f16])) == 256


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_paper_recipes_compose_and_build_on_meta(experiment: str) -> None:
    cfg = load_config(["method=peco", f"experiment={experiment}", "data.root=/imagenet/train"])
    net = build_beit(cfg.model, device="meta")
    millions = sum(p.numel() for p in net.parameters()) / 1e6
    expected = {"beit_base": 86, "beit_large": 304, "beit_huge": 632}
    size = next(k for k in expected if k.split("_")[1] in experiment)
    assert millions == pytest.approx(expected[size], rel=0.01)
    grid = cfg.model.img_size // cfg.model.patch_size
    assert cfg.method.tokenizer.quantizer.num_codes == 8192 and cfg.method.tokenizer.quantizer.dim == 256
    assert cfg.trainer.batch_size * 16 == 2048  # per process, 16 processes
    assert 0.38 <= cfg.method.mask.num_masked / grid**2 <= 0.40
    epochs = 800 if "800ep" in experiment else 300
    assert cfg.trainer.max_steps == round(epochs * 1281167 / 2048)
    assert cfg.trainer.lr == 1.5e-3 and cfg.trainer.weight_decay == 0.05 and cfg.trainer.grad_clip == 3.0
    stage1 = stage_config(["method=peco", f"experiment={experiment}", "data.root=/imagenet/train"],
                          METHODS.get("peco").stages(cfg)[0], "/tmp/x/tokenizer")
    assert stage1.method.name == "peco_tokenizer" and list(stage1.trainer.betas) == [0.5, 0.9]
    assert stage1.method.tokenizer.autoencoder.base_width == 128
