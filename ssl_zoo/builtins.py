"""Import the core's own registry entries (datasets, strategies, launchers, evaluation protocols, the
fine-tuning method and the `timm` backbone) so lookups find them.
(The DeepSpeed strategy imports deepspeed only when built, so registering it costs nothing.)"""
import ssl_zoo.data.datasets  # noqa: F401
import ssl_zoo.data.labelled  # noqa: F401
import ssl_zoo.engine.deepspeed_strategy  # noqa: F401
import ssl_zoo.engine.strategy  # noqa: F401
import ssl_zoo.evaluation.finetune  # noqa: F401  (also the frozen-feature protocols)
import ssl_zoo.launch.local  # noqa: F401
import ssl_zoo.launch.slurm  # noqa: F401
