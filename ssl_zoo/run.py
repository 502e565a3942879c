"""Train a self-supervised method: `python -m ssl_zoo.run method=<name> [group=option ...] [a.b.c=value ...]`.

Run with `--help` for the config groups and their options, `--print-config` for the resolved config.
Running the same command again with the same `output_dir` resumes from the last complete checkpoint.
"""
from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from ssl_zoo import config as config_lib
from ssl_zoo.cli import exit_with, plugin_overrides, split_flags
from ssl_zoo.config import ConfigError, TrainerConfig
from ssl_zoo.errors import UserError
from ssl_zoo.launch.local import Stopped
from ssl_zoo.method import Stage
from ssl_zoo.registry import LAUNCHERS, METHODS, STRATEGIES, PluginImportError, RegistryError, load_plugins
from ssl_zoo.train import TooManyBadSteps

#: errors reported as one `error:` line (no traceback): a user's mistake, or a run that cannot go on
USER_ERRORS = (UserError, RegistryError, PluginImportError, FileNotFoundError, TooManyBadSteps)


def help_text() -> str:
    lines = [
        "usage: python -m ssl_zoo.run method=NAME [GROUP=OPTION ...] [KEY=VALUE ...] [--print-config]",
        "",
        "Train a self-supervised method from composed YAML configs; rerunning with the same output_dir resumes.",
        "",
        "config groups (GROUP=OPTION):",
    ]
    for group, options in config_lib.groups().items():
        lines.append(f"  {group:<12} {', '.join(options) or '(none)'}")
    lines += ["", "common keys (KEY=VALUE):", "  output_dir   run directory (default runs/<method name>)",
              "  seed         global seed (default 0)", "  plugins      [module, ...] to import for their registrations"]
    lines += _key_lines(TrainerConfig, "trainer")
    for name in STRATEGIES.names():  # each strategy's own keys (strategy=deepspeed strategy.zero_stage=3)
        lines += _key_lines(STRATEGIES.entry(name).schema, "strategy", f" (strategy={name})")
    lines += ["", "flags:", "  --print-config   print the resolved config and exit", "  -h, --help       this text",
              "", "examples:", "  python -m ssl_zoo.run method=peco",
              "  python -m ssl_zoo.run method=peco model=beit_small trainer.max_steps=1000 output_dir=runs/small",
              "  python -m ssl_zoo.run method=peco strategy=deepspeed strategy.zero_stage=3 launcher.nprocs=2"]
    return "\n".join(lines)


def _key_lines(schema: type | None, section: str, suffix: str = "") -> list[str]:
    """`--help`'s lines for the keys of a section's schema and their defaults (not `name`: the group choice)."""
    lines = []
    for field in dataclasses.fields(schema) if schema else ():
        if field.name != "name":
            default = field.default_factory() if callable(field.default_factory) else field.default
            lines.append(f"  {section + '.' + field.name:<30} default {default}{suffix}")
    return lines


def run(overrides: list[str], print_config: bool = False) -> list[dict[str, Any]]:
    """Compose every stage's config first (so a bad key fails before any work), then run them in order."""
    cfg = config_lib.load_config(overrides)
    stages = METHODS.get(cfg.method.name).stages(cfg)
    plan: list[tuple[str | None, DictConfig]] = [(None, cfg)]
    if stages:
        plan = [(s.name, stage_config(overrides, s, f"{cfg.output_dir}/{s.name}")) for s in stages]
    if print_config:
        for name, stage_cfg in plan:
            print(f"# stage: {name}" if name else "# config", config_lib.to_yaml(stage_cfg), sep="\n")
        return []
    summaries = []
    for i, (name, stage_cfg) in enumerate(plan):
        if name:
            print(f"== stage {i + 1}/{len(plan)}: {name} -> {stage_cfg.output_dir}", flush=True)
        summary = LAUNCHERS.build(stage_cfg.launcher, stage_cfg)
        summaries.append({"stage": name, **(summary or {})})
    last = plan[-1][1]
    if last.trainer.eval_at_end and summaries[-1].get("output_dir"):
        summaries[-1].update(_score(last))
    return summaries


def stage_config(overrides: list[str], stage: Stage, output_dir: str) -> DictConfig:
    """A stage's validated config, run in `output_dir`; its errors say which stage (its keys come partly from
    the method)."""
    choice = [f"method={stage.method}"] if stage.method else []
    try:
        return config_lib.load_config([*overrides, *choice], settings={**stage.settings, "output_dir": output_dir})
    except ConfigError as exc:
        raise ConfigError(f"{exc} (in stage '{stage.name}')") from None


def _score(cfg: DictConfig) -> dict[str, Any]:
    """The end-of-run score (kNN and linear probe on crop_id beside random init), also in the stage's
    summary.json; empty for a method whose backbone has no timm form."""
    from ssl_zoo.evaluation.frozen import final_scores
    from ssl_zoo.train import pick_device

    if METHODS.get(cfg.method.name).timm_spec(cfg) is None:
        return {}
    print("== scoring the backbone: kNN and linear probe on crop_id, beside random init", flush=True)
    scores = final_scores(cfg, pick_device(cfg.trainer.device))
    stage_summary = Path(cfg.output_dir) / "summary.json"
    if scores and stage_summary.is_file():
        stage_summary.write_text(json.dumps({**json.loads(stage_summary.read_text()), **scores}, indent=2) + "\n")
    return scores


def format_summary(summaries: list[dict[str, Any]]) -> str:
    lines = ["", "== summary"]
    for summary in summaries:
        title = summary.get("stage") or summary.get("method", "run")
        lines.append(f"[{title}]")
        for key, value in summary.items():
            if key != "stage" and value not in (None, [], ""):
                shown = f"{value:.4g}" if isinstance(value, float) else value
                lines.append(f"  {key:<20} {shown}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        try:
            load_plugins(plugin_overrides(argv))
        except PluginImportError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        print(help_text())
        return 0
    try:
        summaries = run(*split_flags(argv))
    except USER_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Stopped as stop:
        print(stop, file=sys.stderr)
        return stop.exit_code
    if summaries:
        print(format_summary(summaries))
        out = summaries[-1].get("output_dir")
        if len(summaries) > 1 and out:
            (Path(out).parent / "summary.json").write_text(json.dumps(summaries, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    exit_with(main)
