"""The README's main job, exactly as a user runs it: `python -m ssl_zoo.run method=peco` on the embedded data."""
import json

import pytest

from tests.conftest import read_metrics

pytestmark = pytest.mark.e2e


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


def test_main_job_trains_both_stages(cli, tmp_path):
    proc = cli("method=peco", cwd=tmp_path, timeout=1500)
    runs = tmp_path / "runs" / "peco"
    tokenizer, mim = runs / "tokenizer", runs / "mim"
    for stage in (tokenizer, mim):
        pointer = (stage / "checkpoints" / "last").read_text().strip()
        assert (stage / "checkpoints" / pointer / "state.pt").is_file()
        assert (stage / "export" / "method.safetensors").is_file()
        losses = [row["loss"] for row in read_metrics(stage) if "loss" in row]  # not the held-out rows
        assert mean(losses[-3:]) < mean(losses[:3]), (stage.name, losses)
    png = tokenizer / "pictures" / "reconstructions.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    stage_summaries = json.loads((runs / "summary.json").read_text())
    assert [s["stage"] for s in stage_summaries] == ["tokenizer", "mim"]
    assert stage_summaries[0]["codebook_usage"] >= 0.5
    tok = stage_summaries[0]  # issue 13's tokenizer bar, on held-out crops
    assert tok["heldout_psnr"] > tok["heldout_psnr_thumbnail"], tok  # more than one average colour per token
    assert tok["heldout_psnr"] > tok["heldout_psnr_shuffled"] + 5, tok  # the codes carry their own image
    assert tok["heldout_perceptual"] < tok["heldout_perceptual_thumbnail"], tok  # closer than a blur
    assert 0 <= stage_summaries[1]["final_mim_accuracy"] <= 1
    for key in ("knn_top1", "knn_random_init", "linear_top1", "linear_random_init"):  # the score, beside its floor
        assert 0 <= stage_summaries[1][key] <= 1, key
    for text in ("== summary", "[tokenizer]", "[mim]", "codebook_usage", "final_mim_accuracy", "wall_time_s",
                 "knn_top1", "linear_random_init",
                 "runs/peco/tokenizer/pictures/reconstructions.png"):
        assert text in proc.stdout, text
