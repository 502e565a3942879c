"""One contract for every registered method (in the style of timm's tests over `list_models`).

Parametrised over `METHODS` after every plugin has loaded (the entry points and the tests' toy method), so a
new method gets all of it by registering: it builds from its config, its parameter groups cover every trainable
weight once, it trains one step on the embedded photos through the real loop (`ssl_zoo.train.train`), a run
resumed from its checkpoint ends with the same weights and losses as the uninterrupted one, the offline export
of the checkpoint equals the run's own export, `extract_features` gives one finite vector per image that a
kNN evaluation can score, and a method with a timm form (`timm_spec`) exports a folder that
`timm.create_model("local-dir:...")` loads with the same features, which `python -m ssl_zoo.eval` scores.

A method whose `stages()` asks for earlier runs (PeCo's tokenizer) gets them run first, one step each, so its
inputs are real exports. Runs are in-process and tiny: seconds per method on a quiet machine.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import timm
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from ssl_zoo import registry
from ssl_zoo.config import load_config
from ssl_zoo.data.labelled import CropIdConfig
from ssl_zoo.data.transforms import IMAGENET_MEAN, IMAGENET_STD, DefaultTransform
from ssl_zoo.engine.logger import TIMING_KEYS
from ssl_zoo.errors import UserError
from ssl_zoo.eval import main as eval_main
from ssl_zoo.evaluation.features import compute_features
from ssl_zoo.evaluation.frozen import labelled_splits
from ssl_zoo.evaluation.protocols import KnnConfig, knn
from ssl_zoo.export import export, export_timm
from ssl_zoo.method import Method, Stage
from ssl_zoo.registry import DATASETS, METHODS
from ssl_zoo.run import stage_config
from ssl_zoo.train import train
from tests.conftest import read_metrics

TOY_PLUGIN = "tests.plugins.toy_method"
registry.load_plugins([TOY_PLUGIN])

#: settings of every contract run: two steps of four images, a checkpoint after each
COMMON = [f"plugins=[{TOY_PLUGIN}]", "trainer.device=cpu", "trainer.batch_size=4", "trainer.max_steps=2",
          "trainer.log_every=1", "trainer.checkpoint_every=1", "trainer.keep_checkpoints=3", "trainer.warmup_steps=1",
          "trainer.progress=false"]
#: a small crop_id: 6 training and 4 test crops of each of the 9 photos
SMALL_CROP_ID = {"train_crops_per_photo": 6, "test_crops_per_photo": 4}
#: the data of a method's runs unless its TINY entry chooses other data: the embedded photos
EMBEDDED = ["data=embedded", "data.samples_per_epoch=16", "data.num_workers=0"]
_PECO = ["model.img_size=32", "model.patch_size=8", "model.depth=2", "model.embed_dim=32", "model.num_heads=2",
         "method.mask.num_masked=4", "method.mask.min_block=2", "method.tokenizer.autoencoder.channel_mult=[1,2,2,2]",
         "method.tokenizer.autoencoder.base_width=8", "method.tokenizer.quantizer.num_codes=16",
         "method.tokenizer.quantizer.dim=8", "method.tokenizer_loss.gan.width=8", "method.kernel_impl=torch",
         "method.tokenizer_training.max_steps=1", "method.tokenizer_training.batch_size=4"]
#: tiny sizes of the methods we know; a method missing here is tested at its own defaults
TINY: dict[str, list[str]] = {
    "toy_autoencoder": ["model=toy_mlp", "data.image_size=32"],
    "mae": ["model.img_size=32", "model.patch_size=8", "model.embed_dim=32", "model.depth=2", "model.num_heads=2",
            "model.decoder_embed_dim=16", "model.decoder_depth=1", "model.decoder_num_heads=2"],
    "peco_tokenizer": _PECO,
    "peco": _PECO,
    "finetune": ["model=timm", "model.architecture=vit_tiny_patch16_224", "model.input_size=[3,32,32]",
                 "model.model_args={img_size:32,patch_size:8,embed_dim:32,depth:2,num_heads:2}",
                 "method.num_classes=9", "data=crop_id", "data.image_size=32",
                 *(f"data.{k}={v}" for k, v in SMALL_CROP_ID.items())],
}


def reproducible(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k not in TIMING_KEYS} for row in rows]


class ContractRun:
    """One method's straight two-step run, and the same run resumed from the checkpoint of step 1."""

    def __init__(self, name: str, root: Path) -> None:
        tiny = TINY.get(name, [])
        base = [f"method={name}", *COMMON, *([] if any(o.startswith("data=") for o in tiny) else EMBEDDED), *tiny]
        self.name, self.straight, self.resumed = name, root / "straight", root / "resumed"
        stages = METHODS.get(name).stages(load_config([*base, f"output_dir={root}"]))
        for stage in stages[:-1]:  # earlier stages write the exports the last one reads
            train(stage_config(base, stage, str(root / stage.name)))
        last = stages[-1] if stages else Stage(name)
        self.cfg = stage_config(base, last, str(self.straight))
        self.summary = train(self.cfg)
        shutil.copytree(self.straight, self.resumed,
                        ignore=shutil.ignore_patterns("step-00000002", "export", "summary.json", "pictures"))
        (self.resumed / "checkpoints" / "last").write_text("step-00000001\n")
        self.resumed_summary = train(stage_config(base, last, str(self.resumed)))

    def method(self) -> Method:
        """The method as its config builds it, with the straight run's final weights."""
        method = METHODS.get(self.name)(self.cfg)
        method.load_state_dict(load_file(self.straight / "export" / "method.safetensors"))
        return method.eval()


@pytest.fixture(scope="module", params=METHODS.names())
def run(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> ContractRun:
    return ContractRun(request.param, tmp_path_factory.mktemp(request.param))


def test_every_plugin_method_is_registered() -> None:
    assert {"finetune", "mae", "peco", "peco_tokenizer", "toy_autoencoder"} <= set(METHODS.names())


def test_builds_with_parameter_groups_that_cover_every_trainable_weight_once(run: ContractRun) -> None:
    method = METHODS.get(run.name)(run.cfg)
    assert isinstance(method, Method)
    grouped = [id(p) for group in method.param_groups(0.05) for p in group["params"]]
    trainable = [id(p) for p in method.parameters() if p.requires_grad]
    assert sorted(grouped) == sorted(trainable) and trainable


def test_trains_one_step_on_its_data(run: ContractRun) -> None:
    rows = [row for row in read_metrics(run.straight) if "loss" in row]  # (a method may log evaluation rows too)
    assert [r["step"] for r in rows] == [1, 2]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    assert run.summary["steps"] == 2 and run.summary["method"] == run.name
    for path in ("config.yaml", "checkpoints/step-00000001", "checkpoints/step-00000002",
                 "export/method.safetensors", "export/backbone.safetensors"):
        assert (run.straight / path).exists(), path


def test_resumes_exactly_from_a_checkpoint(run: ContractRun) -> None:
    assert run.resumed_summary["resumed_from"] == str(run.resumed / "checkpoints" / "step-00000001")
    assert reproducible(read_metrics(run.resumed)) == reproducible(read_metrics(run.straight))
    straight, resumed = (load_file(r / "export" / "method.safetensors") for r in (run.straight, run.resumed))
    assert straight.keys() == resumed.keys()
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), key


def test_offline_export_of_the_checkpoint_equals_the_runs_export(run: ContractRun, tmp_path: Path) -> None:
    paths = export(run.straight, out=tmp_path)
    for path in paths:
        ours, theirs = load_file(path), load_file(run.straight / "export" / path.name)
        assert ours.keys() == theirs.keys() and ours
        assert all(torch.equal(ours[k], theirs[k]) for k in ours), path.name


def test_extract_features_gives_one_finite_vector_per_image(run: ContractRun) -> None:
    cfg = run.cfg
    transform = METHODS.get(run.name).make_transform(cfg) or DefaultTransform(cfg.data.image_size)
    dataset = DATASETS.build(cfg.data, transform, cfg.seed)
    images = torch.stack([dataset[(0, i)]["image"] for i in range(4)])
    with torch.no_grad():
        features = run.method().extract_features(images)
    assert features.ndim == 2 and features.shape[0] == 4 and features.shape[1] > 0
    assert torch.isfinite(features).all()
    assert not torch.allclose(features[0], features[1])  # depends on the image


def test_knn_scores_its_features_on_crop_id(run: ContractRun) -> None:
    spec = METHODS.get(run.name).timm_spec(run.cfg)
    size = spec.input_size[-1] if spec else run.cfg.data.image_size
    mean, std = (spec.mean, spec.std) if spec else (IMAGENET_MEAN, IMAGENET_STD)
    train_split, test_split = labelled_splits(OmegaConf.structured(CropIdConfig(**SMALL_CROP_ID)), 0, size)
    method = run.method()
    train_features, _ = compute_features(method.extract_features, train_split, mean, std)
    test_features, _ = compute_features(method.extract_features, test_split, mean, std)
    scores = knn(OmegaConf.structured(KnnConfig()), train_features["pooled"], train_split.labels,
                 test_features["pooled"], test_split.labels, train_split.num_classes, 0)
    assert 0.0 <= scores["top1"] <= 1.0 and 0.0 <= scores["top5"] <= 1.0


def test_timm_form_loads_from_local_dir_with_the_same_features_and_evaluates(
        run: ContractRun, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """With a `timm_spec`: the timm folder loads through `local-dir:` and gives `extract_features`'s values, and
    `python -m ssl_zoo.eval protocol=knn` scores the run beside random init. Without one, both say so in one line."""
    spec = METHODS.get(run.name).timm_spec(run.cfg)
    eval_args = [f"checkpoint={run.straight}", "protocol=knn", "trainer.device=cpu", "trainer.progress=false",
                 *(f"data.{k}={v}" for k, v in SMALL_CROP_ID.items()), f"output_dir={tmp_path / 'eval'}"]
    if spec is None:
        with pytest.raises(UserError, match="has no timm form"):
            export_timm(run.straight, out=tmp_path / "timm")
        assert eval_main(eval_args) == 2 and "has no timm form" in capsys.readouterr().err
        return
    config_json, _ = export_timm(run.straight, out=tmp_path / "timm")
    model = timm.create_model(f"local-dir:{config_json.parent}", pretrained=True, num_classes=3).eval()
    images = torch.randn(2, *spec.input_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        theirs = model.forward_head(model.forward_features(images), pre_logits=True)
        ours = run.method().extract_features(images)
    assert (ours - theirs).abs().max() < 1e-5
    assert eval_main(eval_args) == 0
    record = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert record["protocol"] == "knn" and 0.0 <= record["score"] <= 1.0 and 0.0 <= record["random_init_score"] <= 1.0
