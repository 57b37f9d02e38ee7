"""The GMAN network (Zheng, Fan, Wang, Qi: "GMAN: A Graph Multi-Attention
Network for Traffic Prediction", AAAI 2020) as a plain ``nn.Module``.

Data flow (``D = K·d``; shapes for a batch of ``B`` windows)::

    x [B, P, N] ─ unsqueeze ─ FC[D, D] (1 → D ReLU, D → D) ─────────────────► X [B, P, N, D]
    SE [N, D_se], time [B, P+Q, 2] ─ SpatioTemporalEmbedding ──► STE [B, P+Q, N, D]
                                        STE_P = STE[:, :P], STE_Q = STE[:, P:]
    X ─ L × STAttBlock(·, STE_P) ─ TransformAttention(·, STE_P, STE_Q) ─ L × STAttBlock(·, STE_Q)
      ─ dropout ─ FC D → D (ReLU) ─ dropout ─ FC D → 1 ─ squeeze ──────────► y [B, Q, N]

Inputs and outputs are normalised (z-scored) values; the caller scales.

Paper vs. the authors' code — this module follows the code by default, each
difference is a named constructor option:

==========================  ======================  =========================================
option                      default (code)          paper / alternative
==========================  ======================  =========================================
``attention_output_fc``     True: FC[D, D] (ReLU,   False: the attention output is the
                            linear) after spatial,  concatenation of the heads (eqs. 3, 5, 8)
                            temporal and transform
                            attention
``fusion_output_fc``        True: FC[D, D] after    False: ``H = z⊙H_S + (1−z)⊙H_T`` (eq. 7)
                            the gated fusion
``batch_norm``              ``"activation"``: BN    ``"all"`` (after every FC layer but the
                            (eps 1e-3) between the  final 1-channel one), ``"none"``; the paper
                            linear map and ReLU of  does not mention batch-norm
                            FC layers with ReLU
``causal_mask``             True (METR-LA code,     False (the authors' PEMS-BAY code)
                            paper)
``dropout``                 0.1 before each of the  0.0 (the authors' PEMS-BAY code)
                            two output FC layers
                            (METR-LA code)
==========================  ======================  =========================================

The authors' batch-norm momentum follows a schedule (0.5, halved with the
learning-rate decay, floored at 0.01); ``bn_momentum`` sets the start and
:meth:`GMAN.set_bn_momentum` changes it later.

The forward pass has no data-dependent Python control flow (only checks of
static shapes), builds the one-hot time encodings as weight-row lookups (the
exact equivalent of one-hot × Linear, see ``SpatioTemporalEmbedding``) and, in
``eval`` mode under tracing (``torch.export`` / ``torch.onnx`` / ``torch.compile``),
uses only standard operators (the CPU's blocked spatial attention steps aside
for ``scaled_dot_product_attention`` there), so it can be exported.

Unlike a popular PyTorch port, the ``D`` channels are split into ``K`` heads
of ``d`` channels each (head ``k`` = channels ``k·d … k·d + d − 1``, as the
authors' ``tf.split(x, K, axis=-1)``), so ``K ≠ d`` works.
"""
from __future__ import annotations

import math
import numbers
from typing import Any

import torch
from torch import Tensor, nn

from gman.model.group_attention import PARTITION_METHODS, GroupSpatialAttention, make_partition
from gman.model.layers import (
    BATCH_NORM_MODES,
    FC,
    SPATIAL_ATTENTIONS,
    STE,
    BatchNorm,
    SpatioTemporalEmbedding,
    STAttBlock,
    TransformAttention,
)

__all__ = ["GMAN"]

# the dtypes ``time`` may have: integer indices (F.embedding takes them as long)
_TIME_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)
# the dtypes autocast casts to its lower precision and back (it leaves float64 as it is)
_AUTOCAST_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _is_integer(value: Any) -> bool:
    """An integer of any kind (Python or numpy), but not a bool: ``True`` is no layer count."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _positive_int(name: str, value: Any) -> int:
    if not _is_integer(value) or value < 1:
        raise ValueError(f"GMAN: {name} must be a positive integer, got {value!r}")
    return int(value)  # a plain int: the config stays JSON-serialisable


def _flag(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"GMAN: {name} must be true or false, got {value!r}")
    return value


def _fraction(name: str, value: Any, low_open: bool, high_closed: bool) -> float:
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = (value > 0 if low_open else value >= 0) and (value <= 1 if high_closed else value < 1)
    if not ok:
        lo, hi = ("(0" if low_open else "[0"), ("1]" if high_closed else "1)")
        raise ValueError(f"GMAN: {name} must be a number in {lo}, {hi}, got {value!r}")
    return float(value)


class GMAN(nn.Module):
    """Graph multi-attention network: ``[B, P, N]`` history → ``[B, Q, N]`` forecast.

    Args:
        num_nodes: ``N``, sensors.
        steps_per_day: ``T_day = 86400 / interval seconds`` (288 at 5 minutes), the
            depth of the time-of-day one-hot.
        se_dim: ``D_se``, width of the spatial embedding ``spatial_embedding [N, D_se]``.
        history_steps: ``P``.  horizon_steps: ``Q``.
        num_layers: ``L``, ST-attention blocks in the encoder and again in the decoder.
        num_heads: ``K``.  head_dim: ``d``; the model width is ``D = K·d``.
        dropout: dropout rate before each of the two output FC layers.
        causal_mask: temporal attention sees only current and earlier steps.
        day_of_week: the time embedding includes the day-of-week one-hot (the
            authors' model); ``False`` uses the time of day only, ``"weekend"``
            adds a working-day / weekend one-hot instead (see
            :class:`~gman.model.layers.SpatioTemporalEmbedding`: for data whose
            training part does not contain every day of the week).
        learnable_spatial_embedding: ``spatial_embedding`` is an ``nn.Parameter``
            (initialised ``N(0, 0.1²)``) rather than a buffer of zeros to be filled
            by :meth:`set_spatial_embedding` (e.g. from node2vec).
        attention_output_fc, fusion_output_fc, batch_norm: see the module docstring.
        bn_momentum: PyTorch batch-norm momentum (``1 −`` the authors' EMA decay).
        spatial_attention: name of the spatial attention implementation
            (``SPATIAL_ATTENTIONS``; ``"dense"`` = full attention over all sensors).
        spatial_attention_options: extra keyword arguments for it (JSON values).
        num_groups: ``G`` for ``spatial_attention="group"`` (the paper's group spatial
            attention, :class:`~gman.model.group_attention.GroupSpatialAttention`);
            ``None`` = the paper's rule ``M = round(∛(2N))``, ``G = ⌈N/M⌉``.
        partition_method: how sensors are split into groups: ``"random"`` (the paper;
            drawn from ``partition_seed``) or ``"bfs"`` (connected regions of the road
            graph; call :meth:`set_partition_graph` before the first forward).  The
            partition is a buffer of every block, so it is saved in the state dict.
        partition_seed: seed of the random partition.
        last_value_residual: **not in the paper or the authors' code; off by
            default.**  Add the last history step ``x[:, P−1]`` (normalised; where that
            reading is missing, the input's missing value: 0 = the training mean under
            ``observed`` normalisation, which is why ``GMANLightningModule`` refuses this
            option with the authors' normalisation, whose missing input is a reading of 0) to every horizon step of
            the output, so the network predicts the change from the last reading:
            ``Ŷ = Y_net + x_{P−1}``.  On short series the plain network can stay
            behind the last-value forecast at the first steps (measured on Los-loop,
            see the README); the skip connection, with the last output layer
            initialised to zero, starts it from exactly that forecast.
        residual_step_gain: **not in the paper or the authors' code; off by
            default; needs** ``last_value_residual``.  A learnable gain per horizon
            step ``g [Q]`` (initialised to one) on the predicted change:
            ``Ŷ_q = g_q · Y_net,q + x_{P−1}``.  The output layer is shared by all
            horizon steps, and the decoder knows a step's horizon only through its
            time of day, so the network has no direct way to trust the last reading
            more at 5 minutes than at 60; the gain gives it one.

    forward(x [B, P, N] float, time [B, P+Q, 2] integer) -> [B, Q, N]
        ``time[..., 0]`` day of week 0..6, ``time[..., 1]`` time-of-day index
        ``0..steps_per_day−1``, for the history steps then the future steps.
        ``x`` has the parameters' dtype; a float ``time`` is refused (it would be
        floored, not read as a fraction of the day).
    """

    def __init__(
        self,
        num_nodes: int,
        steps_per_day: int,
        se_dim: int = 64,
        history_steps: int = 12,
        horizon_steps: int = 12,
        num_layers: int = 3,
        num_heads: int = 8,
        head_dim: int = 8,
        dropout: float = 0.1,
        causal_mask: bool = True,
        learnable_spatial_embedding: bool = False,
        attention_output_fc: bool = True,
        fusion_output_fc: bool = True,
        batch_norm: str = "activation",
        bn_momentum: float = 0.5,
        spatial_attention: str = "dense",
        spatial_attention_options: dict | None = None,
        num_groups: int | None = None,
        partition_method: str = "random",
        partition_seed: int = 0,
        last_value_residual: bool = False,
        day_of_week: bool | str = True,
        residual_step_gain: bool = False,
    ) -> None:
        super().__init__()
        self.num_nodes = num_nodes = _positive_int("num_nodes", num_nodes)
        self.steps_per_day = steps_per_day = _positive_int("steps_per_day", steps_per_day)
        self.se_dim = se_dim = _positive_int("se_dim", se_dim)
        self.history_steps = history_steps = _positive_int("history_steps", history_steps)
        self.horizon_steps = horizon_steps = _positive_int("horizon_steps", horizon_steps)
        self.num_layers = num_layers = _positive_int("num_layers", num_layers)
        self.num_heads = num_heads = _positive_int("num_heads", num_heads)
        self.head_dim = head_dim = _positive_int("head_dim", head_dim)
        dropout = _fraction("dropout", dropout, low_open=False, high_closed=False)
        bn_momentum = _fraction("bn_momentum", bn_momentum, low_open=True, high_closed=True)
        for name, value in (
            ("causal_mask", causal_mask),
            ("learnable_spatial_embedding", learnable_spatial_embedding),
            ("attention_output_fc", attention_output_fc),
            ("fusion_output_fc", fusion_output_fc),
            ("last_value_residual", last_value_residual),
            ("residual_step_gain", residual_step_gain),
        ):
            _flag(name, value)
        if residual_step_gain and not last_value_residual:
            raise ValueError("GMAN: residual_step_gain needs last_value_residual true (it scales the predicted change)")
        if not (isinstance(day_of_week, bool) or day_of_week == "weekend"):
            raise ValueError(f"GMAN: day_of_week must be true, false or 'weekend', got {day_of_week!r}")
        if batch_norm not in BATCH_NORM_MODES:
            raise ValueError(f"GMAN: batch_norm must be one of {', '.join(BATCH_NORM_MODES)}, got {batch_norm!r}")
        if spatial_attention not in SPATIAL_ATTENTIONS:
            raise ValueError(
                f"GMAN: spatial_attention must be one of {', '.join(SPATIAL_ATTENTIONS)}, got {spatial_attention!r}"
            )
        options = dict(spatial_attention_options or {})
        group = spatial_attention == "group"
        if num_groups is not None and not (_is_integer(num_groups) and 1 <= num_groups <= num_nodes):
            raise ValueError(f"GMAN: num_groups must be null or an integer in [1, {num_nodes}] (num_nodes), got {num_groups!r}")
        num_groups = None if num_groups is None else int(num_groups)
        if partition_method not in PARTITION_METHODS:
            raise ValueError(
                f"GMAN: partition_method must be one of {', '.join(PARTITION_METHODS)}, got {partition_method!r}"
            )
        if not _is_integer(partition_seed):
            raise ValueError(f"GMAN: partition_seed must be an integer, got {partition_seed!r}")
        partition_seed = int(partition_seed)
        if not group and (num_groups is not None or partition_method != "random"):
            raise ValueError(f"GMAN: num_groups and partition_method apply to spatial_attention 'group', not {spatial_attention!r}")
        if group and {"num_groups", "partition_method", "partition_seed", "num_nodes"} & set(options):
            raise ValueError("GMAN: give num_groups, partition_method and partition_seed as GMAN arguments, not in spatial_attention_options")
        self._config = dict(
            num_nodes=num_nodes, steps_per_day=steps_per_day, se_dim=se_dim,
            history_steps=history_steps, horizon_steps=horizon_steps, num_layers=num_layers,
            num_heads=num_heads, head_dim=head_dim, dropout=dropout, causal_mask=causal_mask,
            learnable_spatial_embedding=learnable_spatial_embedding,
            attention_output_fc=attention_output_fc, fusion_output_fc=fusion_output_fc,
            batch_norm=batch_norm, bn_momentum=bn_momentum,
            spatial_attention=spatial_attention, spatial_attention_options=options,
            num_groups=num_groups, partition_method=partition_method, partition_seed=partition_seed,
            last_value_residual=last_value_residual,
            day_of_week=day_of_week, residual_step_gain=residual_step_gain,
        )
        dim = self.num_heads * self.head_dim
        self.dim = dim

        if learnable_spatial_embedding:
            self.spatial_embedding = nn.Parameter(torch.randn(num_nodes, se_dim) * 0.1)
        else:
            self.register_buffer("spatial_embedding", torch.zeros(num_nodes, se_dim))

        bn = dict(batch_norm=batch_norm, bn_momentum=bn_momentum)
        self.input_fc = FC(1, [dim, dim], [True, False], **bn)
        self.ste = SpatioTemporalEmbedding(se_dim, steps_per_day, dim, day_of_week=day_of_week, **bn)

        if group:
            # every block starts from the same partition; a "bfs" one is filled in by
            # set_partition_graph (until then forward refuses to run)
            options = dict(options, num_nodes=num_nodes, num_groups=num_groups, partition_seed=partition_seed)
        self._partition_pending = group and partition_method == "bfs"

        def block() -> STAttBlock:
            spatial = SPATIAL_ATTENTIONS[spatial_attention](
                num_heads, head_dim, batch_norm, bn_momentum, attention_output_fc, **options
            )
            return STAttBlock(
                num_heads, head_dim, attention_output_fc=attention_output_fc,
                fusion_output_fc=fusion_output_fc, causal_mask=causal_mask, spatial=spatial, **bn,
            )

        self.encoder = nn.ModuleList([block() for _ in range(num_layers)])
        self.transform = TransformAttention(num_heads, head_dim, output_fc=attention_output_fc, **bn)
        self.decoder = nn.ModuleList([block() for _ in range(num_layers)])
        self.output_fc = FC(dim, [dim, 1], [True, False], dropout=dropout, no_bn_last=True, **bn)
        if last_value_residual:
            # start from the last-value forecast exactly; the network learns the change
            nn.init.zeros_(self.output_fc.linears[-1].weight)
            nn.init.zeros_(self.output_fc.linears[-1].bias)
        if residual_step_gain:
            self.residual_gain = nn.Parameter(torch.ones(self.horizon_steps, 1))  # [Q, 1]: g_q per step
        self.register_load_state_dict_post_hook(_partition_loaded)

    # ------------------------------------------------------------------ config
    @property
    def config(self) -> dict:
        """Constructor arguments (JSON-serialisable): ``GMAN(**model.config)`` rebuilds it."""
        cfg = dict(self._config)
        cfg["spatial_attention_options"] = dict(cfg["spatial_attention_options"])
        return cfg

    def set_spatial_embedding(self, se: Any) -> None:
        """Copy spatial-embedding values ``se [N, se_dim]`` into ``spatial_embedding``."""
        se = torch.as_tensor(se)
        expected = (self.num_nodes, self.se_dim)
        if tuple(se.shape) != expected:
            raise ValueError(
                f"spatial embedding has shape {list(se.shape)}, expected [{expected[0]}, {expected[1]}] (num_nodes, se_dim)"
            )
        if not (se.is_floating_point() or se.dtype in (torch.int32, torch.int64)):
            raise ValueError(f"spatial embedding must be numeric, got dtype {se.dtype}")
        if not bool(torch.isfinite(se).all()):
            raise ValueError("spatial embedding contains NaN or infinite values")
        with torch.no_grad():
            self.spatial_embedding.copy_(se.to(self.spatial_embedding.dtype))

    def set_partition_graph(self, adjacency: Any) -> None:
        """Build the ``partition_method="bfs"`` partition from the road graph
        ``adjacency [N, N]`` (non-zero = edge) and give it to every block."""
        if self._config["spatial_attention"] != "group" or self._config["partition_method"] != "bfs":
            raise ValueError("GMAN: set_partition_graph needs spatial_attention 'group' with partition_method 'bfs'")
        groups = self.group_attentions()
        partition = make_partition(self.num_nodes, groups[0].num_groups, "bfs", adjacency)
        for module in groups:
            module.set_partition(partition)
        self._partition_pending = False

    def group_attentions(self) -> list[GroupSpatialAttention]:
        """The group spatial attention module of every block (empty for dense attention)."""
        return [m for m in self.modules() if isinstance(m, GroupSpatialAttention)]

    def set_bn_momentum(self, momentum: float) -> None:
        """Set the momentum of every batch-norm layer (PyTorch convention, ``1 −`` EMA decay)."""
        momentum = _fraction("bn_momentum", momentum, low_open=True, high_closed=True)
        for module in self.modules():
            if isinstance(module, BatchNorm):
                module.momentum = momentum

    # ----------------------------------------------------------------- forward
    def embed(self, time: Tensor) -> STE:
        """Factored STE for ``time [B, P+Q, 2]``: spatial [N, D], temporal [B, P+Q, D]."""
        return self.ste(self.spatial_embedding, time)

    def forward(self, x: Tensor, time: Tensor) -> Tensor:
        """x [B, P, N] normalised, time [B, P+Q, 2] integer -> [B, Q, N] normalised.

        ``x`` has the parameters' dtype (under autocast, float32 or half as the parameters are).
        ``time`` has an integer dtype; its values outside ``0..6`` / ``0..steps_per_day−1`` are
        not checked here (that would wait for the device): they fail in the embedding look-up
        (an IndexError on the CPU).
        """
        p, q, n = self.history_steps, self.horizon_steps, self.num_nodes
        if self._partition_pending:
            raise ValueError("GMAN: partition_method 'bfs' needs set_partition_graph(adjacency) (or a loaded state dict) first")
        if x.dim() != 3 or x.shape[1] != p or x.shape[2] != n:
            raise ValueError(f"GMAN: x must have shape [B, {p}, {n}], got {list(x.shape)}")
        if time.dim() != 3 or time.shape[1] != p + q or time.shape[2] != 2 or time.shape[0] != x.shape[0]:
            raise ValueError(f"GMAN: time must have shape [{x.shape[0]}, {p + q}, 2], got {list(time.shape)}")
        # dtype checks only: a check of the values would wait for the device.  A float time would be
        # floored (a time of day given as a fraction of the day reads as midnight), so it is refused.
        if time.dtype not in _TIME_DTYPES:
            raise ValueError(
                f"GMAN: time must be an integer tensor of (day_of_week, time_of_day_index) pairs, got dtype {time.dtype}"
            )
        if not x.is_floating_point():
            raise ValueError(f"GMAN: x must be a float tensor of normalised readings, got dtype {x.dtype}")
        weight_dtype = self.input_fc.linears[0].weight.dtype
        # under autocast the matrix products cast float32 / half inputs and weights themselves (not float64)
        autocast = (x.dtype in _AUTOCAST_DTYPES and weight_dtype in _AUTOCAST_DTYPES
                    and torch.is_autocast_enabled(x.device.type))
        if x.dtype != weight_dtype and not autocast:
            raise ValueError(
                f"GMAN: x has dtype {x.dtype}, the model's parameters {weight_dtype}; "
                f"convert x (x.to({weight_dtype})) or the model (model.to({x.dtype}))"
            )
        ste = self.embed(time.long())
        ste_p, ste_q = ste.steps(0, p), ste.steps(p, p + q)
        h = self.input_fc(x.unsqueeze(-1))  # [B, P, N, D]
        for blk in self.encoder:
            h = blk(h, ste_p)
        h = self.transform(h, ste_p, ste_q)  # [B, Q, N, D]
        for blk in self.decoder:
            h = blk(h, ste_q)
        out = self.output_fc(h).squeeze(-1)  # [B, Q, N]
        if self._config["residual_step_gain"]:
            out = out * self.residual_gain
        if self._config["last_value_residual"]:
            out = out + x[:, -1:, :]
        return out

    def extra_repr(self) -> str:  # noqa: D102
        c = self._config
        return (
            f"N={c['num_nodes']}, P={c['history_steps']}, Q={c['horizon_steps']}, L={c['num_layers']}, "
            f"K={c['num_heads']}, d={c['head_dim']}, causal_mask={c['causal_mask']}, batch_norm={c['batch_norm']!r}, "
            f"spatial_attention={c['spatial_attention']!r}"
        )


def _partition_loaded(model: GMAN, incompatible_keys: Any) -> None:
    """Load-state-dict post-hook: a state dict that holds the partitions sets them."""
    if not any(key.endswith(".partition") for key in incompatible_keys.missing_keys):
        model._partition_pending = False
