"""ALICE workbook: adapters that make one pre-trained STF image codec serve many bitrates.

ALICE (VCIP 2024) freezes an STF model (Zou et al., CVPR 2022) trained at one
rate-distortion trade-off and trains small low-rank adapters per other rate.

* :mod:`alice_lib.models` — the STF codec (``SymmetricalTransFormer``, ``STFConfig``)
* :mod:`alice_lib.checkpoints` — published and own checkpoints
* :mod:`alice_lib.lora` — adapters: inject, mark trainable, merge (MALICE), adapter files
* :mod:`alice_lib.train` — the rate-distortion training loop
* :mod:`alice_lib.data` — image folders, Kodak download, offline fallback
* :mod:`alice_lib.evaluate`, :mod:`alice_lib.complexity`, :mod:`alice_lib.figures` — results
* :mod:`alice_lib.pipeline` — profiles and the notebooks' steps; ``alice run`` drives them
"""

import warnings

# CompressAI 1.2.8 scripts a helper at import time; the warning is not ours to act on.
warnings.filterwarnings("ignore", message=r"`torch.jit.script` is deprecated", category=FutureWarning)

from .checkpoints import load_stf, save_stf  # noqa: E402
from .lora import LoRAConfig, inject_lora, mark_trainable, merge_lora, unmerge_lora  # noqa: E402
from .models import STFConfig, SymmetricalTransFormer  # noqa: E402

__version__ = "0.1.0"
__all__ = ["STFConfig", "SymmetricalTransFormer", "load_stf", "save_stf", "LoRAConfig", "inject_lora",
           "mark_trainable", "merge_lora", "unmerge_lora"]
