"""Checks the per-rank memory model (`ssl_zoo.engine.memory_model`) against per-rank peaks measured on CPU.

    python -m benchmarks.memory_model [--models beit_tiny beit_small] [--stages 1 2 3] [--steps 3] [--out DIR]

Every case is a fresh pair of processes (2 ranks over gloo) training the real pretraining step (PeCo MIM on
a random-weight tokenizer of the configured size, synthetic images) through the real DeepSpeed engine for
`--steps` steps. Each rank measures the peak of the tensor memory its CPU allocator hands out from just before
the method is built (what `torch.cuda.max_memory_allocated` is on a GPU, and what the model counts): torch's
profiler with `profile_memory` reports every allocation with the running total, kept by the CPU allocator for
every thread (`_count_every_thread`). Resident memory (VmHWM over
the same window, with glibc told to map large blocks, `MALLOC_ENV`) is written beside it: it also holds what
no GPU would (oneDNN's and gloo's buffers, the Python heap) and, for DeepSpeed's buckets allocated whole, only
the pages written. `--zero` sets DeepSpeed `zero_optimization` keys for the run and the model alike (the
default shrinks the buckets to a size comparable with these small models, so that the rest is checked; `{}`
keeps DeepSpeed's defaults, whose 2 GB bucket then dominates). The model's figure comes from the parameter
counts of the built method, the model section and those keys, as the dry run computes it.
Prints a table and writes `memory_model-<time>.json`.
"""
from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import torch.multiprocessing as mp

from benchmarks.throughput_memory import MALLOC_ENV, MIB

#: model -> (overrides, per-rank micro-batch): sizes where activations and model states both matter
MODELS = {
    "beit_tiny": (["model=beit_tiny", "model.img_size=128"], 32),
    "beit_small": (["model=beit_small", "model.img_size=128"], 16),
}
#: the `zero_optimization` keys of the check (elements): buckets of a size comparable with ViT-Tiny/Small
SMALL_BUCKETS = {"reduce_bucket_size": 2_000_000, "allgather_bucket_size": 2_000_000,
                 "stage3_prefetch_bucket_size": 2_000_000}
BASE = ["method=peco", "data=synthetic", "data.image_size=128", "trainer.device=cpu", "strategy=deepspeed",
        "trainer.warmup_steps=1", "trainer.log_every=1", "method.mask.num_masked=26", "method.mask.min_block=4"]


def _rank(rank: int, world: int, port: int, case: dict[str, Any], out: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    import torch

    torch.set_num_threads(1)
    from benchmarks.throughput_memory import MemoryProbe
    from ssl_zoo.engine import deepspeed_strategy
    from benchmarks.throughput_step import _random_tokenizer
    from ssl_zoo.config import load_config
    from ssl_zoo.data.loader import make_loader
    from ssl_zoo.engine.deepspeed_strategy import _import_deepspeed, count_parameters
    from ssl_zoo.engine.memory_model import estimate
    from ssl_zoo.registry import DATASETS, METHODS
    from ssl_zoo.train import seed_everything

    cfg = load_config(case["overrides"])
    if rank == 0:
        _random_tokenizer(cfg, Path(out))
    device = torch.device("cpu")
    _import_deepspeed(device).init_distributed(dist_backend="gloo")
    torch.distributed.barrier()
    cfg = load_config([*case["overrides"], f"method.tokenizer.checkpoint='{Path(out) / 'tokenizer.safetensors'}'",
                       f"output_dir={out}/run"])
    method_cls = METHODS.get(cfg.method.name)
    dataset = DATASETS.build(cfg.data, method_cls.make_transform(cfg), cfg.seed)
    batch = next(make_loader(dataset, cfg.trainer.batch_size, 0, cfg.seed, rank, world, start=0))
    batch.pop("skipped_images", None)
    _warm_up(method_cls, cfg, batch)
    written = deepspeed_strategy.deepspeed_config

    def with_zero_keys(*args: Any, **kwargs: Any) -> dict[str, Any]:
        config = written(*args, **kwargs)
        config["zero_optimization"].update(case["zero"])
        return config

    deepspeed_strategy.deepspeed_config = with_zero_keys
    probe = MemoryProbe(device)
    baseline = probe.reset()
    with _count_every_thread(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                                        profile_memory=True) as prof:
        seed_everything(cfg.seed)
        method = method_cls(cfg)
        trainable, frozen, _ = count_parameters(method)
        from ssl_zoo.engine.strategy import build_strategy

        strategy = build_strategy(cfg, method, device)
        method.on_train_start(batch)
        for step in range(case["steps"]):
            strategy.step([batch], step)
    rss = (probe.peak() - baseline) * MIB
    measured = _allocated_peak(prof)
    trainer = cfg.trainer
    model = estimate(trainable, frozen, world, cfg.strategy.zero_stage, cfg.model, trainer.batch_size,
                     bf16=trainer.precision == "bf16", checkpointing=trainer.activation_checkpointing,
                     frozen_forward=method_cls.frozen_forward_bytes(cfg, trainer.batch_size), zero=case["zero"])
    result = {"rank": rank, "measured_mib": measured / MIB, "rss_mib": rss / MIB, "model_mib": model.total / MIB,
              "parts_mib": {k: (v or 0) / MIB for k, v in vars(model).items()}, "trainable": trainable,
              "frozen": frozen}
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))


@contextlib.contextmanager
def _count_every_thread() -> Iterator[None]:
    """Within it, the CPU allocator's running total counts frees on every thread, not only the profiled one.

    Under `profile_memory` alone, c10's `ProfiledCPUMemoryReporter` subtracts a freed block only when the free
    runs on a thread the profiler is enabled on. ZeRO-3's collectives are asynchronous: gloo's `Work` objects
    hold the all-gather and reduce-scatter buffers, and when the last reference goes on a gloo worker thread
    the block stays in the total for good (the peak then grew by a few times the parameters, varying by rank
    and run). Its flag `caffe2_report_cpu_memory_usage` makes the reporter keep the total for all threads;
    c10 exports it, and sets it nowhere else."""
    import ctypes

    import torch

    lib = ctypes.CDLL(str(Path(torch.__file__).parent / "lib" / "libc10.so"))
    flag = ctypes.c_bool.in_dll(lib, "FLAGS_caffe2_report_cpu_memory_usage")
    before, flag.value = flag.value, True
    try:
        yield
    finally:
        flag.value = before


def _allocated_peak(prof: Any) -> float:
    """The largest running total of allocated CPU tensor bytes over the profiled window (the total counts
    the blocks allocated inside it, on any thread; frees of earlier blocks are not subtracted)."""
    from torch._C._profiler import _EventType

    peak, stack = 0, list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        event = stack.pop()
        stack.extend(event.children)
        if event.tag == _EventType.Allocation:
            peak = max(peak, event.extra_fields.total_allocated)
    return float(peak)


def _warm_up(method_cls: Any, cfg: Any, batch: dict[str, Any]) -> None:
    """One plain training step of a throwaway copy of the method on 2 samples, before the baseline: the first
    use of a kernel maps its code and builds oneDNN primitives, resident memory a GPU would not count, and
    the Python objects of a built model are reused from the allocator's free lists by the measured build."""
    import gc

    import torch

    warm = method_cls(cfg).train()
    small = {k: v[:2] if torch.is_tensor(v) else v for k, v in batch.items()}
    warm.on_train_start(small)
    optimizer = torch.optim.AdamW([p for p in warm.parameters() if p.requires_grad])
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.trainer.precision == "bf16"):
        loss = warm(small, 0).loss
    loss.backward()
    optimizer.step()
    del warm, optimizer, loss
    gc.collect()


def run_case(case: dict[str, Any]) -> dict[str, Any]:
    from ssl_zoo.engine.distributed import free_port

    with tempfile.TemporaryDirectory() as out:
        mp.start_processes(_rank, args=(2, free_port(), case, out), nprocs=2, start_method="spawn")
        ranks = [json.loads(Path(out, f"rank{r}.json").read_text()) for r in (0, 1)]
    measured = max(r["measured_mib"] for r in ranks)
    return {**case, "measured_mib_per_rank": [round(r["measured_mib"], 1) for r in ranks],
            "rss_mib_per_rank": [round(r["rss_mib"], 1) for r in ranks],
            "model_mib": round(ranks[0]["model_mib"], 1), "parts_mib": ranks[0]["parts_mib"],
            "model_over_measured": round(ranks[0]["model_mib"] / measured, 3),
            "trainable": ranks[0]["trainable"], "frozen": ranks[0]["frozen"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.memory_model", description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--stages", nargs="+", type=int, default=[1, 2, 3])
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"])
    parser.add_argument("--recompute", nargs="+", default=["false", "true"])
    parser.add_argument("--batch", type=int, help="per-rank micro-batch for every model (default: the model's)")
    parser.add_argument("--steps", type=int, default=3, help="training steps per case (the first creates Adam)")
    parser.add_argument("--zero", type=json.loads, default=SMALL_BUCKETS,
                        help="DeepSpeed zero_optimization keys as JSON, for the runs and the model (default: "
                             f"{json.dumps(SMALL_BUCKETS)}; '{{}}': DeepSpeed's defaults)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    os.environ.update(MALLOC_ENV, DS_ACCELERATOR="cpu")  # inherited by the spawned ranks
    results = []
    print("| model | ZeRO | precision | recompute | measured MiB (rank 0, 1) | model MiB | model / measured |")
    print("|---|---|---|---|---|---|---|")
    for name, stage, precision, recompute in itertools.product(args.models, args.stages, args.precisions,
                                                               args.recompute):
        overrides, batch = MODELS[name]
        batch = args.batch or batch
        case = {"model": name, "zero_stage": stage, "precision": precision, "recompute": recompute == "true",
                "batch": batch, "steps": args.steps, "zero": args.zero,
                "overrides": [*BASE, *overrides, f"trainer.batch_size={batch}", f"strategy.zero_stage={stage}",
                              f"trainer.precision={precision}", f"trainer.activation_checkpointing={recompute}"]}
        result = run_case(case)
        results.append(result)
        print(f"| {name} | {stage} | {precision} | {recompute} | {result['measured_mib_per_rank']} | "
              f"{result['model_mib']} | {result['model_over_measured']} |", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"memory_model-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(results, indent=2) + "\n")
    worst = max(abs(r["model_over_measured"] - 1) for r in results)
    print(f"wrote {path}; largest deviation of the model from the measurement: {worst:.1%}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
