"""Group spatial attention: the GMAN paper's remedy for large sensor networks.

Dense spatial attention scores every pair of sensors, ``N²`` scores per time
step and head.  The paper (Zheng et al., AAAI 2020, "group spatial attention")
partitions the ``N`` sensors into ``G`` groups of ``M`` and replaces the one
``N × N`` attention by

* **intra-group** attention inside every group (``G·M² = N·M`` scores; the
  projections are shared by all groups),
* a **max-pool** of every group's outputs to one vector per group,
* **inter-group** attention across the ``G`` pooled vectors (``G²`` scores),
* the group's **global** vector added to the local output of each member.

``N·M + G²`` with ``G = N/M`` is smallest at ``M = ∛(2N)``, where it is about
``1.9·N^{4/3}``; the paper used ``G = 37`` for PEMS-BAY (N = 325, M = 9).

A partition is a ``LongTensor [G, M]``: row ``g`` lists the sensors of group
``g`` followed by ``-1`` padding slots when the group is one short (groups
differ in size by at most one, ``M = ⌈N/G⌉``).  The flattened real entries are
a permutation of ``0..N−1``.  :func:`make_partition` builds one at random from
a seed (as in the paper) or by growing connected regions of the road graph
(``method="bfs"``); the module keeps it as the buffer ``partition`` so that it
is saved in, and restored from, the state dict.
"""
from __future__ import annotations

import math
from collections import deque
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from gman.model.layers import FC, SPATIAL_ATTENTIONS, SteLike, attention, project_concat

__all__ = [
    "PARTITION_METHODS",
    "GroupSpatialAttention",
    "default_num_groups",
    "group_sizes",
    "make_partition",
    "validate_partition",
]

PARTITION_METHODS = ("random", "bfs")


# --------------------------------------------------------------------------- partitions
def default_num_groups(num_nodes: int) -> int:
    """The paper's rule: ``M = round(∛(2N))`` sensors per group, ``G = ⌈N / M⌉`` groups."""
    if isinstance(num_nodes, bool) or not isinstance(num_nodes, int) or num_nodes < 1:
        raise ValueError(f"num_nodes must be a positive integer, got {num_nodes!r}")
    group_size = max(1, math.floor((2 * num_nodes) ** (1.0 / 3.0) + 0.5))
    return math.ceil(num_nodes / group_size)


def group_sizes(num_nodes: int, num_groups: int) -> list[int]:
    """Sizes of ``G`` groups covering ``N`` sensors: ``M = ⌈N/G⌉`` for the first
    ``N − G·(M−1)`` groups, ``M − 1`` for the rest (so no group is empty)."""
    if isinstance(num_groups, bool) or not isinstance(num_groups, int) or not 1 <= num_groups <= num_nodes:
        raise ValueError(f"num_groups must be an integer in [1, {num_nodes}] (num_nodes), got {num_groups!r}")
    size = -(-num_nodes // num_groups)
    full = num_nodes - num_groups * (size - 1)
    return [size] * full + [size - 1] * (num_groups - full)


def _layout(order: Sequence[int], sizes: Sequence[int]) -> Tensor:
    """Chop a sensor order into consecutive groups of ``sizes``, ``-1``-padded: [G, M]."""
    width = max(sizes)
    out = torch.full((len(sizes), width), -1, dtype=torch.long)
    start = 0
    for g, size in enumerate(sizes):
        out[g, :size] = torch.as_tensor(list(order[start:start + size]), dtype=torch.long)
        start += size
    return out


def _neighbours(adjacency: Any, num_nodes: int) -> list[list[int]]:
    """Undirected neighbour lists of a weighted adjacency [N, N] (non-zero = edge, diagonal ignored)."""
    a = torch.as_tensor(adjacency)
    if a.dim() != 2 or tuple(a.shape) != (num_nodes, num_nodes):
        raise ValueError(f"adjacency must have shape [{num_nodes}, {num_nodes}], got {list(a.shape)}")
    linked = (a != 0) | (a != 0).t()
    linked.fill_diagonal_(False)
    rows, cols = linked.nonzero(as_tuple=True)
    neighbours: list[list[int]] = [[] for _ in range(num_nodes)]
    for r, c in zip(rows.tolist(), cols.tolist()):
        neighbours[r].append(c)
    return neighbours


def _bfs_distances(neighbours: list[list[int]], start: int, allowed: list[bool]) -> dict[int, int]:
    dist = {start: 0}
    queue = deque([start])
    while queue:
        u = queue.popleft()
        for v in neighbours[u]:
            if allowed[v] and v not in dist:
                dist[v] = dist[u] + 1
                queue.append(v)
    return dist


def _peripheral_node(neighbours: list[list[int]], start: int, allowed: list[bool]) -> int:
    """A node far from ``start`` in its component (two BFS sweeps; ties: lowest degree, then index)."""
    node = start
    for _ in range(2):
        dist = _bfs_distances(neighbours, node, allowed)
        far = max(dist.values())
        node = min((v for v, d in dist.items() if d == far), key=lambda v: (len(neighbours[v]), v))
    return node


def _bfs_order(adjacency: Any, num_nodes: int, sizes: Sequence[int]) -> list[int]:
    """Sensors ordered so that consecutive chunks of ``sizes`` are connected road regions.

    Region growing: a group starts at the unassigned sensor farthest out in
    the graph (a pseudo-peripheral node of what is left) and takes sensors in
    breadth-first order from it — neighbours of lower degree first, then lower
    index — until it is full; if its region runs out first, it continues from
    a new peripheral sensor.  Starting at the periphery keeps the leftovers
    connected, so the groups are compact stretches of road.
    """
    neighbours = _neighbours(adjacency, num_nodes)
    for lst in neighbours:
        lst.sort(key=lambda v: (len(neighbours[v]), v))
    free = [True] * num_nodes
    order: list[int] = []
    next_free = 0
    for size in sizes:
        taken = 0
        while taken < size:
            while not free[next_free]:
                next_free += 1
            seed = _peripheral_node(neighbours, next_free, free)
            queue = deque([seed])
            free[seed] = False
            while queue and taken < size:
                u = queue.popleft()
                order.append(u)
                taken += 1
                for v in neighbours[u]:
                    if free[v]:
                        free[v] = False
                        queue.append(v)
            for v in queue:  # reached but not taken: back to the pool
                free[v] = True
    return order


def make_partition(
    num_nodes: int,
    num_groups: int | None = None,
    method: str = "random",
    adjacency: Any = None,
    seed: int = 0,
) -> Tensor:
    """A partition of ``N`` sensors into ``G`` groups as a ``LongTensor [G, M]``.

    Row ``g`` holds the sensor indices of group ``g``, then ``-1`` padding when
    the group has ``M − 1`` members (sizes from :func:`group_sizes`).

    Args:
        num_nodes: ``N``.
        num_groups: ``G``; ``None`` = :func:`default_num_groups` (``M ≈ ∛(2N)``).
        method: ``"random"`` — a uniformly random assignment drawn from ``seed``
            (the paper); ``"bfs"`` — compact connected regions of the road graph
            grown breadth-first (needs ``adjacency``; deterministic, ``seed`` unused).
        adjacency: ``[N, N]`` weights (numpy or torch), non-zero = edge; the
            direction is ignored.
        seed: seed of the random assignment.
    """
    if isinstance(num_nodes, bool) or not isinstance(num_nodes, int) or num_nodes < 1:
        raise ValueError(f"num_nodes must be a positive integer, got {num_nodes!r}")
    if num_groups is None:
        num_groups = default_num_groups(num_nodes)
    sizes = group_sizes(num_nodes, num_groups)
    if method == "random":
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"partition seed must be an integer, got {seed!r}")
        gen = torch.Generator().manual_seed(seed)
        order = torch.randperm(num_nodes, generator=gen).tolist()
    elif method == "bfs":
        if adjacency is None:
            raise ValueError("partition method 'bfs' needs an adjacency matrix, got none")
        order = _bfs_order(adjacency, num_nodes, sizes)
    else:
        raise ValueError(f"partition method must be one of {', '.join(map(repr, PARTITION_METHODS))}, got {method!r}")
    return _layout(order, sizes)


def validate_partition(partition: Any, num_nodes: int) -> Tensor:
    """Check and normalise a partition: ``[G, M]`` long (``-1`` padding, trailing) or a
    list of ``G`` lists of sensor indices.  Every sensor exactly once, no empty group."""
    if isinstance(partition, (list, tuple)) and partition and all(isinstance(g, (list, tuple)) for g in partition):
        groups = [list(g) for g in partition]
        if any(len(g) == 0 for g in groups):
            raise ValueError("partition has an empty group")
        width = max(len(g) for g in groups)
        partition = [g + [-1] * (width - len(g)) for g in groups]
    p = torch.as_tensor(partition)
    if p.dim() != 2 or p.numel() == 0 or p.dtype.is_floating_point or p.dtype == torch.bool:
        raise ValueError(f"partition must be an integer tensor [G, M], got shape {list(p.shape)} dtype {p.dtype}")
    p = p.long()
    real = p >= 0
    if bool((p < -1).any()) or bool((p >= num_nodes).any()):
        raise ValueError(f"partition entries must be sensor indices in [0, {num_nodes}) or -1 (padding)")
    # padding only at the end of a row: once a row is padded it stays padded
    if bool((real[:, 1:] & ~real[:, :-1]).any()):
        raise ValueError("partition padding (-1) must come after a group's sensors")
    if not bool(real[:, 0].all()):
        raise ValueError("partition has an empty group")
    members = p[real]
    if members.numel() != num_nodes or torch.bincount(members, minlength=num_nodes).ne(1).any():
        raise ValueError(f"partition must contain each of the {num_nodes} sensors exactly once")
    return p.contiguous()


# --------------------------------------------------------------------------- module
class _PermuteSensors(torch.autograd.Function):
    """``x[:, order]`` for a permutation ``order`` of dim 1 of ``x [S, N, C]``.

    The gradient of a gather by a permutation is the gather by its inverse,
    ``grad[:, inverse]``; autograd's generic backward (``index_add_`` into zeros)
    is an order of magnitude slower on the CPU for these shapes.
    """

    @staticmethod
    def forward(ctx, x: Tensor, order: Tensor, inverse: Tensor) -> Tensor:  # noqa: D102
        ctx.save_for_backward(inverse)
        return x.index_select(1, order)

    @staticmethod
    def backward(ctx, grad: Tensor):  # noqa: D102
        (inverse,) = ctx.saved_tensors
        return grad.contiguous().index_select(1, inverse), None, None


def _rebuild_index(module: "GroupSpatialAttention", _incompatible_keys: Any) -> None:
    """Load-state-dict post-hook: a loaded partition brings a new sensor order."""
    module._derive_index()


class GroupSpatialAttention(nn.Module):
    """Group spatial attention (GMAN paper, "group spatial attention").

    Sensors are split into groups ``𝒢_1 … 𝒢_G`` by the buffer ``partition
    [G, M]``; ``g(v)`` is the group of sensor ``v``.  For each head ``k`` and
    time step ``t``::

        H̃ = [X ‖ STE]                                          [B, T, N, 2D]
        Q, K_, V = ReLU(BN(H̃·W + b))       (shared by all groups) [B, T, N, D] each
        intra-group, for v, u in the same group:
          α^(k)_{t,v,u} = softmax_{u ∈ 𝒢_g(v)}(⟨Q^(k)_{t,v}, K_^(k)_{t,u}⟩ / √d)
          L^(k)_{t,v}   = Σ_{u ∈ 𝒢_g(v)} α^(k)_{t,v,u} · V^(k)_{t,u}
        L = ‖_k L^(k)                                            [B, T, N, D]  (local)
        P_{t,g} = max_{v ∈ 𝒢_g} L_{t,v}       (channel-wise)     [B, T, G, D]
        Q', K', V' = ReLU(BN(P·W' + b'))                         [B, T, G, D] each
        inter-group:
          γ^(k)_{t,g,h} = softmax_h(⟨Q'^(k)_{t,g}, K'^(k)_{t,h}⟩ / √d)   g, h ∈ 1..G
          Γ^(k)_{t,g}   = Σ_h γ^(k)_{t,g,h} · V'^(k)_{t,h}
        Γ = ‖_k Γ^(k)                                            [B, T, G, D]  (global)
        H_S,v = L_v + Γ_g(v)                                     [B, T, N, D]
        H_S ← FC[D, D](H_S)   (ReLU, then linear; only if output_fc)

    With ``G = 1`` there is no other group to attend to and the inter-group
    stage is left out: the module then *is* dense spatial attention
    (:class:`gman.model.layers.SpatialAttention`, same parameter names).

    Computation: the sensors are gathered once into group order — groups of
    equal size next to each other, largest first — so the ``[B, T, N, 3D]``
    projections of a run of ``c`` groups of size ``m`` are a
    ``[B·T·c, m, 3, K, d]`` view, and each run is one unmasked fused-attention
    call (with :func:`make_partition` there are at most two runs, sizes ``M``
    and ``M − 1``).  Padding therefore never enters any softmax or max-pool.
    Cost per time step and head: ``Σ_g |𝒢_g|² ≤ N·M`` intra-group scores plus
    ``G²`` inter-group ones, against ``N²`` for dense attention.

    Args:
        num_heads, head_dim, batch_norm, bn_momentum, output_fc: as for
            :class:`~gman.model.layers.SpatialAttention`.
        num_nodes: ``N`` (the partition is fixed per model).
        num_groups: ``G``; ``None`` = the paper's rule (:func:`default_num_groups`).
        partition_method, partition_seed, adjacency: how to build the partition
            (:func:`make_partition`) when ``partition`` is not given.
        partition: an explicit partition ([G, M] with ``-1`` padding, or a list of
            groups of any sizes); overrides the three above.

    forward(x [B, T, N, D], ste [B, T, N, D] | STE) -> [B, T, N, D]
    """

    def __init__(
        self,
        num_heads: int,
        head_dim: int,
        batch_norm: str = "activation",
        bn_momentum: float = 0.5,
        output_fc: bool = True,
        *,
        num_nodes: int,
        num_groups: int | None = None,
        partition_method: str = "random",
        partition_seed: int = 0,
        adjacency: Any = None,
        partition: Any = None,
    ) -> None:
        super().__init__()
        self.num_heads, self.head_dim = num_heads, head_dim
        dim = num_heads * head_dim
        if partition is None:
            partition = make_partition(num_nodes, num_groups, partition_method, adjacency, partition_seed)
        partition = validate_partition(partition, num_nodes)
        if num_groups is not None and partition.shape[0] != num_groups:
            raise ValueError(f"partition has {partition.shape[0]} groups, num_groups is {num_groups}")
        self.num_nodes = num_nodes
        self.num_groups, self.group_size = partition.shape
        self.register_buffer("partition", partition)
        self._derive_index()
        self.register_load_state_dict_post_hook(_rebuild_index)

        self.qkv = FC(2 * dim, [3 * dim], [True], batch_norm, bn_momentum, chunks=[3])
        self.group_qkv = (
            FC(dim, [3 * dim], [True], batch_norm, bn_momentum, chunks=[3]) if self.num_groups > 1 else None
        )
        self.out = FC(dim, [dim, dim], [True, False], batch_norm, bn_momentum) if output_fc else None

    def set_partition(self, partition: Any) -> None:
        """Replace the partition by another of the same shape ``[G, M]`` (e.g. one built from the road graph)."""
        partition = validate_partition(partition, self.num_nodes)
        if partition.shape != self.partition.shape:
            raise ValueError(f"partition has shape {list(partition.shape)}, expected {list(self.partition.shape)}")
        with torch.no_grad():
            self.partition.copy_(partition)
        self._derive_index()

    def _derive_index(self) -> None:
        """Sensor order and runs derived from ``partition`` (not saved: rebuilt on load).

        sensor_order    [N]  sensors in group order (groups sorted by size, largest first)
        sensor_position [N]  position of each sensor in that order (the inverse permutation)
        runs                 [(group size m, number of groups c), ...] in that order
        """
        p = self.partition
        validate_partition(p, self.num_nodes)  # a state dict may bring any tensor
        sizes = (p >= 0).sum(1)
        by_size = torch.sort(sizes, descending=True, stable=True).indices
        ordered = p[by_size]
        sensor_order = ordered[ordered >= 0]  # row-major: group by group
        sensor_position = torch.empty_like(sensor_order)
        sensor_position[sensor_order] = torch.arange(self.num_nodes, device=p.device)
        self.register_buffer("sensor_order", sensor_order, persistent=False)
        self.register_buffer("sensor_position", sensor_position, persistent=False)
        runs: list[tuple[int, int]] = []
        for m in sizes[by_size].tolist():
            if runs and runs[-1][0] == m:
                runs[-1] = (m, runs[-1][1] + 1)
            else:
                runs.append((m, 1))
        self.runs = runs

    def extra_repr(self) -> str:  # noqa: D102
        return f"num_nodes={self.num_nodes}, num_groups={self.num_groups}, group_size={self.group_size}"

    def forward(self, x: Tensor, ste: SteLike) -> Tensor:  # noqa: D102
        b, t, n, dim = x.shape
        if n != self.num_nodes:
            raise ValueError(f"GroupSpatialAttention: x has {n} sensors, the partition has {self.num_nodes}")
        K, d, bt = self.num_heads, self.head_dim, b * t
        qkv = self.qkv.layer(0, x, project_concat(self.qkv.linears[0], x, ste))  # [B, T, N, 3D]
        # sensors into group order (a gather on dim 1 of a 3-d view: on dim 2 of the 4-d
        # tensor torch 2.13's CPU index_select is ~80x slower)
        qkv = _PermuteSensors.apply(qkv.reshape(bt, n, 3 * dim), self.sensor_order, self.sensor_position)
        local, pooled = [], []
        start = 0
        for m, c in self.runs:  # c groups of m sensors: [B·T·c, m, 3, K, d]
            q, k, v = qkv[:, start:start + m * c].reshape(bt * c, m, 3, K, d).unbind(2)
            h = attention(q, k, v).view(bt, c, m, dim)  # [B·T, c, m, D]
            local.append(h)
            pooled.append(h.amax(dim=2))  # [B·T, c, D]
            start += m * c

        if self.group_qkv is not None:
            pooled_all = torch.cat(pooled, dim=1) if len(pooled) > 1 else pooled[0]  # [B·T, G, D]
            gq, gk, gv = self.group_qkv(pooled_all).view(bt, self.num_groups, 3, K, d).unbind(2)
            glob = attention(gq, gk, gv).view(bt, self.num_groups, 1, dim)  # [B·T, G, 1, D]
            first = 0
            for i, (m, c) in enumerate(self.runs):  # each member gets its group's global vector
                local[i] = local[i] + glob[:, first:first + c]
                first += c

        parts = [h.view(bt, -1, dim) for h in local]
        h = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]  # [B·T, N, D] in group order
        h = _PermuteSensors.apply(h, self.sensor_position, self.sensor_order).view(b, t, n, dim)  # sensor order
        return self.out(h) if self.out is not None else h


SPATIAL_ATTENTIONS["group"] = GroupSpatialAttention
