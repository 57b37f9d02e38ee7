"""Data: sensor data sets, readers, graphs, embeddings, windows, the data module.

Names are imported lazily on first use, so ``import gman.data`` stays cheap
(no torch, Lightning or PyG until a name that needs them is touched) and a
module that is not there yet only fails when its name is asked for.
"""
from __future__ import annotations

from gman._lazy import lazy_exports

# public name -> module that defines it
_EXPORTS: dict[str, str] = {
    "SensorDataset": "gman.data.dataset",
    "time_features": "gman.data.dataset",
    "load_dataset": "gman.data.readers",
    "make_synthetic": "gman.data.synthetic",
    "chronological_split": "gman.data.windows",
    "StandardScaler": "gman.data.windows",
    "WindowDataset": "gman.data.windows",
    "GMANDataModule": "gman.data.datamodule",
    "gaussian_kernel_adjacency": "gman.data.graph",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
