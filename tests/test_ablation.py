"""The ablation tool's bookkeeping: mean and spread over seeds, a table that labels short runs, a plot."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from benchmarks.ablation import end_of_run_scores, mae_steps, markdown_table, mean_std, parse_args, plot
from ssl_zoo.config import load_config


def test_mean_and_sample_spread() -> None:
    stats = mean_std([0.5, 0.6, 0.7])
    assert stats["mean"] == pytest.approx(0.6) and stats["std"] == pytest.approx(0.1)
    assert mean_std([0.4])["std"] == 0.0


def test_quick_is_one_seed_without_finetuning_and_its_table_says_short_run(tmp_path: Path) -> None:
    args = parse_args(["--quick"])
    assert args.seeds == [0] and "finetune" not in args.protocols and args.tokenizer_steps and args.mim_steps
    result = {"command": "python -m benchmarks.ablation --quick", "short_run": True, "seeds": [0, 1],
              "wall_time_s": 1.0, "results": {"peco": {"crop_id_linear": mean_std([0.7, 0.8]),
                                                       "tokenizer_psnr": mean_std([20.0, 21.0])},
                                              "random": {"crop_id_linear": mean_std([0.5, 0.52])}}}
    table = markdown_table(result)
    assert "SHORT RUN" in table and f"0.750 ± {math.sqrt(0.005):.3f}" in table
    assert table.splitlines()[-3].startswith("| random |") and "| - |" in table.splitlines()[-3] + " |"
    plot(result, tmp_path / "ablation.png")
    assert (tmp_path / "ablation.png").read_bytes()[:4] == b"\x89PNG"


def test_end_of_run_scores_keep_the_backbone_and_random_init_apart(tmp_path: Path) -> None:
    (tmp_path / "mim").mkdir()
    summary = {"knn_top1": 0.61, "knn_random_init": 0.52, "linear_top1": 0.70, "linear_random_init": 0.63}
    (tmp_path / "mim" / "summary.json").write_text(json.dumps(summary))
    scores = end_of_run_scores(tmp_path)
    assert scores == {"trained": {"knn": 0.61, "linear": 0.70}, "random": {"knn": 0.52, "linear": 0.63}}


def test_a_one_stage_methods_run_is_scored_from_its_own_summary(tmp_path: Path) -> None:
    """MAE's run (the `mae` arm) has no `mim/` stage folder: its summary is the run's own."""
    summary = {"knn_top1": 0.52, "knn_random_init": 0.59, "linear_top1": 0.66, "linear_random_init": 0.64}
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    assert end_of_run_scores(tmp_path) == {"trained": {"knn": 0.52, "linear": 0.66},
                                           "random": {"knn": 0.59, "linear": 0.64}}


def test_the_mae_arm_sees_as_many_images_as_pecos_stage_two() -> None:
    peco, mae = load_config(["method=peco"]).trainer, load_config(["method=mae"]).trainer
    for mim_steps in (40, peco.max_steps, 300):
        assert mae_steps(mim_steps) * mae.batch_size == mim_steps * peco.batch_size
