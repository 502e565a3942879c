"""Wall time of each evaluation protocol and the feature-extraction rate, on crop_id with the default
architecture of a method (at random init: the cost does not depend on the weights).

    python -m benchmarks.eval_protocols [--method peco] [--finetune-steps 100] [--out DIR]

Runs `python -m ssl_zoo.eval checkpoint=random architecture=<a run directory holding only the method's default
config>` for knn, linear and finetune, each in its own process, and prints one JSON line per protocol with the
process wall time and eval.json's own figures (feature images/s, fine-tuning images/s). The fine-tune ratio
`wall / (5 min)` is the figure to compare with the 5-minute budget on 2 cores.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="peco")
    parser.add_argument("--finetune-steps", type=int, default=100, help="trainer.max_steps of the fine-tune")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    from ssl_zoo.config import load_config, to_yaml

    root = args.out or Path(tempfile.mkdtemp(prefix="eval_bench_"))
    arch = root / "architecture"
    arch.mkdir(parents=True, exist_ok=True)
    (arch / "config.yaml").write_text(to_yaml(load_config([f"method={args.method}"])))
    for protocol in ("knn", "linear", "finetune"):
        out = root / protocol
        command = [sys.executable, "-m", "ssl_zoo.eval", "checkpoint=random", f"architecture={arch}",
                   f"protocol={protocol}", f"output_dir={out}", "trainer.progress=false"]
        if protocol == "finetune":
            command.append(f"trainer.max_steps={args.finetune_steps}")
        started = time.perf_counter()
        subprocess.run(command, check=True, capture_output=True, text=True)
        wall = time.perf_counter() - started
        record = json.loads((out / "eval.json").read_text())
        row = {"protocol": protocol, "process_wall_s": round(wall, 1), "eval_wall_s": record["wall_time_s"],
               "top1": round(record["score"], 4), "feature_images_per_s": record["metrics"].get("feature_images_per_s"),
               "test_images_per_s": record["metrics"].get("test_images_per_s")}
        if protocol == "finetune":
            rows = [json.loads(line) for line in (out / "finetune" / "metrics.jsonl").read_text().splitlines()]
            rates = [r["images_per_s"] for r in rows if "images_per_s" in r]
            row.update(steps=args.finetune_steps, train_images_per_s=round(sorted(rates)[len(rates) // 2], 1),
                       share_of_5_min=round(wall / 300, 3))
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
