"""Import the few CompressAI modules STF needs without CompressAI's package initialisers.

``import compressai`` runs ``compressai/__init__.py``, which imports every dataset,
model and transform registry of the library, point clouds included, and through
them ``torch_geometric`` (measured with ``python -X importtime``: about 3.6 s of the
start-up of every ``alice`` call). STF needs the entropy models, the rANS coder,
two layer helpers and ``CompressionModel``. :func:`lean_compressai` registers the
packages ``compressai``, ``compressai.models`` and ``compressai.latent_codecs`` as
empty shells whose submodules import normally; the first attribute a shell does not
have (``compressai.zoo``, ``compressai.models.Cheng2020Anchor`` ...) runs that
package's real ``__init__`` into the shell, so every other use of CompressAI keeps
working. Nothing is done when ``compressai`` is already imported.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types

_SHELLS = ("compressai", "compressai.models", "compressai.latent_codecs")


class _Shell(types.ModuleType):
    """A package whose ``__init__`` runs only when an attribute it lacks is asked for."""

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        try:
            return importlib.import_module(f"{self.__name__}.{name}")
        except ModuleNotFoundError:
            pass
        state = self.__dict__
        if not state.get("_alice_initialised"):
            state["_alice_initialised"] = True
            self.__spec__.loader.exec_module(self)
        if name in state:
            return state[name]
        raise AttributeError(f"module {self.__name__!r} has no attribute {name!r}")


def _shell(name: str) -> None:
    spec = importlib.util.find_spec(name)
    module = _Shell(name)
    module.__spec__, module.__file__ = spec, spec.origin
    module.__path__ = list(spec.submodule_search_locations)
    module.__package__ = name
    sys.modules[name] = module
    parent, _, child = name.rpartition(".")
    if parent:
        setattr(sys.modules[parent], child, module)


def lean_compressai() -> None:
    """Make ``compressai`` importable submodule by submodule (see the module docstring)."""
    if "compressai" in sys.modules:
        return
    for name in _SHELLS:
        _shell(name)
    root = sys.modules["compressai"]
    # What compressai/__init__.py defines and the entropy models ask their package for.
    root.__dict__.update(_entropy_coder="ans", get_entropy_coder=lambda: "ans",
                         available_entropy_coders=lambda: ["ans"])
    latent = sys.modules["compressai.latent_codecs"]
    latent.LatentCodec = importlib.import_module("compressai.latent_codecs.base").LatentCodec
