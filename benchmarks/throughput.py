"""Throughput benchmark of the pretraining step: `python -m benchmarks.throughput [options] [overrides]`.

Takes the same config overrides as `python -m ssl_zoo.run` (default: `method=peco model=beit_base
data=synthetic` with the paper-size tokenizer and BEiT's 224 px mask) and measures, in one run:

- the main case (CPU: ViT-B/16 224 px, batch 32, fp32; GPU: batch 64, bf16): images/s of the whole step and
  of its parts, peak memory, FLOPs per image (fvcore + attention), achieved FLOP/s against fp32 and bf16
  matmul rates measured in the same run (and MFU against the GPU's peak);
- fused (`ssl_zoo_kernels`) against unfused (materialised distances and logits): the same model, their
  steps alternating in one process (A B, then B A, ...), so load bursts hit both;
- a batch-size sweep, fp32 against bf16, eager against torch.compile and steps with activation checkpointing
  against steps without (alternating on one model) at a smaller model; model sizes;
- per-GPU memory of the model states of ViT-H/14 under ZeRO 1-3 from DeepSpeed's estimators.

Every group of cases runs in its own process (`benchmarks.throughput_step`), so its peak memory is its own
(the fused and unfused main steps share one; their peaks are read per step).
Writes a JSON report (`benchmarks/results/throughput-<date>.json` or `--out`), a PNG plot beside it, and
appends a markdown table with machine, command and date to `benchmarks/RESULTS.md` (unless `--no-append`).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.throughput_memory import MALLOC_ENV
from benchmarks.throughput_report import markdown, plot

ROOT = Path(__file__).resolve().parent
BASE = ["method=peco", "model=beit_base", "data=synthetic"]
#: the paper's tokenizer (VQGAN f=16 encoder of width 128, 8192 codes x 256), random weights
PAPER_TOKENIZER = ["method.tokenizer.autoencoder.channel_mult=[1,1,2,2,4]",
                   "method.tokenizer.autoencoder.base_width=128", "method.tokenizer.autoencoder.num_res_blocks=2",
                   "method.tokenizer.autoencoder.z_channels=256", "method.tokenizer.autoencoder.norm_groups=32",
                   "method.tokenizer.quantizer.num_codes=8192", "method.tokenizer.quantizer.dim=256"]
MASK_224 = ["method.mask.num_masked=75", "method.mask.min_block=16"]  # BEiT at 224 px: 75 of 196
ZERO_MODEL = ["method=peco", "model=beit_huge", "strategy=deepspeed", "trainer.precision=bf16"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    gpu = torch.cuda.is_available()
    p = argparse.ArgumentParser(prog="python -m benchmarks.throughput", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*", help="config overrides of the main case, as for python -m ssl_zoo.run "
                   f"(applied after {' '.join(BASE)}, the paper tokenizer and, unless model= is given, BEiT's 224 px mask "
                   "75 of 196)")
    p.add_argument("--batch", type=int, default=64 if gpu else 32, help="main case batch size (default: %(default)s)")
    p.add_argument("--precision", default="bf16" if gpu else "fp32", help="main case trainer.precision (%(default)s)")
    p.add_argument("--main-warmup", type=int, default=2 if gpu else 1, help="untimed steps of the main case")
    p.add_argument("--main-warmup-batch", type=int, default=0 if gpu else 2,
                   help="images per warm-up step of the main case after the first, which always takes the full "
                        "batch; 0 = the full batch (CPU default 2: a ViT-B step takes over a minute)")
    p.add_argument("--main-repeats", type=int, default=10 if gpu else 2,
                   help="timed rounds of the main case (one fused and one unfused step each, order flipping "
                        "every round), medians reported (CPU default 2, one A B B A cycle: a ViT-B step takes over a minute)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps of every other case (%(default)s)")
    p.add_argument("--repeats", type=int, default=3, help="timed steps of every other case (%(default)s)")
    p.add_argument("--no-paper-tokenizer", action="store_true",
                   help="main case: keep the config's tokenizer size instead of the paper's (8192 x 256, width 128)")
    p.add_argument("--sweep-model", default="beit_base" if gpu else "beit_tiny",
                   help="model of the batch sweep and of the precision and compile comparisons (%(default)s)")
    p.add_argument("--sweep-batches", default="32,64,128,256" if gpu else "8,16,32,64",
                   help="comma-separated batch sizes of the sweep; the compile and precision comparisons use the "
                        "middle one (%(default)s); empty: no sweep")
    p.add_argument("--sizes", default="beit_tiny,beit_small,beit_base,beit_large,beit_huge" if gpu else
                   "beit_tiny,beit_small,beit_base", help="models timed at 224 px and --sizes-batch (%(default)s)")
    p.add_argument("--sizes-batch", type=int, default=8 if gpu else 2, help="batch of the model-size cases")
    p.add_argument("--matmul-size", type=int, default=8192 if gpu else 2048,
                   help="side of the square matmul whose fp32 and bf16 rates are measured (%(default)s)")
    p.add_argument("--no-compile", action="store_true", help="skip eager vs torch.compile (CPU: ~1-2 min compile)")
    p.add_argument("--no-unfused", action="store_true", help="skip the unfused baseline")
    p.add_argument("--no-recompute", action="store_true",
                   help="skip steps with activation checkpointing against steps without (sweep model, middle batch)")
    p.add_argument("--no-zero", action="store_true", help="skip the ZeRO memory estimates (imports DeepSpeed)")
    p.add_argument("--zero-gpus", type=int, default=8, help="GPUs per node of the ZeRO estimate (%(default)s)")
    p.add_argument("--out", type=Path, default=None,
                   help="JSON report path (default: benchmarks/results/throughput-<date>.json); the PNG goes beside it")
    p.add_argument("--no-append", action="store_true", help="do not append the table to benchmarks/RESULTS.md")
    p.add_argument("--in-process", action="store_true",
                   help="run every case in this process (quick checks: peak memory is then not per variant)")
    p.add_argument("--results-md", type=Path, default=ROOT / "RESULTS.md", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def run_worker(cases: list[dict[str, Any]], in_process: bool = False) -> list[dict[str, Any]]:
    """Run cases in a fresh process (with the allocator settings of throughput_memory); its JSON result."""
    if in_process:
        from benchmarks.throughput_step import run_cases

        return json.loads(json.dumps(run_cases(cases)))  # the same plain data as from a worker
    env = {**os.environ, **MALLOC_ENV}
    cmd = [sys.executable, "-m", "benchmarks.throughput_step", json.dumps({"cases": cases})]
    done = subprocess.run(cmd, cwd=ROOT.parent, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"benchmark worker failed ({[c['name'] for c in cases]}):\n{done.stderr[-4000:]}")
    print(f"  done: {', '.join(c['name'] for c in cases)}", file=sys.stderr, flush=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def zero_estimates(stages: tuple[int, ...], gpus: int, tokenizer: list[str]) -> list[dict[str, Any]]:
    """Per-GPU model-state memory of PeCo ViT-H/14 (paper tokenizer, frozen) under each ZeRO stage, 1 node."""
    import tempfile

    from benchmarks.throughput_step import _random_tokenizer
    from ssl_zoo.config import load_config
    from ssl_zoo.engine.deepspeed_strategy import estimate_memory

    rows = []
    with tempfile.TemporaryDirectory() as folder:
        base = [*ZERO_MODEL, *tokenizer]
        path = _random_tokenizer(load_config(base), Path(folder))
        for stage in stages:
            cfg = load_config([*base, f"strategy.zero_stage={stage}", f"method.tokenizer.checkpoint='{path}'"])
            rows.append({"gpus_per_node": gpus, **estimate_memory(cfg, nodes=1, gpus_per_node=gpus)})
    return rows


def machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name:"):
                cpu = line.split(":", 1)[1].strip()
    except FileNotFoundError:
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(), "load_avg_1min_start": os.getloadavg()[0]}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def ratio(a: float | None, b: float | None) -> float | None:
    """a / b, or None where either is unknown or b is 0 (a part that added no page of memory)."""
    return None if a is None or not b else a / b


def plan(args: argparse.Namespace) -> dict[str, list[dict[str, Any]]]:
    """The worker processes to start, each a list of cases."""
    tokenizer = [] if args.no_paper_tokenizer else PAPER_TOKENIZER
    mask = [] if any(o.startswith("model=") for o in args.overrides) else MASK_224  # another model: its own mask
    main = [*BASE, *tokenizer, *mask, *args.overrides, f"trainer.batch_size={args.batch}",
            f"trainer.precision={args.precision}"]
    jobs: dict[str, list[dict[str, Any]]] = {
        "rates": [{"name": "rates", "kind": "rates", "overrides": [*main[:-2], "trainer.batch_size=1"],
                   "matmul_size": args.matmul_size}],
        "main": [{"name": "main", "variants": ["fused"] if args.no_unfused else ["fused", "unfused"],
                  "overrides": main, "warmup": args.main_warmup, "repeats": args.main_repeats, "parts": True,
                  "warmup_batch": args.main_warmup_batch or None}],
    }
    small = ["method=peco", f"model={args.sweep_model}", "data=synthetic", *args.overrides]
    if args.sweep_model in ("beit_base", "beit_large", "beit_huge"):
        small += [*tokenizer, *MASK_224]
    batches = [int(b) for b in args.sweep_batches.split(",") if b]
    if batches:
        def case(name: str, batch: int, *extra: str) -> dict[str, Any]:
            return {"name": name, "overrides": [*small, f"trainer.batch_size={batch}", *extra],
                    "warmup": args.warmup, "repeats": args.repeats}

        middle = batches[len(batches) // 2]
        jobs["sweep"] = [case(f"sweep_b{b}", b, f"trainer.precision={args.precision}") for b in batches]
        jobs["precision"] = [case("fp32", middle, "trainer.precision=fp32"), case("bf16", middle, "trainer.precision=bf16")]
        if not args.no_compile:
            jobs["compile"] = [case("compiled", middle, f"trainer.precision={args.precision}", "trainer.compile=true")]
        if not args.no_recompute:
            jobs["recompute"] = [{**case("recompute", middle, f"trainer.precision={args.precision}"),
                                  "variants": ["fused", "recompute"], "parts": True}]
    jobs["sizes"] = [{"name": f"size_{m}", "overrides": ["method=peco", f"model={m}", "data=synthetic", "model.img_size=224",
                                                         *MASK_224, f"trainer.batch_size={args.sizes_batch}",
                                                         f"trainer.precision={args.precision}"],
                      "warmup": args.warmup, "repeats": args.repeats} for m in args.sizes.split(",") if m]
    return {k: v for k, v in jobs.items() if v}


def summarise(results: dict[str, list[dict[str, Any]]], args: argparse.Namespace) -> dict[str, Any]:
    """The report: raw results plus the ratios the issue asks for."""
    rates_flops = results["rates"][0]
    rates, flops = rates_flops["rates"], rates_flops["flops"]
    by_variant = {r["variant"]: r for r in results["main"]}
    fused = by_variant["fused"]
    achieved = flops["step_per_image"] * fused["images_per_s"]
    report: dict[str, Any] = {
        "rates": rates, "flops": flops,
        "main": {"fused": fused, "achieved_flops": achieved,
                 "achieved_over_matmul_fp32": ratio(achieved, rates["matmul_fp32_flops"]),
                 "achieved_over_matmul_bf16": ratio(achieved, rates["matmul_bf16_flops"]),
                 "mfu": ratio(achieved, rates["device_peak_bf16_flops"]),
                 "part_flops": {k: flops["per_image"][k] * fused["parts"][k]["images_per_s"]
                                for k in flops["per_image"] if k in fused.get("parts", {})}},
    }
    if "unfused" in by_variant:
        unfused = by_variant["unfused"]
        report["main"]["unfused"] = unfused
        report["main"]["fused_vs_unfused"] = {
            "step_speedup": ratio(fused["images_per_s"], unfused["images_per_s"]),
            # per round of the alternation (fused and unfused steps run back to back): unfused s / fused s
            "round_speedups": [u / f for f, u in zip(fused["step_times_s"], unfused["step_times_s"])],
            "head_loss_memory_ratio": ratio(fused["parts"]["head_loss"]["added_mib"],
                                            unfused["parts"]["head_loss"]["added_mib"]),
            "head_loss_speedup": ratio(unfused["parts"]["head_loss"]["s"], fused["parts"]["head_loss"]["s"]),
            "tokenizer_memory_ratio": ratio(fused["parts"]["tokenizer"]["added_mib"],
                                            unfused["parts"]["tokenizer"]["added_mib"]),
            "tokenizer_speedup": ratio(unfused["parts"]["tokenizer"]["s"], fused["parts"]["tokenizer"]["s"]),
            "peak_memory_ratio": ratio(fused["peak_mib"], unfused["peak_mib"]),
        }
    report["sweep"] = results.get("sweep", [])
    by_name = {r["name"]: r for r in results.get("precision", []) + results.get("compile", [])}
    if "bf16" in by_name:
        report["precision"] = {"fp32": by_name["fp32"], "bf16": by_name["bf16"],
                               "bf16_speedup": ratio(by_name["bf16"]["images_per_s"], by_name["fp32"]["images_per_s"])}
    if "compiled" in by_name and args.precision in by_name:
        eager = by_name[args.precision]
        report["compile"] = {"eager": eager, "compiled": by_name["compiled"],
                             "compile_speedup": ratio(by_name["compiled"]["images_per_s"], eager["images_per_s"]),
                             "compile_s": by_name["compiled"]["compile_s"]}
    if "recompute" in results:
        by_variant = {r["variant"]: r for r in results["recompute"]}
        plain, recompute = by_variant["fused"], by_variant["recompute"]
        report["recompute"] = {
            "plain": plain, "recompute": recompute,
            "backbone_forward_memory_ratio": ratio(recompute["parts"]["backbone_forward"]["added_mib"],
                                                   plain["parts"]["backbone_forward"]["added_mib"]),
            "peak_memory_ratio": ratio(recompute["peak_mib"], plain["peak_mib"]),
            "step_time_ratio": ratio(recompute["step_s"], plain["step_s"]),
            "backbone_backward_time_ratio": ratio(recompute["parts"]["backbone_backward"]["s"],
                                                  plain["parts"]["backbone_backward"]["s"]),
        }
    report["sizes"] = results.get("sizes", [])
    return report


def main(argv: list[str] | None = None) -> dict[str, Any]:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    started, now = time.perf_counter(), datetime.datetime.now()
    info = machine()
    results = {}
    for name, cases in plan(args).items():
        print(f"running {name} ...", file=sys.stderr, flush=True)
        results[name] = run_worker(cases, args.in_process)
    report = {"command": f"python -m benchmarks.throughput {shlex.join(argv)}".rstrip(), "date": now.isoformat(timespec="seconds"),
              "machine": info, **summarise(results, args)}
    if not args.no_zero:
        report["zero"] = zero_estimates((1, 2, 3), args.zero_gpus, [] if args.no_paper_tokenizer else PAPER_TOKENIZER)
    report["wall_s"] = time.perf_counter() - started
    out = args.out or ROOT / "results" / f"throughput-{now:%Y%m%d-%H%M%S}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    png = out.with_suffix(".png")
    report["plot"] = plot(report, png)
    publish(report, out, markdown(report, out, png), None if args.no_append else args.results_md)
    return report


def publish(report: dict, out: Path, table: str, results_md: Path | None) -> None:
    """The report as JSON at `out`, its table printed and, unless `results_md` is None, appended there."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print(table)
    if results_md is not None:
        with results_md.open("a") as f:
            f.write("\n" + table)


if __name__ == "__main__":
    main()
