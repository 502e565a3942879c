"""The PeCo plugin (import name `ssl_zoo_peco`): perceptual-codebook BERT pre-training of ViTs.

Loaded by the core through the `ssl_zoo.plugins` entry point; importing it registers
- methods `peco_tokenizer` (stage 1, the perceptual codebook) and `peco` (stage 2, masked image modelling,
  two-stage when no tokenizer checkpoint is given),
- backbone `beit` (BEiT ViT with mask token, exportable to timm's `beit_*`);
and its `configs/` folder joins the config search path: methods `peco`, `peco_tokenizer`, models
`beit_tiny` ... `beit_huge`, experiments `peco_vit_*` (the paper's recipes).
"""
from . import beit, mim_method, tokenizer_method  # noqa: F401  (imported for their registrations)
