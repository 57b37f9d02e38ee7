"""gman: GMAN traffic forecasting on sensor networks — train, evaluate, serve.

Importing ``gman`` is cheap: heavy pieces (torch, Lightning, PyG, MLflow) are
imported by the sub-modules that need them, on first use.
"""
from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["Forecaster", "__version__"]


def __getattr__(name: str):
    # Lazy so that ``import gman`` stays light for scripts that only serve.
    if name == "Forecaster":
        from gman.serving.forecaster import Forecaster

        return Forecaster
    raise AttributeError(f"module 'gman' has no attribute {name!r}")
