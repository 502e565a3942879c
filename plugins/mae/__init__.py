"""The MAE plugin (import name `ssl_zoo_mae`): masked autoencoder pre-training of ViTs (He et al. 2021).

Loaded by the core through the `ssl_zoo.plugins` entry point; importing it registers
- method `mae` (configs/method/mae.yaml, which selects its default model `mae_vit_tiny`),
- backbone `mae_vit` (a timm ViT encoder of the visible patches; configs/model/mae_vit_{tiny..huge}.yaml).
"""
from . import method, vit  # noqa: F401  (imported for their registrations)
