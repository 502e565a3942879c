"""The throughput report as a markdown table (for benchmarks/RESULTS.md) and a PNG plot (matplotlib, Agg)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

PART_NAMES = {"tokenizer": "tokenizer forward + lookup", "backbone_forward": "backbone forward",
              "head_loss": "head + loss (fwd + bwd)", "backbone_backward": "backbone backward",
              "optimizer": "clip + optimizer step", "other": "rest of the step"}


def _g(x: float | None, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}g}"


def _case_row(r: dict[str, Any]) -> str:
    model = r["model"]
    return (f"| {r['name']} | {model.get('embed_dim')}x{model.get('depth')} @ {model.get('img_size')} px | "
            f"{r['batch_size']} | {r['precision']} | {'yes' if r['compile'] else 'no'} | {_g(r['images_per_s'])} | "
            f"{_g(r['step_s'])} | {r['peak_mib']:.0f} |")


def markdown(report: dict[str, Any], json_path: Path, png_path: Path) -> str:
    m, main, rates, flops = report["machine"], report["main"], report["rates"], report["flops"]
    fused = main["fused"]
    device = m.get("gpu", f"{m['cpu']}, {m['cores']} cores")
    lines = [
        f"## Throughput: {report['date'][:10]}, {device}", "",
        f"Command: `{report['command']}` (wall time {report['wall_s'] / 60:.1f} min; 1-min load average at start "
        f"{m['load_avg_1min_start']:.1f} on {m['cores']} cores, torch {m['torch']}). "
        f"JSON: `{json_path.name}`, plot: `{png_path.name}` (in benchmarks/results/).", "",
        f"Main case: `{' '.join(o for o in fused['overrides'] if not o.startswith('method.tokenizer.'))}` "
        f"(+ paper-size tokenizer overrides where listed in the JSON), warm-up {fused['warmup']} step(s)"
        f" per variant{' (all but the first on ' + str(fused['warmup_batch']) + ' images)' if fused.get('warmup_batch') else ''}, "
        f"median of {fused['repeats']} timed step(s); one batch reused (data loading not timed).", "",
        "| part | s / step | images/s | GFLOP / image | achieved GFLOP/s | peak added MiB (fused) | unfused s | unfused peak added MiB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    unfused = main.get("unfused")
    for key, label in PART_NAMES.items():
        part = fused["parts"][key]
        gflop = flops["per_image"].get(key)
        achieved = main["part_flops"].get(key)
        upart = unfused["parts"][key] if unfused else {}
        lines.append(f"| {label} | {_g(part['s'])} | {_g(part['images_per_s'])} | "
                     f"{_g(gflop / 1e9 if gflop else None)} | {_g(achieved / 1e9 if achieved else None)} | "
                     f"{_g(part.get('added_mib'))} | {_g(upart.get('s'))} | {_g(upart.get('added_mib'))} |")
    unfused_cells = f"{_g(unfused['step_s'])} | (step peak {unfused['peak_mib']:.0f})" if unfused else "- | -"
    lines.append(f"| **whole step** | {_g(fused['step_s'])} | **{_g(fused['images_per_s'])}** | "
                 f"{_g(flops['step_per_image'] / 1e9)} | {_g(main['achieved_flops'] / 1e9)} | "
                 f"(step peak {fused['peak_mib']:.0f}) | {unfused_cells} |")
    lines += ["",
              f"FLOPs = 2 x multiply-adds. Backbone forward {flops['backbone_forward_gmacs']:.2f} GMACs per image, of "
              f"which attention {flops['backbone_attention_gmacs']:.2f} (counted by our `scaled_dot_product_attention` "
              f"handle; fvcore alone skips it). Matmul rates measured in this run ({rates['matmul_size']}^3): "
              f"fp32 {_g(rates['matmul_fp32_flops'] / 1e9)} GFLOP/s, bf16 {_g(rates['matmul_bf16_flops'] / 1e9)} GFLOP/s. "
              f"Achieved step rate / fp32 matmul = {_g(main['achieved_over_matmul_fp32'])}, / bf16 matmul = "
              f"{_g(main['achieved_over_matmul_bf16'])}" + (f", MFU vs the GPU's bf16 peak = {_g(main['mfu'])}." if main["mfu"] else ".")]
    if "fused_vs_unfused" in main:
        r = main["fused_vs_unfused"]
        rounds = " ".join(f"{x:.3f}" for x in r.get("round_speedups", []))
        lines += ["", f"Fused vs unfused (one model, steps alternating in one process, order {' '.join(fused['order'])}; "
                  f"unfused = N x K distances + argmin and full logits + F.cross_entropy swapped in for `ssl_zoo_kernels`): "
                  f"whole step {_g(r['step_speedup'])}x the unfused images/s (per round: {rounds}); head + loss peak "
                  f"memory {_g(r['head_loss_memory_ratio'])}x the unfused ({_g(r['head_loss_speedup'])}x faster); "
                  f"tokenizer peak memory {_g(r['tokenizer_memory_ratio'])}x ({_g(r['tokenizer_speedup'])}x faster); "
                  f"step peak {_g(r['peak_memory_ratio'])}x."]
    cases = report["sweep"] + [report[k][v] for k, v in (("precision", "bf16"), ("compile", "compiled")) if k in report]
    cases += report["sizes"]
    if cases:
        lines += ["", "| case | model (width x depth) | batch | precision | compile | images/s | s / step | peak RSS/alloc MiB |",
                  "|---|---|---|---|---|---|---|---|", *(_case_row(r) for r in cases)]
    extra = []
    if "precision" in report:
        extra.append(f"bf16 / fp32 images/s = {_g(report['precision']['bf16_speedup'])}")
    if "compile" in report:
        c = report["compile"]
        extra.append(f"torch.compile / eager images/s = {_g(c['compile_speedup'])} (first compiled step {_g(c['compile_s'])} s)")
    if "recompute" in report:
        r = report["recompute"]
        extra.append(f"activation checkpointing (`trainer.activation_checkpointing`, steps alternating with plain ones "
                     f"on one model): backbone forward keeps {_g(r['backbone_forward_memory_ratio'])}x the memory, step "
                     f"peak {_g(r['peak_memory_ratio'])}x, step time {_g(r['step_time_ratio'])}x (backbone backward "
                     f"{_g(r['backbone_backward_time_ratio'])}x)")
    if extra:
        lines += ["", "At the sweep model and its middle batch: " + "; ".join(extra) + "."]
    if report.get("zero"):
        lines += ["", "PeCo ViT-H/14 model states per GPU (DeepSpeed estimators; activations not included; stage 1 "
                  "is estimated as stage 2, a lower bound; the frozen tokenizer adds its fp32 weights):", "",
                  "| ZeRO stage | GPUs | trainable params | frozen params | GiB per GPU | CPU GiB per node |", "|---|---|---|---|---|---|"]
        lines += [f"| {z['zero_stage']} | {z['gpus_per_node']} | {z['trainable_params'] / 1e6:.0f} M | "
                  f"{z['frozen_params'] / 1e6:.0f} M | {z['gpu_gib_per_gpu']:.1f} | {z['cpu_gib_per_node']:.1f} |"
                  for z in report["zero"]]
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], path: Path) -> str | None:
    """Images/s and peak memory against batch size of the sweep; None when there is no sweep."""
    sweep = report["sweep"]
    if not sweep:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = [r["batch_size"] for r in sweep]
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.5))
    left.plot(batches, [r["images_per_s"] for r in sweep], "o-")
    left.set(xlabel="batch size", ylabel="images / s", title="throughput", xscale="log")
    right.plot(batches, [r["peak_mib"] for r in sweep], "o-", color="tab:red")
    right.set(xlabel="batch size", ylabel="peak MiB", title="peak memory", xscale="log")
    for axis in (left, right):  # log-spaced batches, labelled as the plain numbers they are
        axis.set_xticks(batches, [str(b) for b in batches])
        axis.minorticks_off()
    model = sweep[0]["model"]
    fig.suptitle(f"PeCo step, ViT {model.get('embed_dim')}x{model.get('depth')} @ {model.get('img_size')} px, "
                 f"{sweep[0]['precision']}, {sweep[0]['device']}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return str(path)
