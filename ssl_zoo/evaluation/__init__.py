"""Evaluation of pretrained backbones: which model a run holds (`backbone`), frozen features and the kNN and
linear-probe protocols (`features`, `protocols`), and supervised fine-tuning as a method (`finetune`)."""
