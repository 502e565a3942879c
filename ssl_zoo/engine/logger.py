"""Where training progress goes: `metrics.jsonl`, TensorBoard, and a progress bar or log lines.

Only rank 0 writes. On resume, lines for steps after the checkpoint (logged by the killed run before it
died) are dropped, and a line the run logs again at the checkpoint's step (a finished run started again
recomputes its end-of-run figures) is not written twice, so the file reads as if the run had never stopped.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, Optional

from tqdm import tqdm

#: keys that depend on wall-clock time; everything else in a metrics line is reproducible
TIMING_KEYS = ("time_s", "images_per_s")


class MetricsLogger:
    def __init__(self, output_dir: Path, start_step: int, max_steps: int, enabled: bool,
                 progress: Optional[bool] = None) -> None:
        self.enabled = enabled
        self.path = output_dir / "metrics.jsonl"
        self.last: dict[str, Any] = {}
        self._start_step = start_step
        self._keys_at_start: set[frozenset[str]] = set()  # key sets of the lines kept at start_step
        self._t0 = time.perf_counter()
        self._tb = None
        self._bar = None
        if not enabled:
            return
        self._truncate_after(start_step)
        from torch.utils.tensorboard import SummaryWriter

        self._tb = SummaryWriter(str(output_dir / "tensorboard"), purge_step=start_step + 1)
        show_bar = sys.stderr.isatty() if progress is None else progress
        if show_bar:
            self._bar = tqdm(total=max_steps, initial=start_step, unit="step", dynamic_ncols=True)

    def _truncate_after(self, step: int) -> None:
        if not self.path.exists():
            return
        kept = [(line, json.loads(line)) for line in self.path.read_text().splitlines() if line.strip()]
        kept = [(line, record) for line, record in kept if record["step"] <= step]
        self.path.write_text("".join(line + "\n" for line, _ in kept))
        self.last = kept[-1][1] if kept else {}
        self._keys_at_start = {frozenset(record) - {"step"} for _, record in kept if record["step"] == step}

    def progress(self, step: int) -> None:
        """Advance the bar; it shows the figures of the last log step (reading them every step would
        synchronise the device)."""
        if self._bar is not None:
            self._bar.update(step - self._bar.n)

    def log(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        record = {"step": step, **{k: round(float(v), 7) if k in TIMING_KEYS else float(v)
                                    for k, v in values.items()}}
        self.last = record
        if step == self._start_step and frozenset(values) in self._keys_at_start:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        for key, value in values.items():
            self._tb.add_scalar(f"train/{key}", value, step)
        if self._bar is not None:
            self._bar.set_postfix(loss=f"{record.get('loss', float('nan')):.4f}",
                                  img_s=f"{record.get('images_per_s', 0.0):.1f}", refresh=False)
        else:
            shown = " ".join(f"{k}={v:.4g}" for k, v in record.items() if k != "step")
            print(f"step {step}: {shown}", flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._tb is not None:
            self._tb.close()
