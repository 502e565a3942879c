"""Worker of the throughput benchmark: times the real pretraining step of a config, and its parts.

    python -m benchmarks.throughput_step '{"cases": [{"name": ..., "overrides": [...], ...}]}'

prints one JSON line: a list of results, one per case, run one after another in this process (the parent
starts a fresh process for every group of cases whose peak memory must be its own).

The step is the product's own: the method comes from the registry, the optimiser step from the core's
strategy (`build_strategy`, so `trainer.precision` and `trainer.compile` act as in training), the batch
from the configured dataset and the method's transform. One batch is drawn and reused, so data loading
is not timed. A PeCo method without `method.tokenizer.checkpoint` gets a tokenizer with random weights of
the configured size: its cost does not depend on the weights.

The parts are read from marks set by wrappers around the tokenizer's `tokenize`, the backbone's
`forward_mim`, `ssl_zoo_kernels.masked_linear_cross_entropy` (plus gradient hooks on its input and output,
and a callback at the end of backward), all inside this process only; on a GPU every mark synchronises.
Variant "unfused" swaps the two fused ops of `ssl_zoo_kernels` for the naive versions below (full N x K
distances + argmin; full logits + F.cross_entropy), again in this process only.
"""
from __future__ import annotations

import contextlib
import gc
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import ssl_zoo_kernels
import torch
import torch.nn.functional as F

from benchmarks.throughput_memory import MemoryProbe
from ssl_zoo.config import load_config
from ssl_zoo.data.loader import make_loader
from ssl_zoo.data.transforms import DefaultTransform
from ssl_zoo.engine.strategy import build_strategy, resolve_precision, set_activation_checkpointing
from ssl_zoo.registry import DATASETS, METHODS
from ssl_zoo.train import pick_device, seed_everything, to_device

PARTS = ("tokenizer", "backbone_forward", "head_loss", "backbone_backward", "optimizer", "other")


def naive_vq_nearest(z: torch.Tensor, codebook: torch.Tensor, metric: str = "l2", **_: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """The unfused lookup: the whole N x K distance (or similarity) matrix, then argmin."""
    if metric == "cosine":
        values, indices = (F.normalize(z, dim=1) @ F.normalize(codebook, dim=1).T).max(1)
        return indices, values
    distances = z.pow(2).sum(1, keepdim=True) - 2 * z @ codebook.T + codebook.pow(2).sum(1)
    values, indices = distances.min(1)
    return indices, values.clamp_min(0)


def naive_masked_linear_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
    mask: torch.Tensor | None = None, label_smoothing: float = 0.0, return_accuracy: bool = False, **_: Any,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The unfused head and loss: full logits of the masked rows, then F.cross_entropy (eager autograd)."""
    rows, labels = (hidden[mask], targets[mask]) if mask is not None else (hidden.flatten(0, -2), targets.flatten())
    logits = F.linear(rows, weight, bias)
    loss = F.cross_entropy(logits.float(), labels, label_smoothing=label_smoothing)
    if not return_accuracy:
        return loss
    return loss, (logits.argmax(1) == labels).float().mean().detach()


@contextlib.contextmanager
def patched(obj: Any, name: str, value: Any) -> Iterator[None]:
    original = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, original)


@contextlib.contextmanager
def unfused_ops() -> Iterator[None]:
    """Swap the fused ops for the naive ones; PeCo's modules call them as `ssl_zoo_kernels.<name>`."""
    with patched(ssl_zoo_kernels, "vq_nearest", naive_vq_nearest), \
            patched(ssl_zoo_kernels, "masked_linear_cross_entropy", naive_masked_linear_cross_entropy):
        yield


@contextlib.contextmanager
def recomputed_activations(method: Any) -> Iterator[None]:
    """Activation checkpointing on (what `trainer.activation_checkpointing` turns on) for the steps inside,
    so steps with and without it can alternate on one model."""
    set_activation_checkpointing(method, True)
    try:
        yield
    finally:
        set_activation_checkpointing(method, False)


class StepClock:
    """Marks inside one training step -> seconds and peak memory of each part.

    tokenizer: `tokenize` (encoder + codebook lookup); backbone_forward: `forward_mim`; head_loss: the
    loss call and its backward, up to the gradient of its input; backbone_backward: from there to the end
    of backward; optimizer: clipping, optimiser and scheduler step (end of backward -> end of step);
    other: the rest of the step (slicing, `.item()`, checks). Memory of a part: the most it added on top
    of what was alive at its start; head_loss also counts what its forward left alive for the backward.
    """

    def __init__(self, method: Any, device: torch.device) -> None:
        self.device, self.probe = device, MemoryProbe(device)
        self.marks: dict[str, float] = {}
        self.memory: dict[str, float] = {}
        self._base: dict[str, float] = {}
        self.peak_seen = 0.0  # highest peak read before a reset since the caller last zeroed it
        self.installed = hasattr(method, "tokenizer") and hasattr(method.backbone, "forward_mim")
        if self.installed:
            method.tokenizer.tokenize = self._timed("tokenizer", method.tokenizer.tokenize)
            method.backbone.forward_mim = self._timed("backbone_forward", method.backbone.forward_mim)

    def mark(self, name: str, reset: bool = False) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        self.marks[name] = time.perf_counter()
        part = name.rsplit(":", 1)[0]
        if name.endswith(":end") and part in self._base:
            self.memory[part] = self.probe.peak() - self._base[part]
        if reset:  # the peak being forgotten still counts towards the step's peak
            self.peak_seen = max(self.peak_seen, self.probe.peak())
            self._base[part] = self.probe.reset()

    def _timed(self, part: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            self.mark(f"{part}:start", reset=True)
            out = fn(*args, **kwargs)
            self.mark(f"{part}:end")
            return out
        return wrapper

    @contextlib.contextmanager
    def loss_marks(self) -> Iterator[None]:
        """Wrap whichever loss function is installed now (fused or naive) with the head_loss marks."""
        loss_fn = ssl_zoo_kernels.masked_linear_cross_entropy

        def wrapper(hidden: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            self.mark("head_fwd:start", reset=True)
            out = loss_fn(hidden, *args, **kwargs)
            self.mark("head_fwd:end")
            self.memory["head_fwd_kept"] = self.probe.current() - self._base["head_fwd"]
            loss = out[0] if isinstance(out, tuple) else out
            loss.register_hook(self._backward_started)
            hidden.register_hook(lambda grad: self.mark("head_bwd:end"))
            return out

        with patched(ssl_zoo_kernels, "masked_linear_cross_entropy", wrapper):
            yield

    def _backward_started(self, grad: torch.Tensor) -> None:
        self.mark("head_bwd:start", reset=True)
        torch.autograd.Variable._execution_engine.queue_callback(lambda: self.mark("backward:end"))

    def parts(self, start: float, end: float) -> tuple[dict[str, float], dict[str, float]]:
        """(seconds, added MiB) per part of the step that ran between `start` and `end`."""
        m = self.marks

        def span(part: str) -> float:
            return m[f"{part}:end"] - m[f"{part}:start"]

        seconds = {
            "tokenizer": span("tokenizer"),
            "backbone_forward": span("backbone_forward"),
            "head_loss": span("head_fwd") + span("head_bwd"),
            "backbone_backward": m["backward:end"] - m["head_bwd:end"],
            "optimizer": end - m["backward:end"],
        }
        seconds["other"] = max(0.0, end - start - sum(seconds.values()))
        memory = {"tokenizer": self.memory["tokenizer"], "backbone_forward": self.memory["backbone_forward"],
                  "head_loss": max(self.memory["head_fwd"], self.memory["head_fwd_kept"] + self.memory["head_bwd"])}
        return seconds, memory


def _random_tokenizer(cfg: Any, folder: Path) -> str:
    """A tokenizer of the configured size with random weights, saved where `method.tokenizer.checkpoint`
    can point: the method then builds exactly as in training, with no stage-1 run."""
    from safetensors.torch import save_file
    from ssl_zoo_peco.config import tokenizer_image_size
    from ssl_zoo_peco.vqgan import VQTokenizer

    tokenizer = VQTokenizer(cfg.method.tokenizer, tokenizer_image_size(cfg))
    path = folder / "tokenizer.safetensors"
    save_file({k: v.contiguous() for k, v in tokenizer.state_dict().items()}, str(path))
    return str(path)


def build(overrides: list[str], folder: Path) -> tuple[Any, Any, Any, dict[str, Any], torch.device]:
    """(config, method, strategy, one batch on the device, device) for a list of config overrides."""
    cfg = load_config(overrides)
    tokenizer = getattr(cfg.method, "tokenizer", None)
    if tokenizer is not None and getattr(tokenizer, "checkpoint", "") is None:
        cfg = load_config([*overrides, f"method.tokenizer.checkpoint='{_random_tokenizer(cfg, folder)}'"])
    device = pick_device(cfg.trainer.device)
    seed_everything(cfg.seed)
    method_cls = METHODS.get(cfg.method.name)
    method = method_cls(cfg)
    strategy = build_strategy(cfg, method, device)
    transform = method_cls.make_transform(cfg) or DefaultTransform(cfg.data.image_size)
    dataset = DATASETS.build(cfg.data, transform, cfg.seed)
    batch = next(make_loader(dataset, cfg.trainer.batch_size, cfg.data.num_workers, cfg.seed, 0, 1, 0))
    return cfg, method, strategy, to_device(batch, device), device


def first_images(batch: dict[str, Any], count: int) -> dict[str, Any]:
    """The batch cut to its first `count` samples (a cheap warm-up step of a large case)."""
    return {k: v[:count] if torch.is_tensor(v) and v.dim() > 0 else v for k, v in batch.items()}


def schedule(variants: list[str], warmup: int, repeats: int) -> list[tuple[str, bool]]:
    """(variant, timed) for every step: each variant's warm-ups, then `repeats` timed rounds in which the
    variants alternate, the order flipping each round (A B, B A, ...) so neither always runs first."""
    steps = [(v, False) for v in variants for _ in range(warmup)]
    for r in range(repeats):
        steps += [(v, True) for v in (variants if r % 2 == 0 else variants[::-1])]
    return steps


def _summary(times: list[float], parts: list[dict[str, float]], part_memory: list[dict[str, float]],
             batch_size: int) -> dict[str, Any]:
    median = statistics.median(times)
    out: dict[str, Any] = {"step_s": median, "step_times_s": times, "images_per_s": batch_size / median}
    if parts:
        out["parts"] = {
            name: {"s": statistics.median(p[name] for p in parts),
                   "images_per_s": batch_size / max(statistics.median(p[name] for p in parts), 1e-12),
                   **({"added_mib": max(m[name] for m in part_memory)} if name in part_memory[0] else {})}
            for name in PARTS
        }
    return out


def run_case(case: dict[str, Any], folder: Path) -> list[dict[str, Any]]:
    """Warm-up steps, then `repeats` timed steps; medians of the step and of its parts (eager only).

    `variants` (default: the one `variant`, else "fused") run on one model in this process, alternating
    step by step (see `schedule`), so a load burst on the machine hits both and their ratio holds up;
    each variant's peak memory is read per step (the peak is reset before every step), and a part's memory
    is what it added on top of what was alive at its start. One result per variant.

    `warmup_batch` (optional) runs every warm-up step but the first on that many images only. The first
    runs at the full batch because the CPU libraries build kernels per shape on first use (oneDNN
    convolution primitives and the like): a run warmed up only on small batches measured its first full
    step ~20% slower than the next. The other variants share those shapes, so their warm-up only has to
    reach their own lazy state, and on CPU a ViT-B step takes over a minute. Compiled cases always warm
    up at the full batch.
    """
    variants = case.get("variants") or [case.get("variant", "fused")]
    cfg, method, strategy, batch, device = build(case["overrides"], folder)
    probe = MemoryProbe(device)
    clock = StepClock(method, device) if case.get("parts", False) and not cfg.trainer.compile else None
    base = probe.reset()
    runs = {v: {"times": [], "parts": [], "memory": [], "peak": 0.0} for v in variants}
    compile_s = None
    steps = schedule(variants, case["warmup"], case["repeats"])
    for step, (variant, timed) in enumerate(steps):
        run = runs[variant]
        if variant == "unfused":
            ops = unfused_ops()
        elif variant == "recompute":
            ops = recomputed_activations(method)
        else:
            ops = contextlib.nullcontext()
        warm_batch = case.get("warmup_batch") if not timed and step > 0 and not cfg.trainer.compile else None
        with ops, (clock.loss_marks() if clock and clock.installed else contextlib.nullcontext()):
            probe.reset()
            if clock:
                clock.peak_seen = 0.0
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            result = strategy.step([first_images(batch, warm_batch) if warm_batch else batch], step)
            if device.type == "cuda":
                torch.cuda.synchronize()
            end = time.perf_counter()
        if step == 0 and cfg.trainer.compile:
            compile_s = end - start  # the first compiled step traces and compiles
        run["peak"] = max(run["peak"], probe.peak(), clock.peak_seen if clock else 0.0)
        run["loss"] = float(result.loss)
        if not timed:
            continue
        run["times"].append(end - start)
        if clock and clock.installed:
            seconds, memory = clock.parts(start, end)
            run["parts"].append(seconds)
            run["memory"].append(memory)
    batch_size = cfg.trainer.batch_size
    common = {
        "overrides": case["overrides"], "device": device.type,
        "model": {k: cfg.model[k] for k in ("img_size", "patch_size", "embed_dim", "depth") if k in cfg.model},
        "batch_size": batch_size, "precision": str(resolve_precision(cfg.trainer.precision, device)).split(".")[-1],
        "compile": bool(cfg.trainer.compile), "warmup": case["warmup"], "warmup_batch": case.get("warmup_batch"),
        "repeats": case["repeats"], "start_mib": base, "compile_s": compile_s,
        "order": [v for v, timed in steps if timed],
    }
    out = [{"name": case["name"] if len(variants) == 1 else f"{case['name']}_{v}", "variant": v, **common,
            **_summary(run["times"], run["parts"], run["memory"], batch_size), "peak_mib": run["peak"],
            "loss": run["loss"]} for v, run in runs.items()]
    del method, strategy, batch
    gc.collect()
    return out


def rates_case(case: dict[str, Any], folder: Path) -> dict[str, Any]:
    """Matmul rates (fp32, bf16) of this device now, and the FLOPs per image of the config's step."""
    from benchmarks.flops import device_peak_flops, matmul_rate, step_flops

    cfg, method, _, batch, device = build(case["overrides"], folder)
    size = case["matmul_size"]
    rates = {"matmul_fp32_flops": matmul_rate(torch.float32, device, size),
             "matmul_bf16_flops": matmul_rate(torch.bfloat16, device, size),
             "matmul_size": size, "device_peak_bf16_flops": device_peak_flops(device),
             "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}
    return {"name": case["name"], "rates": rates, "flops": step_flops(method, batch)}


def run_cases(cases: list[dict[str, Any]]) -> list[dict[str, Any]]:
    with tempfile.TemporaryDirectory(prefix="ssl_zoo_bench_") as folder:
        results = []
        for case in cases:
            results += [rates_case(case, Path(folder))] if case.get("kind") == "rates" else run_case(case, Path(folder))
        return results


def main(argv: list[str]) -> None:
    print(json.dumps(run_cases(json.loads(argv[0])["cases"])))


if __name__ == "__main__":
    main(sys.argv[1:])
