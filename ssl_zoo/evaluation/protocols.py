"""The frozen-feature protocols: weighted kNN (DINO's) and a linear probe whose lr is picked on held-out
training data. Both take feature tensors, so any backbone (or any extractor) is scored the same way."""
from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Any, Optional

import torch
import torch.nn.functional as F

from ssl_zoo.registry import Registry
from ssl_zoo.schema import Limits, checked

#: `protocol=` options; a registered schema types the `protocol` section (the fine-tune one lives in finetune.py)
PROTOCOLS: Registry[Any] = Registry("protocol", group="protocol")


@dataclasses.dataclass
class KnnConfig:
    name: str = "knn"
    k: int = checked(20, ge=1)
    temperature: float = checked(0.07, gt=0)
    batch_size: int = checked(128, ge=1)  # images per feature-extraction batch
    baseline: bool = True  # also score the same architecture at random init, printed beside


@dataclasses.dataclass
class LinearConfig:
    name: str = "linear"
    block: Optional[int] = checked(None, ge=1)  # 1-based block whose [CLS] + mean patch token is probed; None: the last
    lrs: list[float] = checked(lambda: [1e-3, 3e-3, 1e-2, 3e-2], min_length=1, each=Limits(gt=0))
    holdout: float = checked(0.2, gt=0, lt=1)  # share of the training split the lr is picked on
    epochs: int = checked(200, ge=1)
    head_batch_size: int = checked(0, ge=0)  # 0: full batch (one step per epoch)
    weight_decay: float = checked(1e-4, ge=0)
    batch_size: int = checked(128, ge=1)
    baseline: bool = True


def top_k_accuracies(scores: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """top-1, and top-5 where there are more than 5 classes."""
    result = {"top1": (scores.argmax(dim=1) == labels).float().mean().item()}
    if scores.shape[1] > 5:
        top5 = scores.topk(5, dim=1).indices
        result["top5"] = (top5 == labels[:, None]).any(dim=1).float().mean().item()
    return result


def knn_scores(train: torch.Tensor, train_labels: torch.Tensor, test: torch.Tensor, num_classes: int,
               k: int = 20, temperature: float = 0.07, chunk: int = 1024) -> torch.Tensor:
    """Class scores of each test feature: its k nearest training features by cosine similarity, each voting
    for its label with weight exp(similarity / T)."""
    train, test = F.normalize(train, dim=1), F.normalize(test, dim=1)
    k = min(k, len(train))
    scores = []
    for part in test.split(chunk):
        similarity, index = (part @ train.T).topk(k, dim=1)
        weights = (similarity / temperature).exp()
        votes = torch.zeros(len(part), num_classes).scatter_add_(1, train_labels[index], weights)
        scores.append(votes)
    return torch.cat(scores)


@PROTOCOLS.register("knn", schema=KnnConfig)
def knn(section: Any, train: torch.Tensor, train_labels: torch.Tensor, test: torch.Tensor,
        test_labels: torch.Tensor, num_classes: int, seed: int) -> dict[str, float]:
    return top_k_accuracies(knn_scores(train, train_labels, test, num_classes, section.k, section.temperature),
                            test_labels)


@contextlib.contextmanager
def one_thread():
    """Tiny ops (a linear head on a few thousand features) lose more to thread hand-offs than they gain: on a
    busy 2-core machine a step took 60-110 ms on 2 threads and 5 ms on one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _fit_head(features: torch.Tensor, labels: torch.Tensor, num_classes: int, lr: float, section: Any,
              seed: int) -> torch.nn.Linear:
    """AdamW on a linear head, cosine lr over `epochs`; full determinism from `seed`."""
    gen = torch.Generator().manual_seed(seed)
    head = torch.nn.Linear(features.shape[1], num_classes)
    with torch.no_grad():
        head.weight.normal_(0, 0.01, generator=gen)
        head.bias.zero_()
    batch_size = section.head_batch_size or len(features)
    steps_per_epoch = math.ceil(len(features) / batch_size)
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=section.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, section.epochs * steps_per_epoch)
    for _ in range(section.epochs):
        for batch in torch.randperm(len(features), generator=gen).split(batch_size):
            loss = F.cross_entropy(head(features[batch]), labels[batch])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return head


@PROTOCOLS.register("linear", schema=LinearConfig)
def linear(section: Any, train: torch.Tensor, train_labels: torch.Tensor, test: torch.Tensor,
           test_labels: torch.Tensor, num_classes: int, seed: int) -> dict[str, float]:
    """Standardise with the training statistics (MAE's BatchNorm without affine, frozen), pick the lr on a
    held-out share of the training split, refit on all of it, score the test split once."""
    mean, std = train.mean(dim=0), train.std(dim=0) + 1e-6
    train, test = (train - mean) / std, (test - mean) / std
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))
    n_held = max(1, int(len(train) * section.holdout))
    held, fit = order[:n_held], order[n_held:]
    sweep = {}
    with one_thread():
        for lr in section.lrs:
            head = _fit_head(train[fit], train_labels[fit], num_classes, lr, section, seed)
            with torch.no_grad():
                sweep[lr] = top_k_accuracies(head(train[held]), train_labels[held])["top1"]
        best = max(sweep, key=lambda lr: (sweep[lr], -lr))
        head = _fit_head(train, train_labels, num_classes, best, section, seed)
        with torch.no_grad():
            result = top_k_accuracies(head(test), test_labels)
    return {**result, "lr": best, **{f"holdout_top1_lr{lr:g}": acc for lr, acc in sweep.items()}}


#: the frozen-feature protocols and the feature kind (ssl_zoo/evaluation/features.py) each scores
FEATURE_KIND = {"knn": "pooled", "linear": "tokens"}
