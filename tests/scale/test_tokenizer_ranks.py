"""PeCo's tokenizer (stage 1) on 2 processes: after k-means and dead-code restarts every rank holds the same
codebook, under DDP and ZeRO-1 (EMA codebook) and DDP and ZeRO-3 with a gradient codebook and the cosine lookup
(ZeRO-3 partitions a trained codebook: k-means and restarts write it through its gathered slices and master copy)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.scale.conftest import TINY_PECO, run_zoo

pytestmark = pytest.mark.deepspeed

#: stage 1 alone, through the test plugin that saves each rank's codebook after the last step; dead codes
#: restart after 1 idle step, so some restart within the 4 steps
TOKENIZER = ["plugins=[tests.plugins.rank_codebooks]", "method=peco_tokenizer_rank_codebooks", "model=beit_tiny",
             *[o for o in TINY_PECO if o != "method=peco" and not o.startswith("method.tokenizer_training")],
             "trainer.max_steps=4", "trainer.lr=1e-3", "method.tokenizer.quantizer.dead_after_steps=1",
             "launcher.nprocs=2"]


@pytest.mark.parametrize("strategy", [
    pytest.param(["strategy=ddp"], id="ddp"),
    pytest.param(["strategy=deepspeed", "strategy.zero_stage=1"], id="zero1"),
    pytest.param(["strategy=ddp", "method.tokenizer.quantizer.codebook_update=gradient",
                  "method.tokenizer.quantizer.metric=cosine"], id="ddp-gradient-cosine"),
    pytest.param(["strategy=deepspeed", "strategy.zero_stage=3", "method.tokenizer.quantizer.codebook_update=gradient",
                  "method.tokenizer.quantizer.metric=cosine"], id="zero3-gradient-cosine"),
])
def test_both_ranks_end_with_the_same_codebook(strategy: list[str], tmp_path: Path) -> None:
    run_zoo(*TOKENIZER, *strategy, f"output_dir={tmp_path}", timeout=900)
    ranks = [torch.load(tmp_path / f"codebook-rank{r}.pt") for r in (0, 1)]
    assert bool(ranks[0]["initialised"]) and (ranks[0]["last_restart"] >= 0).any(), "no k-means or no restart"
    assert ranks[0].keys() == ranks[1].keys()
    for key in ranks[0]:
        assert torch.equal(ranks[0][key], ranks[1][key]), key
    assert json.loads((tmp_path / "summary.json").read_text())["codebook_usage"] > 0
