"""The GMAN network, pure PyTorch (no Lightning, no MLflow).

``GMAN`` is the model; the layer classes are exported for tests, for
alternative assemblies and for registering other spatial attentions in
``SPATIAL_ATTENTIONS`` (``"dense"``, and ``"group"``: the paper's group spatial
attention for large networks, ``group_attention.py``).
"""
from gman.model.gman import GMAN
from gman.model.group_attention import GroupSpatialAttention, default_num_groups, make_partition
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
    "GroupSpatialAttention",
    "default_num_groups",
    "make_partition",
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
