"""The GMAN network, pure PyTorch (no Lightning, no MLflow).

``GMAN`` is the model; the layer classes are exported for tests, for
alternative assemblies and for registering other spatial attentions in
``SPATIAL_ATTENTIONS``.
"""
from gman.model.gman import GMAN
from gman.model.layers import (
    BATCH_NORM_MODES,
    FC,
    SPATIAL_ATTENTIONS,
    STE,
    BatchNorm,
    GatedFusion,
    SpatialAttention,
    SpatioTemporalEmbedding,
    STAttBlock,
    TemporalAttention,
    TransformAttention,
    attention,
)

__all__ = [
    "GMAN",
    "BATCH_NORM_MODES",
    "FC",
    "SPATIAL_ATTENTIONS",
    "STE",
    "BatchNorm",
    "GatedFusion",
    "SpatialAttention",
    "SpatioTemporalEmbedding",
    "STAttBlock",
    "TemporalAttention",
    "TransformAttention",
    "attention",
]
