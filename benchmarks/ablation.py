"""PeCo's codebook ablation at tiny scale: does a perceptual codebook make a better MIM target than a pixel one?

    python -m benchmarks.ablation [--seeds 0 1 2] [--variants peco pixel random] [--quick] [--out DIR]

Variants, all at the same compute (the same steps, batch and model in both stages; only the stage-1 loss weights
differ): `peco` (pixel + perceptual codebook), `pixel` (perceptual weight 0: BEiT-style VQ target), `perceptual`
(pixel weight 0, optional), `random` (no pretraining: the same ViT at random initialisation), and optionally
`mae` (the MAE plugin's main job, `method=mae`: the baseline PeCo's users compare against, with as many
images in its one stage as PeCo's stage 2 has, and no tokenizer stage; its own ViT at random initialisation is
the row `random_mae_vit`). Each pretraining
run is the real main job (`python -m ssl_zoo.run method=peco ...`); its own end-of-run score gives kNN and
linear probe on crop_id for the backbone and, from the same pass, for the same ViT at random initialisation
(the `random` variant: same seed, so the same weights for every variant); fine-tuning on crop_id and every
protocol on Fashion-MNIST (when its Debian package is installed) go through `python -m ssl_zoo.eval`. Over
several seeds, with mean and standard deviation. Per tokenizer: its held-out PSNR
(from stage 1's summary) and a linear probe on each crop's bag-of-codes histogram, the paper's "tokens carry
semantics" claim as a number. Writes benchmarks/results/ablation-<time>.{json,png,md}.

`--quick` shortens everything (fewer steps, 1 seed, no fine-tuning) to check the tool in a few minutes; its
figures are labelled as a short run and say little about the method.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
VARIANTS = {  # stage-1 loss overrides
    "peco": [],
    "pixel": ["method.tokenizer_loss.perceptual_weight=0"],
    "perceptual": ["method.tokenizer_loss.pixel_weight=0"],
    "random": None,  # no pretraining
    "mae": None,  # method=mae, not a PeCo codebook
}
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FROM_RUN = {("crop_id", "knn"), ("crop_id", "linear")}  # read from the main job's end-of-run score


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Cost (estimated from the quiet main job, not timed): each pretraining run is one main job "
                                "(~200 s on 2 quiet cores), each fine-tuning ~4 min per 100 steps; so 3 seeds of peco + pixel "
                                "take ~21 min with --protocols knn linear, ~55 min with the default fine-tuning. --quick, "
                                "fewer --seeds/--protocols, --finetune-steps and --tokenizer-steps/--mim-steps give a shorter "
                                "run (the same steps for every variant).")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--variants", nargs="+", default=["peco", "pixel", "random"], choices=list(VARIANTS))
    p.add_argument("--protocols", nargs="+", default=["knn", "linear", "finetune"], choices=["knn", "linear", "finetune"])
    p.add_argument("--tokenizer-steps", type=int, default=None, help="stage-1 steps (default: the main job's)")
    p.add_argument("--mim-steps", type=int, default=None, help="stage-2 steps (default: the main job's)")
    p.add_argument("--finetune-steps", type=int, default=100, help="fine-tuning steps on crop_id")
    p.add_argument("--no-fashion-mnist", action="store_true", help="skip Fashion-MNIST even when installed")
    p.add_argument("--quick", action="store_true",
                   help="short check of the tool: 1 seed, 60 + 40 steps, kNN and linear only")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    p.add_argument("--work", type=Path, default=REPO / "runs" / "ablation", help="run directories")
    args = p.parse_args(argv)
    if args.quick:
        args.seeds = args.seeds[:1]
        args.tokenizer_steps = args.tokenizer_steps or 60
        args.mim_steps = args.mim_steps or 40
        args.protocols = [x for x in args.protocols if x != "finetune"]
    return args


def _python(module: str, *overrides: str) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", module, *overrides], cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{module} {' '.join(overrides)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")


def final_summary(run: Path) -> Path:
    """The summary of a run's last stage: PeCo's stage 2 (`mim/`) or a one-stage method's run folder."""
    return run / "mim" / "summary.json" if (run / "mim").is_dir() else run / "summary.json"


def mae_steps(mim_steps: int) -> int:
    """MAE's steps for as many images as `mim_steps` PeCo stage-2 steps (each at its own default batch)."""
    from ssl_zoo.config import load_config

    peco, mae = load_config(["method=peco"]).trainer, load_config(["method=mae"]).trainer
    return max(1, round(mim_steps * peco.batch_size / mae.batch_size))


def pretrain(variant: str, seed: int, args: argparse.Namespace) -> Path:
    """One main job; a run of `--work` that already has its end-of-run score is reused, so the same command
    after an interruption continues where it stopped (a half-finished run resumes from its checkpoints)."""
    run = args.work / f"{variant}-s{seed}"
    summary = final_summary(run)
    if summary.is_file() and "linear_top1" in json.loads(summary.read_text()):
        return run
    common = [f"seed={seed}", f"output_dir={run}", "trainer.eval_at_end=true", "trainer.progress=false"]
    if variant == "mae":
        steps = [f"trainer.max_steps={mae_steps(args.mim_steps)}"] if args.mim_steps else []
        _python("ssl_zoo.run", "method=mae", *common, *steps)
        return run
    steps = []
    if args.tokenizer_steps:
        steps.append(f"method.tokenizer_training.max_steps={args.tokenizer_steps}")
    if args.mim_steps:
        steps.append(f"trainer.max_steps={args.mim_steps}")
    _python("ssl_zoo.run", "method=peco", *common, *steps, *VARIANTS[variant])
    return run


def end_of_run_scores(run: Path) -> dict[str, dict[str, float]]:
    """The main job's crop_id kNN and linear top-1 (ssl_zoo/evaluation/frozen.py: final_scores), for the
    backbone and for its architecture at random init: {"trained": {...}, "random": {...}}."""
    summary = json.loads(final_summary(run).read_text())
    return {"trained": {p: summary[f"{p}_top1"] for p in ("knn", "linear")},
            "random": {p: summary[f"{p}_random_init"] for p in ("knn", "linear")}}


def evaluate(run: Path | None, architecture: Path, protocol: str, data: str, seed: int,
             args: argparse.Namespace) -> float:
    """One protocol's top-1 through `python -m ssl_zoo.eval`; run=None scores random initialisation."""
    label = run.name if run is not None else f"random-s{seed}"
    out = args.work / "eval" / f"{label}-{protocol}-{data}"
    checkpoint = [f"checkpoint={run}"] if run is not None else ["checkpoint=random", f"architecture={architecture}"]
    extra = [f"trainer.max_steps={args.finetune_steps}"] if protocol == "finetune" else ["protocol.baseline=false"]
    _python("ssl_zoo.eval", *checkpoint, f"protocol={protocol}", f"data={data}", f"seed={seed}",
            f"output_dir={out}", "trainer.progress=false", *extra)
    return float(json.loads((out / "eval.json").read_text())["score"])


def bag_of_codes_probe(run: Path, seed: int) -> float:
    """Linear probe (softmax regression, fixed schedule) on each crop_id crop's normalised code histogram."""
    from omegaconf import OmegaConf

    from ssl_zoo.data.crop_id import crop_id_split
    from ssl_zoo_peco.checkpoints import load_strict, tokenizer_state
    from ssl_zoo_peco.config import tokenizer_image_size
    from ssl_zoo_peco.tokenizer_eval import to_unit_range
    from ssl_zoo_peco.vqgan import VQTokenizer

    cfg = OmegaConf.load(run / "tokenizer" / "config.yaml")  # the resolved config of stage 1
    size = tokenizer_image_size(cfg)
    tokenizer = VQTokenizer(cfg.method.tokenizer, size)
    path = run / "tokenizer" / "export" / "method.safetensors"
    load_strict(tokenizer, tokenizer_state(str(path)), str(path))
    tokenizer.eval()

    def histograms(split: str, crops: int) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = crop_id_split(split, size, crops, seed)
        codes = torch.cat([tokenizer.tokenize(to_unit_range(b)) for b in images.split(64)])
        hist = F.one_hot(codes, tokenizer.vocab_size).float().mean(dim=1)
        return hist, labels

    (xtr, ytr), (xte, yte) = histograms("train", 200), histograms("test", 100)
    torch.manual_seed(seed)
    head = torch.nn.Linear(xtr.shape[1], int(ytr.max()) + 1)
    opt = torch.optim.AdamW(head.parameters(), lr=0.1, weight_decay=1e-4)
    scale = xtr.std().clamp_min(1e-8)
    for _ in range(300):
        opt.zero_grad()
        F.cross_entropy(head(xtr / scale), ytr).backward()
        opt.step()
    with torch.no_grad():
        return float((head(xte / scale).argmax(1) == yte).float().mean())


def mean_std(values: list[float]) -> dict[str, float]:
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return {"mean": mean, "std": std, "values": values}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    datasets = ["crop_id"] + (["fashion_mnist"] if FASHION_MNIST_DIR.is_dir() and not args.no_fashion_mnist else [])
    rows: dict[str, dict[str, list[float]]] = {v: {} for v in args.variants}
    if "mae" in args.variants:
        rows["random_mae_vit"] = {}
    runs: dict[int, Path] = {}
    base = args.out / f"ablation-{time.strftime('%Y%m%d-%H%M%S')}"
    for done, seed in enumerate(args.seeds, start=1):
        for variant in args.variants:
            if variant == "random":
                continue
            run = pretrain(variant, seed, args)
            if variant != "mae":
                runs.setdefault(seed, run)
                stage1 = json.loads((run / "tokenizer" / "summary.json").read_text())
                rows[variant].setdefault("tokenizer_psnr", []).append(stage1["heldout_psnr"])
                rows[variant].setdefault("bag_of_codes_linear", []).append(bag_of_codes_probe(run, seed))
            scores = end_of_run_scores(run)
            for data in datasets:
                for protocol in args.protocols:
                    value = (scores["trained"][protocol] if (data, protocol) in FROM_RUN
                             else evaluate(run, run, protocol, data, seed, args))
                    rows[variant].setdefault(f"{data}_{protocol}", []).append(value)
            print(f"[{time.perf_counter() - started:.0f}s] {variant} seed {seed}: "
                  f"{ {k: round(v[-1], 4) for k, v in rows[variant].items()} }", flush=True)
        floors = {"random": "peco", "random_mae_vit": "mae"}  # random-init row -> the run of its architecture
        for floor, method in floors.items():
            if floor not in rows:
                continue
            architecture = (runs.get(seed) if method == "peco" else None) or pretrain(method, seed, args)
            scores = end_of_run_scores(architecture)
            for data in datasets:
                for protocol in args.protocols:
                    value = (scores["random"][protocol] if (data, protocol) in FROM_RUN
                             else evaluate(None, architecture, protocol, data, seed, args))
                    rows[floor].setdefault(f"{data}_{protocol}", []).append(value)
        result = {
            "command": "python -m benchmarks.ablation " + " ".join(sys.argv[1:] if argv is None else argv),
            "short_run": bool(args.quick or args.tokenizer_steps or args.mim_steps),
            "seeds": args.seeds[:done], "seeds_asked": args.seeds, "datasets": datasets,
            "protocols": args.protocols, "wall_time_s": round(time.perf_counter() - started, 1),
            "results": {v: {k: mean_std(vals) for k, vals in cols.items()} for v, cols in rows.items()},
        }
        write_outputs(result, base)  # after every seed: an interrupted run keeps what it measured
    return 0


def write_outputs(result: dict[str, Any], base: Path) -> None:
    base.parent.mkdir(parents=True, exist_ok=True)
    base.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    table = markdown_table(result)
    base.with_suffix(".md").write_text(table + "\n")
    plot(result, base.with_suffix(".png"))
    print(table)
    print(f"wrote {base}.json, .md, .png", flush=True)


def markdown_table(result: dict[str, Any]) -> str:
    columns = sorted({k for cols in result["results"].values() for k in cols})
    lines = ["| variant | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for variant, cols in result["results"].items():
        cells = [f"{cols[c]['mean']:.3f} ± {cols[c]['std']:.3f}" if c in cols else "-" for c in columns]
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    note = " (SHORT RUN: not the full ablation)" if result["short_run"] else ""
    if result.get("seeds_asked", result["seeds"]) != result["seeds"]:
        note += f" (PARTIAL: seeds {result['seeds_asked']} asked)"
    lines.append(f"\nmean ± std over seeds {result['seeds']}{note}; `{result['command']}`, {result['wall_time_s']} s")
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scores = sorted({k for cols in result["results"].values() for k in cols if k != "tokenizer_psnr"})
    variants = list(result["results"])
    fig, ax = plt.subplots(figsize=(max(6, 1.5 * len(scores)), 3.5))
    width = 0.8 / len(variants)
    for i, variant in enumerate(variants):
        cols = result["results"][variant]
        xs = [j + i * width for j, s in enumerate(scores) if s in cols]
        ax.bar(xs, [cols[s]["mean"] for s in scores if s in cols], width,
               yerr=[cols[s]["std"] for s in scores if s in cols], label=variant, capsize=3)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(scores))], scores, rotation=15, fontsize=8)
    ax.set_ylabel("top-1 accuracy")
    title = "PeCo codebook ablation" + (" (short run)" if result["short_run"] else "")
    ax.set_title(f"{title}, seeds {result['seeds']}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
