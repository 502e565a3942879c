"""The evaluation protocols on hand-made features, BEiT's layer decay parameter by parameter, and the CLI's
config system and one-line errors (no pretraining run needed)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from ssl_zoo.eval import main as eval_main
from ssl_zoo.evaluation.finetune import Finetune, TimmModelConfig
from ssl_zoo.evaluation.protocols import KnnConfig, LinearConfig, knn, knn_scores, linear

TINY_BEIT = {"img_size": 32, "patch_size": 16, "embed_dim": 32, "depth": 3, "num_heads": 2,
             "use_abs_pos_emb": False, "use_rel_pos_bias": True, "init_values": 0.1}


def test_knn_weights_votes_by_exp_similarity_over_temperature():
    """One very close neighbour of class 1 outvotes two farther ones of class 0 at T=0.07, not at T=100."""
    train = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.6, -0.8]])
    labels = torch.tensor([1, 0, 0])
    test = torch.tensor([[1.0, 0.05]])
    assert knn_scores(train, labels, test, 2, k=3, temperature=0.07).argmax().item() == 1
    assert knn_scores(train, labels, test, 2, k=3, temperature=100.0).argmax().item() == 0
    assert knn_scores(train, labels, test, 2, k=1, temperature=100.0).argmax().item() == 1  # only the nearest


def test_knn_reports_top5_only_with_more_than_five_classes():
    gen = torch.Generator().manual_seed(0)
    for classes, has_top5 in ((5, False), (6, True)):
        train, test = torch.randn(60, 8, generator=gen), torch.randn(30, 8, generator=gen)
        result = knn(KnnConfig(), train, torch.arange(60) % classes, test, torch.arange(30) % classes, classes, 0)
        assert ("top5" in result) == has_top5 and 0 <= result["top1"] <= 1


def test_linear_probe_picks_its_lr_without_the_test_labels():
    gen = torch.Generator().manual_seed(1)  # not the probe's seed: its head init would equal these centres
    centres = torch.randn(8, 16, generator=gen) * 3
    labels = torch.arange(240) % 8
    train = centres[labels] + torch.randn(240, 16, generator=gen)
    test_labels = torch.arange(80) % 8
    test = centres[test_labels] + torch.randn(80, 16, generator=gen)
    section = LinearConfig(lrs=[0.0, 1e-1], epochs=30)  # lr 0 keeps the random head: near chance
    result = linear(section, train, labels, test, test_labels, 8, seed=0)
    shuffled = linear(section, train, labels, test, test_labels[torch.randperm(80, generator=gen)], 8, seed=0)
    assert result["holdout_top1_lr0"] < 0.5 < result["holdout_top1_lr0.1"]
    assert result["top1"] > 0.9 and result["lr"] == 1e-1
    assert shuffled["lr"] == result["lr"] and shuffled["holdout_top1_lr0.1"] == result["holdout_top1_lr0.1"]
    assert shuffled["top1"] < 0.6  # the test labels only enter the final score


def _finetune_method(layer_decay: float = 0.65) -> Finetune:
    model = OmegaConf.structured(TimmModelConfig(architecture="beit_base_patch16_224", model_args=TINY_BEIT,
                                                 input_size=[3, 32, 32]))
    cfg = OmegaConf.create({"model": model, "method": {"name": "finetune", "num_classes": 4,
                            "layer_decay": layer_decay, "drop_path_rate": 0.1, "mixup": 0.8, "cutmix": 1.0,
                            "label_smoothing": 0.1}})
    return Finetune(cfg)


def test_layer_decay_scales_every_parameter_as_beit_does():
    decay, depth = 0.65, TINY_BEIT["depth"]
    method = _finetune_method(decay)
    groups = method.param_groups(weight_decay=0.05)
    seen = {}
    for group in groups:
        for param in group["params"]:
            seen[id(param)] = (group["lr_scale"], group["weight_decay"])
    names = dict(method.model.named_parameters())
    assert len(seen) == len(names)
    for name, param in names.items():
        if name.startswith(("patch_embed.", "cls_token", "pos_embed")):
            layer = 0
        elif name.startswith("blocks."):
            layer = int(name.split(".")[1]) + 1
        else:
            assert name.startswith(("fc_norm.", "head.")), name
            layer = depth + 1
        scale, weight_decay = seen[id(param)]
        assert scale == pytest.approx(decay ** (depth + 1 - layer)), name
        no_decay = param.ndim <= 1 or name.endswith(".bias") or "cls_token" in name or \
            "relative_position_bias_table" in name
        assert weight_decay == (0.0 if no_decay else 0.05), name
    assert any("relative_position_bias_table" in n for n in names) and "cls_token" in names


def test_finetune_head_starts_small_and_the_loss_takes_soft_targets():
    method = _finetune_method()
    head = method.model.get_classifier()
    assert 0.5 * 0.02e-3 < head.weight.std() < 2 * 0.02e-3 and torch.all(head.bias == 0)  # std 0.02 x 0.001
    assert method.model.global_pool == "avg" and method.model.fc_norm.weight.shape == (32,)
    batch = {"image": torch.randn(4, 3, 32, 32), "label": torch.tensor([0, 1, 2, 3])}
    out = method.training_step(batch, 0)
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    assert method.model.blocks[-1].drop_path1.drop_prob == pytest.approx(0.1)  # drop path rising to 0.1


def test_finetune_augmentation_survives_randaugment_at_full_magnitude():
    """At magnitude 10 (m9 + mstd0.5 gets there) increasing posterize keeps 0 bits, which Pillow 13 rejects."""
    from PIL import Image

    from ssl_zoo.evaluation.finetune import FinetuneConfig

    model = OmegaConf.structured(TimmModelConfig(architecture="beit_base_patch16_224", input_size=[3, 32, 32]))
    cfg = OmegaConf.create({"model": model, "method": OmegaConf.structured(FinetuneConfig())})
    transform = Finetune.make_transform(cfg)
    rand_augment = next(step for step in transform.transform.transforms if hasattr(step, "ops"))
    rand_augment.ops = [op for op in rand_augment.ops if op.name.startswith("Posterize")]
    for op in rand_augment.ops:
        op.prob, op.magnitude, op.magnitude_std = 1.0, 10, 0
    image = Image.new("RGB", (40, 40), (200, 120, 40))
    out = transform(image, torch.Generator().manual_seed(0))["image"]
    assert out.shape == (3, 32, 32) and torch.isfinite(out).all()


def run_eval(capsys, *args: str) -> tuple[int, str, str]:
    code = eval_main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_help_lists_the_eval_groups_and_print_config_resolves(capsys):
    code, out, _ = run_eval(capsys, "--help")
    assert code == 0 and "protocol" in out and "finetune, knn, linear" in out and "crop_id" in out
    code, out, _ = run_eval(capsys, "checkpoint=random", "protocol=linear", "--print-config")
    assert code == 0 and "name: linear" in out and "name: crop_id" in out


@pytest.mark.parametrize(("args", "message"), [
    (["checkpoint=/no/such/run"], "checkpoint '/no/such/run' does not exist"),
    (["checkpoint=random"], "checkpoint=random needs architecture=RUN_DIR"),
    (["checkpoint=random", "protocol=knnn"], "unknown protocol 'knnn'; did you mean 'knn'?"),
    (["checkpoint=random", "protocol.kk=3"], "did you mean 'protocol.k'?"),
    (["checkpoint=random", "protocol.k=0"], "'protocol.k': 0; allowed: >= 1"),
    (["checkpoint=random", "protocol=linear", "protocol.holdout=1.5"], "'protocol.holdout': 1.5; allowed: > 0, < 1"),
    (["checkpoint=random", "protocol=finetune", "protocol.layer_decay=2"], "'protocol.layer_decay': 2.0"),
    (["checkpoint=random", "data.test_crops_per_photo=0"], "'data.test_crops_per_photo': 0; allowed: >= 1"),
])
def test_bad_arguments_get_one_line_errors(capsys, args, message):
    code, _, err = run_eval(capsys, *args)
    assert code == 2 and message in err and err.count("\n") == 1, err


def _hydra_dict(values: dict) -> str:
    return "{" + ",".join(f"{k}:{str(v).lower() if isinstance(v, bool) else v}" for k, v in values.items()) + "}"


def _fake_run(tmp_path: Path, weights: dict | None) -> Path:
    """A stage directory of a (tiny) finetune-method run: config.yaml and, optionally, exported weights."""
    from ssl_zoo.config import load_config
    from ssl_zoo.engine.checkpoint import save_safetensors

    run = tmp_path / "run"
    cfg = load_config(["method=finetune", "model=timm", "model.architecture=beit_base_patch16_224",
                       f"model.model_args={_hydra_dict(TINY_BEIT)}", "model.input_size=[3,32,32]",
                       "method.num_classes=4", f"output_dir={run}"])
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    if weights is not None:
        save_safetensors(weights, run / "export" / "backbone.safetensors")
    return run


def test_runs_without_fitting_weights_are_refused_before_any_work(capsys, tmp_path):
    run = _fake_run(tmp_path, None)
    code, _, err = run_eval(capsys, f"checkpoint={run}")
    assert code == 2 and "holds no weights" in err
    (run / "checkpoints").mkdir()
    code, _, err = run_eval(capsys, f"checkpoint={run}")
    assert code == 2 and f"python -m ssl_zoo.export {run}" in err
    bad = {"blocks.0.attn.qkv.weight": torch.zeros(96, 32), "decoder.weight": torch.zeros(2, 2)}
    run2 = _fake_run(tmp_path / "b", bad)
    code, _, err = run_eval(capsys, f"checkpoint={run2}")
    assert code == 2 and "do not fit the architecture" in err and "decoder.weight" in err and "cls_token" in err


def test_data_without_two_classes_or_labels_is_refused(capsys, tmp_path):
    from PIL import Image

    run = _fake_run(tmp_path, None)
    for split in ("train", "val"):
        (tmp_path / split / "only").mkdir(parents=True)
        Image.new("RGB", (40, 40), (200, 10, 10)).save(tmp_path / split / "only" / "a.png")
    code, _, err = run_eval(capsys, "checkpoint=random", f"architecture={run}", "data=image_folder",
                            f"data.root={tmp_path / 'train'}", f"data.val_root={tmp_path / 'val'}")
    assert code == 2 and "1 class" in err and err.count("\n") == 1, err
    code, _, err = run_eval(capsys, "checkpoint=random", f"architecture={run}", "data=embedded")
    assert code == 2 and "has no labels" in err
    code, _, err = run_eval(capsys, "checkpoint=random", f"architecture={run}", "data=fashion_mnist",
                            "data.root=/nonexistent")
    assert code == 2 and "Fashion-MNIST not found" in err
    code, _, err = run_eval(capsys, "checkpoint=random", f"architecture={run}", "protocol=finetune",
                            "protocol.num_classes=3", f"output_dir={tmp_path / 'ft'}",
                            "data.train_crops_per_photo=2", "data.test_crops_per_photo=2")
    assert code == 2 and "protocol.num_classes=3 does not match data 'crop_id', which has 9 classes" in err
