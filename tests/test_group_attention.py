"""Group spatial attention: partitions, equations, G = 1 = dense, permutations, persistence."""
from __future__ import annotations

import pytest
import torch

from gman.model.group_attention import (
    GroupSpatialAttention,
    default_num_groups,
    group_sizes,
    make_partition,
    validate_partition,
)
from gman.model.layers import STE, SpatialAttention

TOL = dict(rtol=1e-6, atol=1e-6)
B, T, K, D_HEAD = 2, 3, 2, 3  # K != d
DIM = K * D_HEAD


def inputs(n: int, seed: int = 0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, n, DIM, generator=g, dtype=dtype)
    ste = STE(torch.randn(n, DIM, generator=g, dtype=dtype), torch.randn(B, T, DIM, generator=g, dtype=dtype))
    return x, ste


# ------------------------------------------------------------------ partitions
@pytest.mark.parametrize("n, groups", [(325, 37), (207, 30), (8600, 331), (1, 1), (2, 1)])
def test_default_groups_follow_the_paper_rule(n, groups):
    # M = round(cbrt(2N)), G = ceil(N / M); PEMS-BAY (N = 325) gives the paper's G = 37
    assert default_num_groups(n) == groups


@pytest.mark.parametrize("n, g", [(10, 4), (11, 4), (12, 4), (7, 7), (9, 1)])
def test_random_partition_covers_every_sensor_once(n, g):
    p = make_partition(n, g, seed=3)
    assert p.shape == (g, -(-n // g))
    real = p[p >= 0]
    assert sorted(real.tolist()) == list(range(n))
    sizes = (p >= 0).sum(1)
    assert sizes.tolist() == group_sizes(n, g) and int(sizes.max() - sizes.min()) <= 1


def test_random_partition_is_reproducible_from_its_seed():
    assert torch.equal(make_partition(50, 7, seed=5), make_partition(50, 7, seed=5))
    assert not torch.equal(make_partition(50, 7, seed=5), make_partition(50, 7, seed=6))


def test_bfs_partition_groups_are_connected_road_stretches():
    # a 6 x 5 grid road network: every bfs group is a connected set of sensors
    rows, cols = 6, 5
    n = rows * cols
    adj = torch.zeros(n, n)
    for r in range(rows):
        for c in range(cols):
            i = r * cols + c
            if c + 1 < cols:
                adj[i, i + 1] = 0.5  # directed: the partition ignores direction
            if r + 1 < rows:
                adj[i + cols, i] = 1.0
    p = make_partition(n, 6, method="bfs", adjacency=adj.numpy())
    assert sorted(p[p >= 0].tolist()) == list(range(n))
    sym = (adj + adj.t()) > 0
    for row in p:
        members = row[row >= 0].tolist()
        reached, frontier = {members[0]}, [members[0]]
        while frontier:
            u = frontier.pop()
            for v in members:
                if v not in reached and sym[u, v]:
                    reached.add(v)
                    frontier.append(v)
        assert reached == set(members), f"group {members} is not connected"


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(num_nodes=5, num_groups=6), "num_groups"),
        (dict(num_nodes=5, num_groups=0), "num_groups"),
        (dict(num_nodes=5, method="metis"), "partition method"),
        (dict(num_nodes=5, method="bfs"), "adjacency"),
        (dict(num_nodes=5, method="bfs", adjacency=torch.zeros(4, 4)), "adjacency"),
        (dict(num_nodes=0), "num_nodes"),
    ],
)
def test_bad_partition_arguments_raise_one_line(kwargs, match):
    with pytest.raises(ValueError, match=match) as info:
        make_partition(**kwargs)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "partition, match",
    [
        ([[0, 1], [1, 2]], "exactly once"),
        ([[0, -1, 1], [2, 3, 4]], "padding"),
        ([[0, 1, 2], [-1, -1, -1], [3, 4, -1]], "empty group"),
        ([[0, 1, 2], [3, 9, -1]], "sensor indices"),
        (torch.zeros(5), "integer tensor"),
    ],
)
def test_invalid_partitions_are_refused(partition, match):
    with pytest.raises(ValueError, match=match):
        validate_partition(partition, 5)


def test_ragged_group_lists_are_accepted():
    p = validate_partition([[4, 0], [1, 2, 3]], 5)
    assert p.tolist() == [[4, 0, -1], [1, 2, 3]]


# ------------------------------------------------------------------ the equations
def ref_fc(x, fc):
    """act(BN(x W^T + b)) per layer, BN with the batch statistics over all leading dims."""
    for lin, norm, act in zip(fc.linears, fc.norms, fc.activations):
        x = x @ lin.weight.T + (lin.bias if lin.bias is not None else 0)
        if isinstance(norm, torch.nn.BatchNorm1d):
            flat = x.reshape(-1, x.shape[-1])
            x = (x - flat.mean(0)) / torch.sqrt(flat.var(0, unbiased=False) + norm.eps) * norm.weight + norm.bias
        if act:
            x = x.clamp(min=0)
    return x


def ref_heads(q, k, v):
    """softmax(q_h k_h^T / sqrt(d)) v_h per head over the second-to-last axis."""
    outs = []
    for h in range(K):
        sl = slice(h * D_HEAD, (h + 1) * D_HEAD)
        a = torch.softmax(torch.einsum("...id,...jd->...ij", q[..., sl], k[..., sl]) / D_HEAD ** 0.5, -1)
        outs.append(torch.einsum("...ij,...jd->...id", a, v[..., sl]))
    return torch.cat(outs, -1)


def ref_group_attention(m, x, ste_full, groups):
    """Group by group, real members only (no padding anywhere), train-mode BN."""
    qkv = ref_fc(torch.cat((x, ste_full), -1), m.qkv)
    q, k, v = qkv[..., :DIM], qkv[..., DIM:2 * DIM], qkv[..., 2 * DIM:]
    local = torch.zeros_like(x)
    pooled = []
    for members in groups:
        idx = torch.tensor(members)
        h = ref_heads(q[:, :, idx], k[:, :, idx], v[:, :, idx])  # [B, T, |g|, D]
        local[:, :, idx] = h
        pooled.append(h.max(dim=2).values)
    pooled = torch.stack(pooled, 2)  # [B, T, G, D]
    gqkv = ref_fc(pooled, m.group_qkv)
    glob = ref_heads(gqkv[..., :DIM], gqkv[..., DIM:2 * DIM], gqkv[..., 2 * DIM:])  # [B, T, G, D]
    h = local.clone()
    for g, members in enumerate(groups):
        h[:, :, torch.tensor(members)] += glob[:, :, g:g + 1]
    return ref_fc(h, m.out)


def test_matches_a_group_by_group_reference_with_padding():
    n = 11  # 4 groups of 3, 3, 3, 2: one padding slot
    torch.manual_seed(0)
    m = GroupSpatialAttention(K, D_HEAD, num_nodes=n, num_groups=4, partition_seed=1).double().train()
    x, ste = inputs(n)
    groups = [[s for s in row.tolist() if s >= 0] for row in m.partition]
    assert sorted(len(g) for g in groups) == [2, 3, 3, 3]
    expected = ref_group_attention(m, x, ste.full(), groups)
    torch.testing.assert_close(m(x, ste), expected, **TOL)
    torch.testing.assert_close(m(x, ste.full()), expected, **TOL)  # full STE tensor, same numbers


def test_groups_of_any_sizes_in_any_order_match_the_reference():
    # an explicit ragged partition (sizes 4, 1, 3, 2 — not sorted, a singleton group):
    # the module regroups by size internally; results must still be per original group
    n = 10
    groups = [[9, 2, 5, 0], [7], [1, 8, 3], [6, 4]]
    torch.manual_seed(0)
    m = GroupSpatialAttention(K, D_HEAD, num_nodes=n, partition=groups).double().train()
    assert m.partition.shape == (4, 4) and m.runs == [(4, 1), (3, 1), (2, 1), (1, 1)]
    x, ste = inputs(n)
    torch.testing.assert_close(m(x, ste), ref_group_attention(m, x, ste.full(), groups), **TOL)


def test_set_partition_replaces_the_grouping():
    n = 12
    torch.manual_seed(0)
    m = GroupSpatialAttention(K, D_HEAD, num_nodes=n, num_groups=3, partition_seed=0).double().train()
    x, ste = inputs(n)
    contiguous = torch.arange(n).view(3, 4)
    m.set_partition(contiguous)
    assert torch.equal(m.partition, contiguous)
    expected = ref_group_attention(m, x, ste.full(), contiguous.tolist())
    torch.testing.assert_close(m(x, ste), expected, **TOL)
    with pytest.raises(ValueError, match="shape"):
        m.set_partition(torch.arange(n).view(4, 3))


def test_gradients_match_the_reference():
    # the sensor gathers have a hand-written backward: compare every gradient with autograd
    # through the group-by-group reference
    n = 11
    torch.manual_seed(0)
    m = GroupSpatialAttention(K, D_HEAD, num_nodes=n, num_groups=4, partition_seed=1).double().train()
    groups = [[s for s in row.tolist() if s >= 0] for row in m.partition]
    x, ste = inputs(n)
    weights = torch.randn(B, T, n, DIM, dtype=torch.float64)
    grads = []
    for fn in (lambda xx: m(xx, ste), lambda xx: ref_group_attention(m, xx, ste.full(), groups)):
        xx = x.clone().requires_grad_(True)
        m.zero_grad()
        (fn(xx) * weights).sum().backward()
        grads.append([xx.grad] + [p.grad.clone() for p in m.parameters()])
    for got, expected in zip(*grads):
        torch.testing.assert_close(got, expected, **TOL)


def test_gradients_reach_every_parameter_and_stay_finite():
    n = 13
    m = GroupSpatialAttention(K, D_HEAD, num_nodes=n, num_groups=3)
    x, ste = inputs(n, dtype=torch.float32)
    x.requires_grad_(True)
    m(x, ste).square().sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    for name, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_one_group_is_dense_spatial_attention():
    n = 9
    torch.manual_seed(0)
    dense = SpatialAttention(K, D_HEAD).double()
    group = GroupSpatialAttention(K, D_HEAD, num_nodes=n, num_groups=1, partition_seed=4).double()
    # one group, its sensors shuffled: no inter-group stage, same parameter names as dense
    assert group.group_qkv is None and group.partition[0].tolist() != list(range(n))
    group.load_state_dict({**dense.state_dict(), "partition": group.partition})
    x, ste = inputs(n)
    for mode in (True, False):
        dense.train(mode)
        group.train(mode)
        torch.testing.assert_close(group(x, ste), dense(x, ste), **TOL)


def test_permuting_sensors_with_the_partition_permutes_the_outputs():
    n = 14
    torch.manual_seed(0)
    m = GroupSpatialAttention(K, D_HEAD, num_nodes=n, num_groups=4, partition_seed=3).double().train()
    x, ste = inputs(n)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(9))  # new sensor i = old sensor perm[i]
    new_index = torch.empty_like(perm)
    new_index[perm] = torch.arange(n)
    p = m.partition
    moved = torch.where(p >= 0, new_index[p.clamp_min(0)], p)
    m2 = GroupSpatialAttention(K, D_HEAD, num_nodes=n, partition=moved).double().train()
    m2.load_state_dict(m.state_dict() | {"partition": moved})
    out = m(x, ste)
    out2 = m2(x[:, :, perm], STE(ste.spatial[perm], ste.temporal))
    torch.testing.assert_close(out2, out[:, :, perm], **TOL)
    # the partition matters: the same permutation with the *old* partition gives other numbers
    m.eval(), m2.eval()
    m2.load_state_dict(m.state_dict())
    assert not torch.allclose(m2(x[:, :, perm], STE(ste.spatial[perm], ste.temporal)), m(x, ste)[:, :, perm])


def test_partition_is_saved_and_restored_with_the_state_dict(tmp_path):
    n = 17
    torch.manual_seed(0)
    a = GroupSpatialAttention(K, D_HEAD, num_nodes=n, partition_seed=1).eval()
    b = GroupSpatialAttention(K, D_HEAD, num_nodes=n, partition_seed=2).eval()
    assert "partition" in a.state_dict() and not torch.equal(a.partition, b.partition)
    torch.save(a.state_dict(), tmp_path / "w.pt")
    b.load_state_dict(torch.load(tmp_path / "w.pt", weights_only=True))
    assert torch.equal(b.partition, a.partition)
    x, ste = inputs(n, dtype=torch.float32)
    torch.testing.assert_close(b(x, ste), a(x, ste), rtol=0, atol=0)
    # the same seed rebuilds the same partition (and hence the same predictions)
    assert torch.equal(GroupSpatialAttention(K, D_HEAD, num_nodes=n, partition_seed=1).partition, a.partition)


def test_loading_a_broken_partition_is_refused():
    n = 8
    m = GroupSpatialAttention(K, D_HEAD, num_nodes=n, num_groups=3)
    state = m.state_dict()
    state["partition"] = torch.zeros_like(state["partition"])
    with pytest.raises(ValueError, match="exactly once"):
        m.load_state_dict(state)


def test_constructor_checks_num_groups_against_an_explicit_partition():
    with pytest.raises(ValueError, match="num_groups"):
        GroupSpatialAttention(K, D_HEAD, num_nodes=4, num_groups=3, partition=[[0, 1], [2, 3]])
    with pytest.raises(ValueError, match="sensors"):
        GroupSpatialAttention(K, D_HEAD, num_nodes=4)(*inputs(5, dtype=torch.float32))


# ------------------------------------------------------------------ inside GMAN
def small_gman(**kwargs):
    from gman.model import GMAN

    base = dict(num_nodes=11, steps_per_day=24, se_dim=4, history_steps=3, horizon_steps=2, num_layers=1,
                num_heads=K, head_dim=D_HEAD)
    return GMAN(**{**base, **kwargs})


def gman_inputs(n=11, b=2, p=3, q=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, p, n, generator=g)
    time = torch.stack((torch.randint(0, 7, (b, p + q), generator=g), torch.randint(0, 24, (b, p + q), generator=g)), -1)
    return x, time


def test_gman_group_option_is_in_the_config_and_rebuilds_the_same_model():
    from gman.model import GMAN

    torch.manual_seed(0)
    model = small_gman(spatial_attention="group", num_groups=4, partition_seed=7).eval()
    cfg = model.config
    assert (cfg["spatial_attention"], cfg["num_groups"], cfg["partition_method"], cfg["partition_seed"]) == (
        "group", 4, "random", 7)
    blocks = model.group_attentions()
    assert len(blocks) == 2 and all(torch.equal(b.partition, make_partition(11, 4, seed=7)) for b in blocks)
    torch.manual_seed(1)
    rebuilt = GMAN(**cfg).eval()
    rebuilt.load_state_dict(model.state_dict())
    x, time = gman_inputs()
    torch.testing.assert_close(rebuilt(x, time), model(x, time), rtol=0, atol=0)
    # the default G is the paper's rule
    assert small_gman(spatial_attention="group").group_attentions()[0].num_groups == default_num_groups(11)


def test_gman_with_one_group_equals_dense_gman():
    torch.manual_seed(0)
    dense = small_gman(dropout=0.0).double()  # no dropout: its random masks would differ
    group = small_gman(dropout=0.0, spatial_attention="group", num_groups=1, partition_seed=3).double()
    state = dense.state_dict()
    state.update({k: v for k, v in group.state_dict().items() if k.endswith(".partition")})
    group.load_state_dict(state)
    x, time = gman_inputs()
    for mode in (True, False):
        dense.train(mode), group.train(mode)
        torch.testing.assert_close(group(x.double(), time), dense(x.double(), time), **TOL)


def test_gman_bfs_partition_needs_the_graph_and_travels_with_the_state_dict():
    from gman.model import GMAN

    path = torch.diag(torch.ones(10), 1)  # 11 sensors along one road
    model = small_gman(spatial_attention="group", num_groups=4, partition_method="bfs").eval()
    x, time = gman_inputs()
    with pytest.raises(ValueError, match="set_partition_graph"):
        model(x, time)
    model.set_partition_graph(path.numpy())
    for block in model.group_attentions():  # stretches of consecutive sensors
        assert block.partition.tolist() == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 10, -1]]
    out = model(x, time)
    rebuilt = GMAN(**model.config).eval()
    rebuilt.load_state_dict(model.state_dict())  # no graph needed: the partition is in the state dict
    torch.testing.assert_close(rebuilt(x, time), out, rtol=0, atol=0)
    with pytest.raises(ValueError, match="partition_method 'bfs'"):
        small_gman(spatial_attention="group").set_partition_graph(path)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(num_groups=3), "apply to spatial_attention 'group'"),
        (dict(partition_method="bfs"), "apply to spatial_attention 'group'"),
        (dict(spatial_attention="group", num_groups=12), "num_groups"),
        (dict(spatial_attention="group", num_groups=True), "num_groups"),
        (dict(spatial_attention="group", partition_method="metis"), "partition_method"),
        (dict(spatial_attention="group", partition_seed="1"), "partition_seed"),
        (dict(spatial_attention="group", spatial_attention_options={"num_groups": 2}), "GMAN arguments"),
        (dict(spatial_attention="sparse"), "spatial_attention"),
    ],
)
def test_gman_refuses_bad_group_options(kwargs, match):
    with pytest.raises(ValueError, match=match) as info:
        small_gman(**kwargs)
    assert "\n" not in str(info.value)
