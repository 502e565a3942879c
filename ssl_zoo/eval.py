"""Evaluate a pretrained backbone: `python -m ssl_zoo.eval checkpoint=RUN_DIR [protocol=knn|linear|finetune]
[data=crop_id|fashion_mnist|image_folder] [a.b.c=value ...]`.

`checkpoint` is a run directory, one stage of it, an export folder or `random` (with `architecture=RUN_DIR`);
the run's method says which timm model its backbone is (`Method.timm_spec`), so no method is named here. The
frozen protocols (knn, linear) print the same architecture at random init beside the score. Fine-tuning trains
through the pretraining loop, strategies and launchers in `output_dir/finetune`; rerunning the same command
resumes it. Every run writes `config.yaml`, `metrics.jsonl`, TensorBoard logs and `eval.json` to `output_dir`.
"""
from __future__ import annotations

import dataclasses
import json
import sys
import textwrap
import time
from pathlib import Path
from typing import Any, Optional

from omegaconf import MISSING, DictConfig

from ssl_zoo import config as config_lib
from ssl_zoo.cli import exit_with, plugin_overrides, split_flags
from ssl_zoo.config import ConfigError, TrainerConfig
from ssl_zoo.errors import UserError
from ssl_zoo.registry import DATASETS, LAUNCHERS, STRATEGIES, PluginImportError, RegistryError, load_plugins

USER_ERRORS = (UserError, ConfigError, RegistryError, PluginImportError, FileNotFoundError)
GROUPS = ("protocol", "data", "trainer", "strategy", "launcher", "eval_experiment")


@dataclasses.dataclass
class EvalConfig:
    checkpoint: str = MISSING  # RUN_DIR | RUN_DIR/<stage> | export folder | random
    architecture: Optional[str] = None  # checkpoint=random: the run whose architecture is built
    output_dir: str = "runs/eval/${protocol.name}-${data.name}"
    seed: int = 0
    plugins: list[str] = dataclasses.field(default_factory=list)
    protocol: Any = MISSING
    data: Any = MISSING
    trainer: TrainerConfig = dataclasses.field(default_factory=TrainerConfig)  # fine-tuning's loop; device, progress
    strategy: Any = MISSING  # fine-tuning only
    launcher: Any = MISSING  # fine-tuning only


def registries() -> dict[str, Any]:
    from ssl_zoo.evaluation.protocols import PROTOCOLS

    return {"protocol": PROTOCOLS, "data": DATASETS, "strategy": STRATEGIES, "launcher": LAUNCHERS}


def load_eval_config(overrides: list[str]) -> DictConfig:
    load_plugins()
    return config_lib.load_config(overrides, config_name="eval", root_schema=EvalConfig, registries=registries(),
                                  group_names=GROUPS)


def help_text() -> str:
    lines = ["usage: python -m ssl_zoo.eval checkpoint=RUN_DIR|random [GROUP=OPTION ...] [KEY=VALUE ...] "
             "[--print-config]", "", textwrap.fill(__doc__.split("\n\n")[1].replace("\n", " "), 110), "",
             "config groups (GROUP=OPTION):"]
    for group, options in config_lib.groups(GROUPS).items():
        lines.append(f"  {group:<16} {', '.join(options) or '(none)'}")
    lines += ["", "keys (KEY=VALUE):",
              "  checkpoint       a run directory, one stage of it, an export folder (timm or plain), or random",
              "  architecture     with checkpoint=random: the run whose architecture is built at random init",
              "  output_dir       run directory (default runs/eval/<protocol>-<data>)",
              "  seed             data crops, probe and fine-tuning seed (default 0)",
              "  protocol.*, data.*, trainer.*, strategy.* (fine-tuning's loop), launcher.*: see --print-config",
              "", "flags:", "  --print-config   print the resolved config and exit", "  -h, --help       this text",
              "", "examples:", "  python -m ssl_zoo.eval checkpoint=runs/peco",
              "  python -m ssl_zoo.eval checkpoint=runs/peco protocol=linear",
              "  python -m ssl_zoo.eval checkpoint=random architecture=runs/peco protocol=finetune",
              "  python -m ssl_zoo.eval checkpoint=runs/peco data=fashion_mnist data.max_train=5000"]
    return "\n".join(lines)


def _score(metrics: dict[str, Any], protocol: str) -> Optional[float]:
    return metrics.get(protocol, {}).get("top1") if isinstance(metrics.get(protocol), dict) else metrics.get("top1")


def _log(out: Path, records: dict[str, float], progress: Optional[bool]) -> None:
    from ssl_zoo.engine.logger import MetricsLogger

    logger = MetricsLogger(out, 0, 1, enabled=True, progress=False if progress is None else progress)
    try:
        logger.log(1, records)
    finally:
        logger.close()


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Run the configured protocol; write and return eval.json's content."""
    from ssl_zoo.evaluation.backbone import resolve
    from ssl_zoo.evaluation.frozen import labelled_splits, score_backbone
    from ssl_zoo.train import pick_device

    started = time.perf_counter()
    backbone = resolve(cfg.checkpoint, cfg.architecture)
    out = Path(cfg.output_dir)
    name = cfg.protocol.name
    if name == "finetune":
        from ssl_zoo.evaluation.run_finetune import finetune

        train, test = labelled_splits(cfg.data, cfg.seed, backbone.spec.input_size[-1])
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(config_lib.to_yaml(cfg))
        metrics = finetune(cfg, backbone, train, test, out / "finetune")
        baseline = None
    else:
        device = pick_device(cfg.trainer.device)
        with_baseline = cfg.protocol.baseline and backbone.weights is not None
        results = score_backbone(backbone, cfg.data, [cfg.protocol], cfg.seed, device, with_baseline,
                                 cfg.trainer.progress)
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(config_lib.to_yaml(cfg))
        metrics = results["checkpoint"]
        baseline = results.get("random_init")
    record = {
        "protocol": name, "data": cfg.data.name, "checkpoint": backbone.label, "seed": cfg.seed,
        "score": _score(metrics, name), "random_init_score": _score(baseline, name) if baseline else None,
        "wall_time_s": round(time.perf_counter() - started, 1), "metrics": metrics, "random_init": baseline,
        "output_dir": str(out),
    }
    flat = {f"eval/{k}": v for k, v in (metrics.get(name, metrics)).items() if isinstance(v, (int, float))}
    if baseline:
        flat.update({f"eval/random_init_{k}": v for k, v in baseline[name].items() if isinstance(v, (int, float))})
    _log(out, flat, cfg.trainer.progress)
    (out / "eval.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


def format_record(record: dict[str, Any]) -> str:
    score = record["score"]
    lines = ["", f"== {record['protocol']} on {record['data']} (seed {record['seed']})",
             f"  {'checkpoint':<14} {record['checkpoint']}", f"  {'top1':<14} {score:.4f}"]
    if record["random_init_score"] is not None:
        lines.append(f"  {'random init':<14} {record['random_init_score']:.4f}")
    lines += [f"  {'wall_time_s':<14} {record['wall_time_s']}", f"  {'eval.json':<14} {record['output_dir']}/eval.json"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if "-h" in argv or "--help" in argv:
            load_plugins(plugin_overrides(argv))
            print(help_text())
            return 0
        overrides, print_config = split_flags(argv)
        cfg = load_eval_config(overrides)
        if print_config:
            print(config_lib.to_yaml(cfg))
            return 0
        record = evaluate(cfg)
    except USER_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(format_record(record))
    return 0


if __name__ == "__main__":
    exit_with(main)
