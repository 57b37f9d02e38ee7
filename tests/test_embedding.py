"""word2vec SE files, the node2vec walk sampler, the skip-gram embedding and its cache."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from gman.data import embedding
from gman.data.embedding import BiasedRandomWalker, node2vec_embedding, read_word2vec, write_word2vec
from gman.errors import DataError


# ----------------------------------------------------------------------------- word2vec text format

def test_published_se_file_reads_sorted_by_index(shared_data):
    path = shared_data / "graphs" / "metr-la" / "SE_METR_node2vec.txt"
    vectors = read_word2vec(path, num_nodes=207)
    assert vectors.shape == (207, 64) and vectors.dtype == np.float32
    first = path.read_text().splitlines()[1].split()  # the file's first row is not node 0
    assert int(first[0]) != 0
    assert np.allclose(vectors[int(first[0])], np.array(first[1:], dtype=np.float32))


def test_word2vec_round_trip_is_exact(tmp_path):
    vectors = np.random.default_rng(0).standard_normal((9, 5)).astype(np.float32)
    path = write_word2vec(tmp_path / "se" / "SE.txt", vectors)
    assert path.read_text().splitlines()[0] == "9 5"
    assert np.array_equal(read_word2vec(path), vectors)
    assert [p.name for p in path.parent.iterdir()] == ["SE.txt"]  # no temp file left behind


@pytest.mark.parametrize(
    "text, problem",
    [
        ("2 2\n0 1 2\n", "header says 2 nodes but the file has 1"),
        ("2 2\n0 1 2\n0 3 4\n", "appears twice"),
        ("2 2\n0 1 2\n1 3\n", "has 1 values, expected 2"),
        ("2 2\n0 1 2\n5 3 4\n", "outside 0..1"),
        ("2 2\n0 1 2\n1 3 x\n", "is not"),
        ("node vectors\n", "not a word2vec text file"),
    ],
)
def test_bad_word2vec_files(tmp_path, text, problem):
    path = tmp_path / "SE.txt"
    path.write_text(text)
    with pytest.raises(DataError, match=problem) as caught:
        read_word2vec(path)
    assert str(path) in str(caught.value)


def test_word2vec_node_count_must_match(tmp_path):
    path = write_word2vec(tmp_path / "SE.txt", np.zeros((3, 2)))
    with pytest.raises(DataError, match="embedding has 3 nodes but the graph/data has 4"):
        read_word2vec(path, num_nodes=4)


# ----------------------------------------------------------------------------- walks

def test_second_order_bias_matches_return_and_in_out_parameters():
    # From t=0 to v=1, the walker can go back to 0 (alpha 1/p), to 2 (edge 0 -> 2, alpha 1) or to 3 (alpha 1/q).
    adjacency = np.zeros((4, 4), dtype=np.float32)
    for i, j in [(0, 1), (1, 0), (1, 2), (1, 3), (0, 2)]:
        adjacency[i, j] = 1
    walker = BiasedRandomWalker(adjacency, p=0.5, q=2.0, weighted=False)
    walks = walker.walk(torch.zeros(60_000, dtype=torch.long), 3, torch.Generator().manual_seed(0))
    walks = walks[walks[:, 1] == 1]  # half of them go 0 -> 1 first
    share = torch.bincount(walks[:, 2], minlength=4).double() / len(walks)
    expected = torch.tensor([2.0, 0.0, 1.0, 0.5]) / 3.5
    assert torch.allclose(share, expected.double(), atol=0.01)


def test_weighted_first_step_and_dangling_nodes():
    adjacency = np.zeros((4, 4), dtype=np.float32)
    adjacency[0, 1], adjacency[0, 2] = 3.0, 1.0  # node 3 has no outgoing edge; 1 and 2 neither
    walker = BiasedRandomWalker(adjacency, p=2.0, q=1.0)
    walks = walker.walk(torch.zeros(20_000, dtype=torch.long), 4, torch.Generator().manual_seed(1))
    assert abs((walks[:, 1] == 1).double().mean().item() - 0.75) < 0.015
    assert (walks[:, 2] == walks[:, 1]).all() and (walks[:, 3] == walks[:, 1]).all()  # stuck walkers stay
    assert (walker.walk(torch.tensor([3]), 5) == 3).all()


def test_walks_only_follow_edges_on_a_real_graph(shared_data):
    from gman.data.graph import load_adjacency

    adjacency, _ = load_adjacency(shared_data / "graphs" / "metr-la" / "adj_mx.pkl")
    walks = BiasedRandomWalker(adjacency, p=2.0, q=1.0).walk(torch.arange(207), 30, torch.Generator().manual_seed(0))
    src, dst = walks[:, :-1].reshape(-1).numpy(), walks[:, 1:].reshape(-1).numpy()
    out_degree = (adjacency != 0).sum(1)
    assert ((adjacency[src, dst] != 0) | ((src == dst) & (out_degree[src] == 0))).all()


# ----------------------------------------------------------------------------- node2vec

def _two_cliques() -> np.ndarray:
    adjacency = np.zeros((12, 12), dtype=np.float32)
    adjacency[:6, :6] = 1
    adjacency[6:, 6:] = 1
    adjacency[5, 6] = adjacency[6, 5] = 1  # one bridge
    return adjacency


SMALL = dict(dim=8, walk_length=20, walks_per_node=20, window=4, steps=200, progress=False)


@pytest.mark.parametrize("method", ["dense", "sampled"])
def test_node2vec_separates_two_cliques(tmp_path, method):
    vectors = node2vec_embedding(_two_cliques(), cache_dir=False, method=method, batch_pairs=512, **SMALL)
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    cosine = unit @ unit.T
    block = np.zeros((12, 12), dtype=bool)
    block[:6, :6] = block[6:, 6:] = True
    intra = cosine[block & ~np.eye(12, dtype=bool)].mean()
    inter = cosine[~block].mean()
    assert intra > 0.5 and intra - inter > 0.5, (intra, inter)


def test_node2vec_is_seeded_and_cached(tmp_path, monkeypatch):
    graph = _two_cliques()
    first = node2vec_embedding(graph, cache_dir=tmp_path, seed=3, **SMALL)
    files = list(tmp_path.iterdir())
    assert len(files) == 1 and files[0].suffix == ".txt"
    assert np.array_equal(read_word2vec(files[0]), first)

    def no_walks(*args, **kwargs):
        raise AssertionError("recomputed despite a cached result")

    monkeypatch.setattr(embedding, "BiasedRandomWalker", no_walks)
    assert np.array_equal(node2vec_embedding(graph, cache_dir=tmp_path, seed=3, **SMALL), first)
    monkeypatch.undo()
    # a damaged entry is computed again (and rewritten), with a warning
    files[0].write_text(files[0].read_text().splitlines()[0] + "\n")
    with pytest.warns(UserWarning, match="is unreadable .* computing the embedding again"):
        assert np.array_equal(node2vec_embedding(graph, cache_dir=tmp_path, seed=3, **SMALL), first)
    assert np.array_equal(read_word2vec(files[0]), first)
    # a different parameter is a different cache entry; the same seed without cache gives the same vectors
    node2vec_embedding(graph, cache_dir=tmp_path, seed=4, **SMALL)
    assert len(list(tmp_path.iterdir())) == 2
    assert np.array_equal(node2vec_embedding(graph, cache_dir=False, seed=3, **SMALL), first)


def test_cache_dir_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("GMAN_CACHE_DIR", str(tmp_path))
    node2vec_embedding(_two_cliques(), **SMALL)
    assert len(list((tmp_path / "node2vec").glob("*.txt"))) == 1


@pytest.mark.parametrize(
    "graph, kwargs, problem",
    [
        (np.zeros((2, 3)), {}, "square"),
        (-np.ones((2, 2)), {}, ">= 0"),
        (np.ones((2, 2)), {"p": 0.0}, "p and q must be > 0"),
        (np.ones((2, 2)), {"window": 0}, "window must be an integer >= 1"),
        (np.ones((2, 2)), {"method": "exact"}, "method must be 'auto', 'dense' or 'sampled'"),
        (np.ones((2, 2)), {"batch_pairs": 0}, "batch_pairs must be an integer >= 1"),
    ],
)
def test_node2vec_bad_arguments(graph, kwargs, problem):
    with pytest.raises(DataError, match=problem):
        node2vec_embedding(graph, cache_dir=False, **{**SMALL, **kwargs})


def test_sampled_objective_gradients_are_those_of_its_estimate():
    """The hand-written gradients of the sampled skip-gram loss equal autograd's on the same draws."""
    import torch.nn.functional as F

    walker = BiasedRandomWalker(_two_cliques(), p=2.0, q=1.0)
    counts = embedding.SkipGramCounts(12, window=3, num_negatives=5)
    counts.add_walks(walker.walk(torch.arange(12).repeat(5), 10, torch.Generator().manual_seed(0)))
    u = torch.randn(12, 4, dtype=torch.float64, requires_grad=True)
    v = torch.randn(12, 4, dtype=torch.float64, requires_grad=True)
    loss = embedding._sampled_loss(counts, u, v, 5, 64, torch.Generator().manual_seed(1))()
    grad_u, grad_v = u.grad.clone(), v.grad.clone()

    anchor, context, pair_weight, row, noise = counts.sparse()
    assert float(pair_weight.sum()) == pytest.approx(1.0) and float(row.sum()) == pytest.approx(1.0)
    generator = torch.Generator().manual_seed(1)  # the same draws, in the same order

    def draw(weights):
        cdf = torch.cumsum(weights, 0)
        return torch.searchsorted(cdf, torch.rand(64, generator=generator, dtype=torch.float64) * cdf[-1], right=True)

    pairs = draw(pair_weight)
    a, c, na, nn = anchor[pairs], context[pairs], draw(row), draw(noise)
    u.grad = v.grad = None
    expected = -F.logsigmoid((u[a] * v[c]).sum(1)).mean() - 5 * F.logsigmoid(-(u[na] * v[nn]).sum(1)).mean()
    expected.backward()
    assert float(loss) == pytest.approx(float(expected.detach()), rel=1e-12)
    torch.testing.assert_close(grad_u, u.grad, rtol=0, atol=1e-12)
    torch.testing.assert_close(grad_v, v.grad, rtol=0, atol=1e-12)


def test_auto_switches_to_sampling_above_the_dense_limit_and_keys_the_cache_by_it(tmp_path, monkeypatch):
    graph = _two_cliques()
    dense = node2vec_embedding(graph, cache_dir=tmp_path, **SMALL)
    monkeypatch.setattr(embedding, "DENSE_MAX_NODES", 11)  # 12 nodes: above the limit now
    sampled = node2vec_embedding(graph, cache_dir=tmp_path, batch_pairs=512, **SMALL)
    assert len(list(tmp_path.iterdir())) == 2 and not np.array_equal(dense, sampled)
    assert np.array_equal(node2vec_embedding(graph, cache_dir=False, method="sampled", batch_pairs=512, **SMALL), sampled)
    assert np.array_equal(node2vec_embedding(graph, cache_dir=False, method="dense", **SMALL), dense)


def test_an_unwritable_cache_is_a_warning_not_a_failure(tmp_path):
    from gman.data.embedding import node2vec_embedding

    (tmp_path / "file").write_text("a file, not a folder")
    adjacency = np.eye(5, k=1) + np.eye(5, k=-1)
    with pytest.warns(UserWarning, match="node2vec: could not cache the embedding"):
        vectors = node2vec_embedding(adjacency, dim=4, steps=3, cache_dir=tmp_path / "file" / "cache", progress=False)
    assert vectors.shape == (5, 4)
