"""Per-rank memory of a training run, from parameter counts, the model section and DeepSpeed's ZeRO settings:
what `launcher.dry_run` prints for a recipe, and what `python -m benchmarks.memory_model` checks against the
per-rank peaks of allocated tensor memory measured on CPU (the figures are in benchmarks/RESULTS.md).

DeepSpeed's estimators assume 16-bit module weights; here bf16 is `torch_autocast`, which keeps the module in
fp32 and casts inside the forward, and they leave out its buffers, activations and frozen networks. This model
counts, per rank, with P trainable and F frozen parameters on N ranks (bytes), the ZeRO settings `z`
(DeepSpeed's `DeepSpeedZeroConfig`, its defaults where the run sets nothing):

- module weights, fp32: 4P under ZeRO-1/2 (one flat buffer the parameters are views of); under ZeRO-3 this
  rank's partition 4P/N (none on the GPU with `offload_params`) plus the gathered whole parameters: a gathered
  parameter is released after its module only if its next use (in backward) lies more than
  `stage3_max_reuse_distance` elements of the trace ahead, so the last R/2 elements of the forward stay
  gathered, at most `stage3_max_live_parameters`, at least the prefetch bucket;
- fp32 master copy in the optimiser (DeepSpeed keeps one even of fp32 weights): 4P/N;
- gradients, fp32: the partition 4P/N under ZeRO-2 (`grads_in_partition`) and ZeRO-3
  (`grad_partitions_flat_buffer`); under ZeRO-1 autograd's whole gradients, 4P, which DeepSpeed moves into its
  bucket only after backward: they build up while backward frees the saved activations, so the peak takes the
  larger of the two (`whole_gradients`), not their sum;
- DeepSpeed's gradient buckets (`contiguous_gradients`): `reduce_bucket_size` elements, allocated whole, twice
  under ZeRO-1/2 with `overlap_comm` (double buffering); ZeRO-3 allocates one at start-up and keeps it;
- AdamW moments: 8P/N (master, moments and the partitioned gradients move to CPU memory with
  `offload_optimizer`);
- frozen networks: 4F, whole on every rank (ZeRO-3 keeps frozen parameters out of partitioning);
- activations saved for backward, for a ViT model section (`embed_dim`, `depth`, `num_heads`, `img_size`,
  `patch_size`, `mlp_ratio`): per block and token, the tensors autograd keeps (see `vit_activation_bytes`);
  with activation checkpointing only each block's input stays, plus one block recomputed during backward.
  A model section without those keys gets no activation term (the figure says so);
- the no-grad forward of the frozen parts that make the method's targets (`Method.frozen_forward_bytes`, in
  fp32; half under bf16 autocast), which runs before the backbone's forward: the peak takes the larger of it
  and the activations.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional

GIB = 2**30


def zero_settings(stage: int, zero: Optional[Mapping[str, Any]] = None) -> Any:
    """DeepSpeed's own reading of a `zero_optimization` section (its defaults for what it leaves out, e.g.
    `overlap_comm` on under ZeRO-3 only), so the model uses the buckets the engine allocates."""
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    return DeepSpeedZeroConfig(**{**(zero or {}), "stage": stage})


@dataclasses.dataclass
class MemoryEstimate:
    """Bytes per rank, by part; `total` is the modelled peak of a training step: the model states, DeepSpeed's
    buckets and the frozen weights, plus the largest of three that are never alive together: the backbone's
    activations, the frozen parts' no-grad forward (the method's targets are computed before the backbone's
    forward) and ZeRO-1's whole gradients (complete only once backward has freed the activations)."""

    weights: float
    master: float
    gradients: float
    optimizer: float
    frozen: float
    activations: Optional[float]  # None: the model section is not a ViT this model knows
    frozen_forward: float = 0.0
    buckets: float = 0.0
    whole_gradients: float = 0.0

    @property
    def model_states(self) -> float:
        return self.weights + self.master + self.gradients + self.optimizer

    @property
    def total(self) -> float:
        transient = max(self.activations or 0.0, self.frozen_forward, self.whole_gradients)
        return self.model_states + self.buckets + self.frozen + transient

    def as_gib(self) -> dict[str, Any]:
        parts = dataclasses.asdict(self)
        return {k: (None if v is None else round(v / GIB, 3)) for k, v in {**parts, "total": self.total}.items()}


def vit_activation_bytes(model: Any, batch: int, bf16: bool, checkpointing: bool) -> Optional[float]:
    """Bytes autograd keeps for one training forward of a ViT (timm / BEiT blocks) on `batch` images.

    Per block and token of width h, fp32: the inputs of LayerNorm 1 and 2, of the qkv, proj, fc1 and fc2
    linears, q, k, v and the attention's output, GELU's and fc2's inputs (mlp_ratio x h each), both layer-scale
    products: (11 + 2 mlp_ratio) h values, 76h bytes at mlp_ratio 4. Under bf16 autocast the LayerNorm inputs
    stay fp32 and the rest is kept in bf16, (34 + 4 mlp_ratio) h bytes (50h), plus the bf16 copies of the
    block's linear weights ((4 + 2 mlp_ratio) h^2 values), which autocast keeps for backward. Outside the
    blocks (patch embedding, final norm, head inputs): 5h bytes per token in fp32, 16h in bf16. These are the
    counts of the tensors a BEiT block hands to autograd (`saved_tensors_hooks`), which match the list. With
    checkpointing each block keeps only its fp32 input (4h), and backward recomputes one block at a time."""
    keys = ("embed_dim", "depth", "num_heads", "img_size", "patch_size")
    if any(k not in model for k in keys):
        return None
    h, depth = int(model.embed_dim), int(model.depth)
    mlp = float(model.get("mlp_ratio", 4.0))
    tokens = batch * ((int(model.img_size) // int(model.patch_size)) ** 2 + 1)
    per_token = ((34 + 4 * mlp) if bf16 else 4 * (11 + 2 * mlp)) * h
    block = tokens * per_token + (2 * (4 + 2 * mlp) * h * h if bf16 else 0)
    outside = tokens * (16 if bf16 else 5) * h
    if not checkpointing:
        return depth * block + outside
    return depth * tokens * 4 * h + block + outside


def estimate(trainable: int, frozen: int, world: int, zero_stage: int, model: Any, batch: int, bf16: bool,
             checkpointing: bool, offload_optimizer: bool = False, offload_params: bool = False,
             frozen_forward: float = 0.0, zero: Optional[Mapping[str, Any]] = None) -> MemoryEstimate:
    """The per-rank memory of one training step (see the module docstring for each term). `frozen_forward`:
    the method's `frozen_forward_bytes`; `zero`: the run's DeepSpeed `zero_optimization` section (None: the
    one `deepspeed_config` writes, DeepSpeed's defaults)."""
    p, n = float(trainable), max(1, world)
    z = zero_settings(zero_stage, zero)
    bucket = 4.0 * z.reduce_bucket_size if z.contiguous_gradients else 0.0
    if zero_stage == 3:
        gathered = min(p, max(z.max_reuse_distance / 2, z.prefetch_bucket_size), z.max_live_parameters)
        weights = (0.0 if offload_params else 4 * p / n) + 4 * gathered
        buckets = bucket
    else:
        weights = 4 * p
        buckets = bucket * (2 if z.overlap_comm else 1)
    gradients = 0.0 if zero_stage == 1 or offload_optimizer else 4 * p / n
    master = 0.0 if offload_optimizer else 4 * p / n
    optimizer = 0.0 if offload_optimizer else 8 * p / n
    return MemoryEstimate(weights=weights, master=master, gradients=gradients, optimizer=optimizer,
                          frozen=4.0 * frozen, activations=vit_activation_bytes(model, batch, bf16, checkpointing),
                          frozen_forward=frozen_forward * (0.5 if bf16 else 1.0), buckets=buckets,
                          whole_gradients=4 * p if zero_stage == 1 else 0.0)
