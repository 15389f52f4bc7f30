"""reidx: find people in large image and video archives, and ask where else they appear.

The repository's top-level folders install as one package (``reidx.pipeline``,
``reidx.indexers``, ``reidx.cli``). The names below are the Python API the CLI calls; they are
imported lazily so that ``import reidx`` (and ``reidx --help``) stays fast.
"""

from __future__ import annotations

__version__ = "0.2.0"

_API = {
    "Embedder": ("reidx.api", "Embedder"),
    "Gallery": ("reidx.api", "Gallery"),
    "evaluate": ("reidx.api", "evaluate"),
    "Detector": ("reidx.pipeline.detect", "Detector"),
}

__all__ = ["__version__", *_API]


def __getattr__(name: str):
    if name in _API:
        import importlib

        module_name, attribute = _API[name]
        value = getattr(importlib.import_module(module_name), attribute)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'reidx' has no attribute {name!r}")
