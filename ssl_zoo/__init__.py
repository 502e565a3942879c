"""ssl_zoo: a config-driven self-supervised-learning zoo for Vision Transformers.

The public names a plugin uses: the registries, the method contract and the checkpoint helpers.
"""
from ssl_zoo.method import Method, Stage, StepOutput, TimmSpec
from ssl_zoo.registry import BACKBONES, DATASETS, LAUNCHERS, METHODS, STRATEGIES, Registry

__all__ = ["Method", "Stage", "StepOutput", "TimmSpec", "Registry", "METHODS", "BACKBONES", "DATASETS", "LAUNCHERS",
           "STRATEGIES"]
__version__ = "0.1.0"
