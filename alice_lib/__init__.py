"""ALICE workbook: adapters that make one pre-trained STF image codec serve many bitrates.

ALICE (VCIP 2024) freezes an STF model (Zou et al., CVPR 2022) trained at one
rate-distortion trade-off and trains small low-rank adapters per other rate.

* :mod:`alice_lib.models` — the STF codec (``SymmetricalTransFormer``, ``STFConfig``)
* :mod:`alice_lib.checkpoints` — published and own checkpoints
* :mod:`alice_lib.lora` — adapters: inject, mark trainable, merge (MALICE); :mod:`alice_lib.adapter_files`
* :mod:`alice_lib.train` — the rate-distortion training loop
* :mod:`alice_lib.data` — image folders; :mod:`alice_lib.data_sources` — Kodak download, OpenImages, fallback
* :mod:`alice_lib.evaluation` — real-bitstream evaluation, classical codecs, BD tables, complexity
* :mod:`alice_lib.figures` — draws the tables evaluation wrote
* :mod:`alice_lib.settings` — profiles as typed settings; :mod:`alice_lib.run_folder` — the run folder
* :mod:`alice_lib.pipeline` — the notebooks' steps; :mod:`alice_lib.driver` (``alice run``) runs the notebooks
* :mod:`alice_lib.codec` — ``.alice`` files: format, continuous rate control, tiled coding, target search
"""

import importlib
import warnings

# CompressAI 1.2.8 scripts a helper at import time; the warning is not ours to act on.
warnings.filterwarnings("ignore", message=r"`torch.jit.script` is deprecated", category=FutureWarning)

__version__ = "0.1.0"
# Imported on first use (PEP 562), so that light commands (``alice info``) never import torch.
_LAZY = {"STFConfig": "models", "SymmetricalTransFormer": "models", "load_stf": "checkpoints",
         "save_stf": "checkpoints", "LoRAConfig": "lora", "inject_lora": "lora", "mark_trainable": "lora",
         "merge_lora": "lora", "unmerge_lora": "lora"}
__all__ = ["STFConfig", "SymmetricalTransFormer", "load_stf", "save_stf", "LoRAConfig", "inject_lora",
           "mark_trainable", "merge_lora", "unmerge_lora"]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
