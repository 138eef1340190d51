"""Rate-distortion training: one loop for fixed-rate models, vanilla fine-tuning and ALICE adapters.

Modules, each owning one concern (imports go down this list):

* :mod:`.config` -- :class:`TrainConfig`, built from a profile's schedule in one place
  (:meth:`TrainConfig.from_schedule`); bf16 where the hardware has it.
* :mod:`.hyperprior` -- the schedule's two hyperprior options (``hyper_init_gain``,
  ``hyper_lr_scale``), what they do and the study behind them.
* :mod:`.loss` -- the rate-distortion objective and its validation.
* :mod:`.optim` -- optimizers, learning-rate schedule, the moving average of the weights.
* :mod:`.sampling` -- the global batches and seeded crops that make runs resumable and
  independent of the number of processes (the synthetic images for tests are
  :class:`alice_lib.data.SyntheticImages`).
* :mod:`.state` -- checkpoints, resume, random state per rank, ``metrics.csv``.
* :mod:`.loop` -- :func:`train`, the loop itself (DDP under ``torchrun``).
* :mod:`.prepare` -- what a run starts from (first weights, what the method trains, images),
  shared by the pipeline and the command line.
* :mod:`.command` -- ``alice train``.
"""

from .config import TrainConfig, fast_bf16, resolved_precision
from .hyperprior import amplify_hyper_latent, hyperprior_groups
from .loop import train
from .loss import NonFiniteLossError, RateDistortionLoss, float_output, split_parameters, validate
from .optim import WeightAverage
from .prepare import prepare_method, start_model, training_data
from .sampling import GlobalBatchSampler, SeededItems
from .state import CHECKPOINT_FORMAT, load_checkpoint, load_weights

__all__ = [
    "TrainConfig", "fast_bf16", "resolved_precision", "amplify_hyper_latent", "hyperprior_groups", "train",
    "NonFiniteLossError", "RateDistortionLoss", "float_output", "split_parameters", "validate", "WeightAverage",
    "prepare_method", "start_model", "training_data", "GlobalBatchSampler", "SeededItems",
    "CHECKPOINT_FORMAT", "load_checkpoint", "load_weights",
]
