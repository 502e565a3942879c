"""Score frozen features: a backbone (and, beside it, the same architecture at random init) or any extractor,
on a labelled dataset's own train and test splits, with one or more frozen-feature protocols sharing one
feature pass per model."""
from __future__ import annotations

import time
from typing import Any, Optional, Sequence

import torch

from ssl_zoo.data.labelled import LABELLED_SPLITS, LabelledSplit
from ssl_zoo.errors import UserError
from ssl_zoo.evaluation.backbone import Backbone
from ssl_zoo.evaluation.features import Extractor, TimmFeatures, compute_features
from ssl_zoo.evaluation.protocols import FEATURE_KIND, PROTOCOLS


def labelled_splits(data: Any, seed: int, image_size: Optional[int]) -> tuple[LabelledSplit, LabelledSplit]:
    """The train and test splits of a `data` section, checked: at least two classes, test labels known."""
    if data.name not in LABELLED_SPLITS:
        raise UserError(f"data '{data.name}' has no labels to evaluate on; choose one of "
                         f"{', '.join(LABELLED_SPLITS.names())} (data=NAME)")
    build = LABELLED_SPLITS.get(data.name)
    train, test = build(data, "train", seed, image_size), build(data, "test", seed, image_size)
    classes = int(train.labels.unique().numel())
    if classes < 2:
        raise UserError(f"data '{data.name}' has {classes} class in its training split: evaluation needs two or more")
    if int(test.labels.max()) >= train.num_classes:
        raise UserError(f"data '{data.name}': test labels reach {int(test.labels.max())} but the training split "
                         f"has {train.num_classes} classes; both splits need the same classes")
    return train, test


def score_extractor(extract: Extractor, train: LabelledSplit, test: LabelledSplit, mean: Sequence[float],
                    std: Sequence[float], sections: Sequence[Any], seed: int, device: torch.device,
                    progress: Optional[bool] = None) -> dict[str, Any]:
    """Every protocol of `sections` on one extractor's features; plus wall time and images/s."""
    started = time.perf_counter()
    batch_size = max(s.batch_size for s in sections)
    train_features, rate = compute_features(extract, train, mean, std, batch_size, device, progress=progress,
                                            desc="train features")
    test_features, _ = compute_features(extract, test, mean, std, batch_size, device, progress=progress,
                                        desc="test features")
    result: dict[str, Any] = {"feature_images_per_s": round(rate, 1)}
    for section in sections:
        kind = FEATURE_KIND[section.name]
        result[section.name] = PROTOCOLS.get(section.name)(
            section, train_features[kind], train.labels, test_features[kind], test.labels, train.num_classes, seed)
    result["wall_time_s"] = round(time.perf_counter() - started, 2)
    return result


def score_backbone(backbone: Backbone, data: Any, sections: Sequence[Any], seed: int, device: torch.device,
                   baseline: bool = True, progress: Optional[bool] = None) -> dict[str, Any]:
    """The backbone's scores and, with `baseline`, those of its architecture at random init (seeded)."""
    train, test = labelled_splits(data, seed, backbone.spec.input_size[-1])
    block = next((s.block for s in sections if s.name == "linear"), None)
    results = {}
    for name, model in [("checkpoint", backbone)] + ([("random_init", backbone.random())] if baseline else []):
        torch.manual_seed(seed)
        extract = TimmFeatures(model.build().to(device), block)
        results[name] = score_extractor(extract, train, test, backbone.spec.mean, backbone.spec.std, sections,
                                        seed, device, progress)
    results["num_train"], results["num_test"], results["num_classes"] = len(train), len(test), train.num_classes
    return results


#: crop_id crops per photo (train, test) of the scores a pretraining run reports (at the end and with
#: trainer.eval_every): fewer than an `ssl_zoo.eval` run's defaults, to keep the default main job short
MONITOR_CROPS = (100, 50)


def monitor_data() -> Any:
    from omegaconf import OmegaConf

    from ssl_zoo.data.labelled import CropIdConfig

    train, test = MONITOR_CROPS
    return OmegaConf.structured(CropIdConfig(train_crops_per_photo=train, test_crops_per_photo=test))


def final_scores(cfg: Any, device: torch.device) -> dict[str, Any]:
    """The end-of-run score of a pretraining run: kNN and linear probe on crop_id for its exported backbone
    and for the same architecture at random init (the method must have a `timm_spec`)."""
    from ssl_zoo.evaluation.backbone import resolve
    from ssl_zoo.evaluation.protocols import KnnConfig, LinearConfig

    started = time.perf_counter()
    results = score_backbone(resolve(cfg.output_dir), monitor_data(), [KnnConfig(), LinearConfig()], cfg.seed,
                             device, baseline=True, progress=False)
    scores: dict[str, Any] = {"eval_data": "crop_id"}
    for protocol in ("knn", "linear"):
        scores[f"{protocol}_top1"] = round(results["checkpoint"][protocol]["top1"], 4)
        scores[f"{protocol}_random_init"] = round(results["random_init"][protocol]["top1"], 4)
    scores["eval_wall_time_s"] = round(time.perf_counter() - started, 1)
    return scores


class KnnMonitor:
    """`trainer.eval_every`: kNN top-1 on crop_id of the live method's `extract_features`, the online monitor
    solo-learn and lightly users know. Any method works (no timm form needed); the splits are made once."""

    def __init__(self, cfg: Any, method_cls: Any) -> None:
        if cfg.strategy.name == "deepspeed" and cfg.strategy.zero_stage == 3:
            raise UserError("trainer.eval_every needs the whole model on rank 0, which ZeRO-3 does not hold "
                             "during training: set trainer.eval_every=0, or use strategy.zero_stage=2")
        from ssl_zoo.data.transforms import IMAGENET_MEAN, IMAGENET_STD
        from ssl_zoo.evaluation.protocols import KnnConfig

        spec = method_cls.timm_spec(cfg)
        size = spec.input_size[-1] if spec else cfg.data.image_size
        self.mean, self.std = (spec.mean, spec.std) if spec else (IMAGENET_MEAN, IMAGENET_STD)
        self.train, self.test = labelled_splits(monitor_data(), cfg.seed, size)
        self.section, self.seed = KnnConfig(), cfg.seed

    def __call__(self, method: torch.nn.Module) -> dict[str, float]:
        from ssl_zoo.evaluation.protocols import knn

        was_training = method.training
        method.eval()
        device = next(method.parameters()).device
        try:
            train, _ = compute_features(method.extract_features, self.train, self.mean, self.std, device=device)
            test, _ = compute_features(method.extract_features, self.test, self.mean, self.std, device=device)
        finally:
            method.train(was_training)
        scores = knn(self.section, train["pooled"], self.train.labels, test["pooled"], self.test.labels,
                     self.train.num_classes, self.seed)
        return {f"eval_knn_{k}": v for k, v in scores.items()}
