"""Test plugin: PeCo's tokenizer stage that also writes every rank's codebook after its last step, so a
multi-process test can compare the ranks (a run's own checkpoints and exports hold rank 0's copy only)."""
import contextlib
import dataclasses
from pathlib import Path

import torch

from ssl_zoo import METHODS
from ssl_zoo.engine import distributed as dist
from ssl_zoo_peco.config import PecoTokenizerConfig
from ssl_zoo_peco.tokenizer_method import PecoTokenizer


@dataclasses.dataclass
class RankCodebooksConfig(PecoTokenizerConfig):
    name: str = "peco_tokenizer_rank_codebooks"


@METHODS.register("peco_tokenizer_rank_codebooks", schema=RankCodebooksConfig)
class RankCodebooks(PecoTokenizer):
    def __init__(self, cfg):
        super().__init__(cfg)
        self.dump_at, self.out = cfg.trainer.max_steps - 1, Path(cfg.output_dir)
        self.restarted = 0

    def training_step(self, batch, step):
        out = super().training_step(batch, step)
        quantizer = self.tokenizer.quantizer
        if step == self.dump_at:
            gathered = contextlib.nullcontext()
            if hasattr(quantizer.codebook, "ds_id"):  # a ZeRO-3 slice: read the whole codebook, change nothing
                import deepspeed

                gathered = deepspeed.zero.GatheredParameters([quantizer.codebook], modifier_rank=None)
            with gathered:
                codebook = quantizer.codebook.detach().clone()
            state = {"codebook": codebook, "last_restart": quantizer.last_restart.clone(),
                     "initialised": quantizer.initialised.clone()}
            if quantizer.cfg.codebook_update == "ema":
                state.update(ema_sum=quantizer.ema_sum.clone(), ema_count=quantizer.ema_count.clone())
            torch.save(state, self.out / f"codebook-rank{dist.rank()}.pt")
        return out
