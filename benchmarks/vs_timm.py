"""The project's MIM step against timm's BEiT with a plainly written loss: `python -m benchmarks.vs_timm`.

Ours: PeCo stage 2 as it trains (`BeitMIM` backbone, `MimHead` with the fused
`ssl_zoo_kernels.masked_linear_cross_entropy`, the core strategy's step: optimiser, clipping, schedule), built
from the config like `python -m ssl_zoo.run method=peco`. The tokenizer's codes are computed once and
reused, so both sides run the same work: backbone forward and backward, head and loss, optimiser.

Theirs: `timm.create_model("beit_base_patch16_224")` (the same widths as our model section) with the masked-image
forward a user would write: mask token blended into the patch embeddings, [CLS], the blocks, the final norm,
`nn.Linear` on the masked tokens, `F.cross_entropy`, `torch.optim.AdamW` with its defaults, `torch.autocast`.

Per precision, the variants (ours and timm's, eager and, with `--compile`, compiled) run on their own models in
this process, their steps alternating with the order flipping each round, so a load burst on a shared machine
hits all of them; ratios are medians of the per-round time ratios. Achieved FLOP/s (fvcore, attention
included: 3 x the backbone forward plus 6 x H x V per masked token) are given as a share of the square-matmul
rate of the same precision measured in this run. Appends a table with machine, command and date to
benchmarks/RESULTS.md unless `--no-append`.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import timm
import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.flops import count_macs, matmul_rate
from benchmarks.kernels_cpu import median_interval
from benchmarks.throughput import machine, publish
from benchmarks.throughput_step import build, schedule

ROOT = Path(__file__).resolve().parent
#: ViT-B/16 at 224 px with BEiT's mask (75 of 196 patches) and an 8192-code vocabulary; the tokenizer's own
#: size does not matter (its codes are computed once)
BASE = ["method=peco", "model=beit_base", "data=synthetic", "method.mask.num_masked=75", "method.mask.min_block=16",
        "method.tokenizer.quantizer.num_codes=8192"]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


class PlainMim(nn.Module):
    """timm's BEiT with masked image modelling written the plain way (what a user writes in an afternoon)."""

    def __init__(self, model: Any, vocab_size: int) -> None:
        super().__init__()
        self.beit = timm.create_model(
            "beit_base_patch16_224", pretrained=False, num_classes=0, img_size=model.img_size,
            patch_size=model.patch_size, embed_dim=model.embed_dim, depth=model.depth, num_heads=model.num_heads,
            mlp_ratio=model.mlp_ratio, qkv_bias=model.qkv_bias, init_values=model.init_values,
            drop_path_rate=model.drop_path_rate)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, model.embed_dim))
        self.head = nn.Linear(model.embed_dim, vocab_size)

    def forward(self, images: torch.Tensor, mask: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        x = self.beit.patch_embed(images)
        w = mask.unsqueeze(-1).type_as(x)
        x = x * (1 - w) + self.mask_token * w
        x = torch.cat([self.beit.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        for block in self.beit.blocks:
            x = block(x)
        x = self.beit.norm(x)[:, 1:]
        return F.cross_entropy(self.head(x[mask]), targets[mask])


def timm_step(cfg: Any, vocab_size: int, batch: dict[str, Any], targets: torch.Tensor, dtype: torch.dtype,
              compiled: bool) -> Callable[[int], None]:
    torch.manual_seed(cfg.seed)
    model = PlainMim(cfg.model, vocab_size).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.trainer.lr)
    forward = torch.compile(model) if compiled else model
    images, mask = batch["image"], batch["mask"].flatten(1)

    def step(_: int) -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            loss = forward(images, mask, targets)
        loss.backward()
        optimizer.step()
    return step


def our_step(overrides: list[str], folder: Path) -> tuple[Any, Any, dict[str, Any], torch.Tensor, Callable[[int], None]]:
    """(config, method, batch, the tokenizer's codes of the batch, step) for the project's own step."""
    cfg, method, strategy, batch, _ = build(overrides, folder)
    with torch.no_grad():
        targets = method.tokenizer.tokenize(batch["tokenizer_view"].contiguous(memory_format=method.memory_format))
    method.tokenizer.tokenize = lambda view: targets  # both sides train on the same fixed codes
    return cfg, method, batch, targets, lambda i: strategy.step([batch], i)


def step_flops(method: Any, batch: dict[str, Any]) -> float:
    """FLOPs of one training step at this batch: 3 x the backbone forward + 6 x H x V per masked token."""
    image, mask = batch["image"][:1].float(), batch["mask"][:1].flatten(1)
    macs, _, _ = count_macs(method.backbone, "forward_mim", image, mask)
    masked = int(batch["mask"].sum())
    return 6.0 * macs * batch["image"].shape[0] + 6.0 * masked * method.head.in_features * method.head.out_features


def run_precision(args: argparse.Namespace, precision: str, folder: Path) -> dict[str, Any]:
    dtype = DTYPES[precision]
    common = [*BASE, f"trainer.batch_size={args.batch}", f"trainer.precision={precision}", *args.overrides]
    cfg, method, batch, targets, ours = our_step([*common, "trainer.compile=false"], folder)
    vocab = method.head.out_features
    steps = {"ours": ours, "timm": timm_step(cfg, vocab, batch, targets, dtype, compiled=False)}
    if args.compile:
        steps["ours_compiled"] = our_step([*common, "trainer.compile=true"], folder)[-1]
        steps["timm_compiled"] = timm_step(cfg, vocab, batch, targets, dtype, compiled=True)
    flops = step_flops(method, batch)
    rate = matmul_rate(dtype, torch.device("cpu"), args.matmul_size)
    times: dict[str, list[float]] = {name: [] for name in steps}
    first: dict[str, float] = {}
    order = schedule(list(steps), args.warmup, args.rounds)
    for i, (name, timed) in enumerate(order):
        start = time.perf_counter()
        steps[name](i)
        took = time.perf_counter() - start
        first.setdefault(name, took)
        if timed:
            times[name].append(took)
        print(f"  {precision} {name}{'' if timed else ' (warm-up)'}: {took:.2f} s", file=sys.stderr, flush=True)
    variants = {}
    for name, ts in times.items():
        median = statistics.median(ts)
        variants[name] = {"step_s": median, "step_times_s": ts, "images_per_s": args.batch / median,
                          "first_step_s": first[name], "achieved_flops": flops / median,
                          "share_of_matmul": flops / median / rate}
    speedups = {}
    for ours_name, peer in (("ours", "timm"), ("ours_compiled", "timm_compiled"), ("ours_compiled", "timm"),
                            ("timm_compiled", "timm")):
        if ours_name in times and peer in times:
            rounds = [p / o for o, p in zip(times[ours_name], times[peer])]
            low, high = median_interval(rounds)
            speedups[f"{ours_name}_vs_{peer}"] = {"median": statistics.median(rounds), "interval": [low, high],
                                                 "rounds": rounds}
    return {"precision": precision, "flops_per_step": flops, "matmul_rate": rate, "variants": variants,
            "speedups": speedups, "order": [n for n, timed in order if timed]}


def optimizer_rounds(model: Any, rounds: int) -> dict[str, Any]:
    """AdamW's step alone on the parameters of timm's model: the per-tensor loop (torch's CPU default),
    foreach and fused, alternating (order flipped each round); median time ratios against the loop."""
    torch.manual_seed(0)
    params = {kind: [nn.Parameter(p.detach().clone()) for p in PlainMim(model, 8192).parameters()]
              for kind in ("loop", "foreach", "fused")}
    optimizers = {kind: torch.optim.AdamW(ps, foreach=kind == "foreach", fused=kind == "fused" or None)
                  for kind, ps in params.items()}
    for ps in params.values():
        for p in ps:
            p.grad = torch.randn_like(p)
    times: dict[str, list[float]] = {kind: [] for kind in optimizers}
    for kind, timed in schedule(list(optimizers), 1, rounds):
        start = time.perf_counter()
        optimizers[kind].step()
        if timed:
            times[kind].append(time.perf_counter() - start)
    return {kind: {"step_s": statistics.median(ts),
                   "speedup_vs_loop": statistics.median(a / b for a, b in zip(times["loop"], ts))}
            for kind, ts in times.items()}


def markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    lines = [f"## Ours vs timm's BEiT, MIM step: {report['date'][:16].replace('T', ' ')}, {m['cpu']}, {m['cores']} cores",
             "", f"Command: `{report['command']}` (wall time {report['wall_s'] / 60:.1f} min; 1-min load average at "
             f"start {m['load_avg_1min_start']:.1f}, torch {m['torch']}, {m['torch_threads']} threads). "
             f"Batch {report['batch']}, {report['rounds']} timed rounds after {report['warmup']} warm-up step(s) per "
             "variant, steps alternating with the order flipping each round.", "",
             "| precision | variant | images/s | s / step (median) | first step s | GFLOP/s | share of matmul rate |",
             "|---|---|---|---|---|---|---|"]
    for r in report["results"]:
        for name, v in r["variants"].items():
            lines.append(f"| {r['precision']} | {name} | {v['images_per_s']:.3g} | {v['step_s']:.3g} | "
                         f"{v['first_step_s']:.3g} | {v['achieved_flops'] / 1e9:.3g} | {v['share_of_matmul']:.3f} |")
    lines += ["", "| precision | ratio (images/s) | median of rounds | 95% interval | per round |", "|---|---|---|---|---|"]
    for r in report["results"]:
        for name, s in r["speedups"].items():
            lines.append(f"| {r['precision']} | {name.replace('_vs_', ' / ')} | **{s['median']:.3f}** | "
                         f"{s['interval'][0]:.3f}-{s['interval'][1]:.3f} | {' '.join(f'{x:.3f}' for x in s['rounds'])} |")
    rates = ", ".join(f"{r['precision']} {r['matmul_rate'] / 1e9:.0f} GFLOP/s" for r in report["results"])
    lines += ["", f"FLOPs per step {report['results'][0]['flops_per_step'] / 1e9:.0f} G (fvcore with attention, "
              f"3 x backbone forward + head). Matmul rates measured in this run ({report['matmul_size']}^3, best of 20): "
              f"{rates}.", ""]
    if report.get("optimizer"):
        shown = "; ".join(f"{k} {v['step_s']:.3g} s ({v['speedup_vs_loop']:.2f}x the loop)"
                          for k, v in report["optimizer"].items())
        lines += [f"AdamW step alone on these parameters (fp32, alternating, median of {report['rounds']} rounds): "
                  f"{shown}.", ""]
    return "\n".join(lines)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.vs_timm", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*", help=f"config overrides of our side (after {' '.join(BASE)}); the timm "
                   "model takes the same model widths")
    p.add_argument("--batch", type=int, default=8, help="images per step (default: %(default)s)")
    p.add_argument("--precisions", default="fp32,bf16", help="comma-separated, of fp32, bf16 (default: %(default)s)")
    p.add_argument("--compile", action="store_true", help="also both sides under torch.compile (minutes to compile)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per variant (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=6, help="timed rounds, one step per variant each (default: %(default)s)")
    p.add_argument("--no-optimizer", action="store_true", help="skip the AdamW loop / foreach / fused rounds")
    p.add_argument("--matmul-size", type=int, default=2048, help="square matmul for the rate (default: %(default)s)")
    p.add_argument("--out", type=Path, help="JSON report (default: benchmarks/results/vs_timm-<date>.json)")
    p.add_argument("--no-append", action="store_true", help="do not append the table to benchmarks/RESULTS.md")
    p.add_argument("--results-md", type=Path, default=ROOT / "RESULTS.md", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    started, now = time.perf_counter(), datetime.datetime.now()
    report: dict[str, Any] = {"command": f"python -m benchmarks.vs_timm {shlex.join(argv)}".rstrip(),
                              "date": now.isoformat(timespec="seconds"), "machine": machine(), "batch": args.batch,
                              "rounds": args.rounds, "warmup": args.warmup, "matmul_size": args.matmul_size}
    with tempfile.TemporaryDirectory(prefix="ssl_zoo_vs_timm_") as folder, contextlib.redirect_stdout(sys.stderr):
        report["results"] = []
        for precision in args.precisions.split(","):
            report["results"].append(run_precision(args, precision, Path(folder)))
            print(json.dumps(report["results"][-1]), file=sys.stderr, flush=True)  # kept if a later part fails
        if not args.no_optimizer:
            from ssl_zoo.config import load_config

            report["optimizer"] = optimizer_rounds(load_config([*BASE, *args.overrides]).model, args.rounds)
    report["wall_s"] = time.perf_counter() - started
    out = args.out or ROOT / "results" / f"vs_timm-{now:%Y%m%d-%H%M%S}.json"
    publish(report, out, markdown(report), None if args.no_append else args.results_md)
    return report


if __name__ == "__main__":
    main()
