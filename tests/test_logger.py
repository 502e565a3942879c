"""metrics.jsonl reads as one uninterrupted run however often the same command is started."""
from __future__ import annotations

import json
from pathlib import Path

from ssl_zoo.engine.logger import MetricsLogger


def rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_a_finished_run_started_again_logs_its_end_figures_once(tmp_path: Path) -> None:
    first = MetricsLogger(tmp_path, start_step=0, max_steps=10, enabled=True, progress=False)
    for step in (5, 10):
        first.log(step, {"loss": 1.0 / step})
    first.log(10, {"heldout_psnr": 22.0})  # the end-of-run record, after the last checkpoint
    first.log(12, {"loss": 0.05})  # a killed run's line past the checkpoint at 10
    expected = rows(tmp_path)[:3]
    again = MetricsLogger(tmp_path, start_step=10, max_steps=10, enabled=True, progress=False)
    again.log(10, {"heldout_psnr": 22.0})
    assert rows(tmp_path) == expected
    assert again.last == {"step": 10, "heldout_psnr": 22.0}
    again.log(10, {"knn_top1": 0.5})  # a record of other keys at that step is new, and written
    assert rows(tmp_path) == [*expected, {"step": 10, "knn_top1": 0.5}]
