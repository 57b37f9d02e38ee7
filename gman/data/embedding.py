"""Spatial embeddings (SE): the word2vec text format and node2vec.

word2vec text format (what GMAN's ``SE(METR).txt`` and gensim's
``save_word2vec_format`` write)::

    N dim
    <node index> v_1 ... v_dim        # N rows, in any order

Row ``i`` of the returned array is the vector of node index ``i``.
"""
from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from gman._modes import give_usual_mode
from gman.errors import DataError

if TYPE_CHECKING:  # pragma: no cover - annotations only; torch is imported where it is used
    import torch


def read_word2vec(path: str | Path, num_nodes: int | None = None) -> np.ndarray:
    """Read a word2vec-format SE file -> [N, dim] float32, row i = node index i.

    Node labels must be the integers 0..N-1 (each once).  ``num_nodes``, when
    given, must equal the header's N.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: spatial embedding file not found")
    lines = [ln.split() for ln in path.read_text(encoding="utf-8", errors="replace").splitlines() if ln.strip()]
    if not lines or len(lines[0]) != 2 or not all(f.isdigit() for f in lines[0]):
        raise DataError(f"{path}: not a word2vec text file (first line must be 'N dim')")
    n, dim = int(lines[0][0]), int(lines[0][1])
    if num_nodes is not None and n != num_nodes:
        raise DataError(f"{path}: embedding has {n} nodes but the graph/data has {num_nodes}")
    rows = lines[1:]
    if len(rows) != n:
        raise DataError(f"{path}: header says {n} nodes but the file has {len(rows)} vectors")
    vectors = np.empty((n, dim), dtype=np.float32)
    seen = np.zeros(n, dtype=bool)
    for line_number, fields in enumerate(rows, start=2):
        if len(fields) != dim + 1:
            raise DataError(f"{path}: line {line_number} has {len(fields) - 1} values, expected {dim}")
        try:
            node = int(fields[0])
            values = [float(v) for v in fields[1:]]
        except ValueError:
            raise DataError(f"{path}: line {line_number} is not '<node index> <{dim} numbers>'") from None
        if not 0 <= node < n:
            raise DataError(f"{path}: line {line_number}: node index {node} outside 0..{n - 1}")
        if seen[node]:
            raise DataError(f"{path}: line {line_number}: node index {node} appears twice")
        seen[node] = True
        vectors[node] = values
    if not np.isfinite(vectors).all():
        raise DataError(f"{path}: non-finite value in the embedding")
    return vectors


def write_word2vec(path: str | Path, vectors: np.ndarray) -> Path:
    """Write [N, dim] vectors in word2vec text format (row i labelled i); atomic (temp name + rename)."""
    path = Path(path)
    vectors = np.asarray(vectors, dtype=np.float32)
    if vectors.ndim != 2:
        raise DataError(f"{path}: embedding to write must be [N, dim], got shape {vectors.shape}")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(f"{vectors.shape[0]} {vectors.shape[1]}\n")
            for i, row in enumerate(vectors):
                # 9 significant digits round-trip float32 exactly
                fh.write(f"{i} " + " ".join(format(float(v), ".9g") for v in row) + "\n")
        give_usual_mode(tmp)  # mkstemp creates 0600: a shared cache is read by others
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


# ----------------------------------------------------------------------------- node2vec

NODE2VEC_DEFAULTS = dict(dim=64, walk_length=80, walks_per_node=100, window=10, p=2.0, q=1.0)


class BiasedRandomWalker:
    """Second-order (node2vec) random walks on a directed, weighted graph; pure torch, vectorised over walkers.

    From the walk's previous node t and current node v, the next node x is drawn with
    probability proportional to ``alpha(t, x) * w_vx`` where::

        alpha(t, x) = 1/p  if x == t          (return)
                      1    if t -> x is an edge (stay near t)
                      1/q  otherwise          (move outwards)

    (the node2vec paper's d_tx in {0, 1, 2}; on a symmetric graph this is
    also what the reference script computes).  Sampling is by rejection: draw
    x with probability w_vx / sum_y w_vy, accept with probability
    alpha(t, x) / max(alpha), redraw the rejected walkers only.  A node with
    no outgoing edge keeps the walker where it is.

    The graph is held as CSR: ``rowptr`` [N+1], ``col`` [E] (sorted within
    each row), ``cumulative_weight`` [E] float64 (running sum of w over all edges).
    """

    def __init__(self, adjacency: np.ndarray, p: float = 1.0, q: float = 1.0, weighted: bool = True):
        import torch

        if not (p > 0 and q > 0):
            raise DataError(f"node2vec: p and q must be > 0, got p={p}, q={q}")
        matrix = torch.as_tensor(np.asarray(adjacency, dtype=np.float32))
        if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
            raise DataError(f"node2vec: adjacency must be square, got shape {tuple(matrix.shape)}")
        if (matrix < 0).any() or not torch.isfinite(matrix).all():
            raise DataError("node2vec: adjacency weights must be finite and >= 0")
        self.num_nodes = matrix.shape[0]
        self.p, self.q, self.weighted = float(p), float(q), weighted
        row, col = matrix.nonzero(as_tuple=True)  # row-major, so sorted by (row, col)
        weight = matrix[row, col].double() if weighted else torch.ones(len(row), dtype=torch.float64)
        self.col = col
        self.degree = torch.bincount(row, minlength=self.num_nodes)
        self.rowptr = torch.zeros(self.num_nodes + 1, dtype=torch.long)
        self.rowptr[1:] = torch.cumsum(self.degree, 0)
        self.cumulative_weight = torch.cumsum(weight, 0)
        self.weight_before_row = torch.cat([torch.zeros(1, dtype=torch.float64), self.cumulative_weight])[self.rowptr[:-1]]
        self.row_weight = torch.zeros(self.num_nodes, dtype=torch.float64).index_add_(0, row, weight)
        self.edge_keys = row * self.num_nodes + col  # sorted; used to test "t -> x is an edge"
        alphas = (1.0 / self.p, 1.0, 1.0 / self.q)
        self.alpha_max = max(alphas)

    def _neighbour(self, current: "torch.Tensor", generator) -> "torch.Tensor":
        """One first-order step: x ~ w_vx for each v in ``current`` [B]; dangling nodes stay."""
        import torch

        u = torch.rand(current.shape, generator=generator, dtype=torch.float64)
        target = self.weight_before_row[current] + u * self.row_weight[current]
        edge = torch.searchsorted(self.cumulative_weight, target, right=True)
        start, stop = self.rowptr[current], self.rowptr[current + 1]
        edge = torch.minimum(torch.maximum(edge, start), stop - 1)  # guard against float round-off
        dangling = self.degree[current] == 0
        return torch.where(dangling, current, self.col[edge.clamp(min=0, max=max(len(self.col) - 1, 0))])

    def _is_edge(self, source: "torch.Tensor", target: "torch.Tensor") -> "torch.Tensor":
        import torch

        keys = source * self.num_nodes + target
        pos = torch.searchsorted(self.edge_keys, keys).clamp(max=max(len(self.edge_keys) - 1, 0))
        return self.edge_keys[pos] == keys

    def walk(self, start: "torch.Tensor", length: int, generator=None) -> "torch.Tensor":
        """Walks of ``length`` nodes (start included) from each node in ``start`` [B] -> LongTensor [B, length]."""
        import torch

        walks = torch.empty(len(start), length, dtype=torch.long)
        walks[:, 0] = start
        if length > 1:
            walks[:, 1] = self._neighbour(start, generator)
        unbiased = self.p == 1.0 and self.q == 1.0
        for step in range(2, length):
            previous, current = walks[:, step - 2], walks[:, step - 1]
            nxt = self._neighbour(current, generator)
            if not unbiased:
                pending = torch.arange(len(start))
                while len(pending):
                    t, x = previous[pending], nxt[pending]
                    alpha = torch.where(
                        x == t,
                        1.0 / self.p,
                        torch.where(self._is_edge(t, x), 1.0, 1.0 / self.q),
                    )
                    accept = torch.rand(len(pending), generator=generator, dtype=torch.float64) * self.alpha_max < alpha
                    # a dangling current node has one choice (stay): always accept it
                    accept |= self.degree[current[pending]] == 0
                    pending = pending[~accept]
                    if len(pending):
                        nxt[pending] = self._neighbour(current[pending], generator)
            walks[:, step] = nxt
        return walks


def _compiled_walk(walker: BiasedRandomWalker):
    """pyg-lib's compiled node2vec walk (what PyG's ``Node2Vec`` uses) when installed, else None.

    pyg-lib's walk ignores edge weights, so it is used for unweighted walks only.
    """
    import importlib.util

    if walker.weighted or importlib.util.find_spec("pyg_lib") is None:
        return None
    try:
        import torch
        from torch_geometric.typing import WITH_PYG_LIB

        if not WITH_PYG_LIB:
            return None
        random_walk = torch.ops.pyg.random_walk
    except (ImportError, AttributeError, RuntimeError):
        return None

    def walk(start, length, generator=None):
        # pyg-lib draws from the global RNG: seed it from our generator so runs stay reproducible
        seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            result = random_walk(walker.rowptr, walker.col, start, length - 1, walker.p, walker.q)
        return result[0] if isinstance(result, tuple) else result

    return walk


class SkipGramCounts:
    """Skip-gram with negative sampling (SGNS), written over co-occurrence counts of a walk corpus.

    word2vec's skip-gram pairs each node of a walk with the nodes up to
    ``window`` steps before and after it; a pair k steps apart counts with
    weight (window - k + 1) / window (word2vec's shrinking window).  Summing
    the SGNS loss over the corpus groups identical pairs, so the objective is::

        loss = -sum_{a,c} C[a, c] log sigmoid(u_a . v_c) - sum_{a,n} C_neg[a, n] log sigmoid(-u_a . v_n)

    normalised by sum(C), where ``C`` [N, N] holds the weighted pair counts,
    ``u`` [N, dim] the node ("input") vectors, ``v`` [N, dim] the context
    ("output") vectors, and ``C_neg[a, n] = K * occ(a) * P(n)`` the expected
    counts of K noise draws per pair from the unigram^0.75 distribution
    ``P(n) ∝ occ(n)^0.75`` (occ = occurrences of n as a context).  Using the
    expectation instead of sampled noise leaves the objective unchanged in
    expectation and removes its sampling noise.  The embedding is ``u``.
    """

    def __init__(self, num_nodes: int, window: int, num_negatives: int):
        import torch

        self.num_nodes, self.window, self.num_negatives = num_nodes, window, num_negatives
        # window * C as exact integers: a pair k steps apart adds window - k + 1
        self.scaled_counts = torch.zeros(num_nodes * num_nodes, dtype=torch.int64)

    def add_walks(self, walks: "torch.Tensor") -> None:
        """Accumulate the weighted pairs of walks [B, L] (both directions) into ``C``.

        Scattered straight into the [N·N] counts (``index_add_``): a ``bincount`` per
        offset allocated and added an N² array each time, which made counting the
        slowest part for a few thousand nodes (2,025-node grid: 27.9 s of 34).
        """
        import torch

        n = self.num_nodes
        for k in range(1, min(self.window, walks.shape[1] - 1) + 1):
            before, after = walks[:, :-k].reshape(-1), walks[:, k:].reshape(-1)
            pairs = torch.cat([before * n + after, after * n + before])
            weight = torch.full((1,), self.window - k + 1, dtype=torch.int64).expand(len(pairs))
            self.scaled_counts.index_add_(0, pairs, weight)

    @property
    def positive(self) -> "torch.Tensor":
        """C [N·N] float64: the weighted pair counts."""
        return self.scaled_counts.double() / self.window

    def matrices(self) -> tuple["torch.Tensor", "torch.Tensor"]:
        """(C [N, N], C_neg [N, N]) float32, both divided by sum(C)."""
        import torch

        positive = self.positive.view(self.num_nodes, self.num_nodes)
        occurrences = positive.sum(0)  # weighted count of each node as a context
        noise = occurrences.pow(0.75)
        noise = noise / noise.sum()
        negative = self.num_negatives * positive.sum(1, keepdim=True) * noise[None, :]
        total = positive.sum()
        return (positive / total).float(), (negative / total).float()

    def sparse(self) -> tuple["torch.Tensor", "torch.Tensor", "torch.Tensor", "torch.Tensor", "torch.Tensor"]:
        """The objective's weights without N x N matrices: (anchor [E], context [E], pair weight [E]
        summing to 1, anchor weight r [N] = row sums of C / sum(C), noise P [N]) for the E non-zero pairs."""
        import torch

        keys = self.scaled_counts.nonzero().squeeze(1)
        counts = self.scaled_counts[keys].double()
        anchor, context = keys // self.num_nodes, keys % self.num_nodes
        total = counts.sum()
        row = torch.zeros(self.num_nodes, dtype=torch.float64).index_add_(0, anchor, counts) / total
        occurrences = torch.zeros(self.num_nodes, dtype=torch.float64).index_add_(0, context, counts)
        noise = occurrences.pow(0.75)
        return anchor, context, counts / total, row, noise / noise.sum()

    @staticmethod
    def loss(u: "torch.Tensor", v: "torch.Tensor", positive: "torch.Tensor", negative: "torch.Tensor") -> "torch.Tensor":
        """u, v: [N, dim]; positive, negative: [N, N] normalised counts -> scalar loss."""
        import torch.nn.functional as F

        scores = u @ v.T  # [N, N]
        return -(positive * F.logsigmoid(scores)).sum() - (negative * F.logsigmoid(-scores)).sum()


def node2vec_embedding(
    adjacency: np.ndarray,
    dim: int = 64,
    walk_length: int = 80,
    walks_per_node: int = 100,
    window: int = 10,
    p: float = 2.0,
    q: float = 1.0,
    steps: int = 500,
    num_negatives: int = 5,
    lr: float = 0.02,
    weighted: bool = True,
    seed: int = 0,
    cache_dir: str | Path | None | bool = None,
    progress: bool = True,
    method: str = "auto",
    batch_pairs: int = 1 << 14,
) -> np.ndarray:
    """node2vec spatial embedding of a graph -> [N, dim] float32 (row i = node i of ``adjacency``).

    Defaults follow GMAN's authors (directed, weighted walks, p=2, q=1, 64
    dims, walks of 80 nodes, 100 walks per node, window 10, 5 negatives).
    Like the reference pipeline, the walks are drawn once; then ``steps``
    Adam steps minimise the skip-gram loss over that corpus
    (:class:`SkipGramCounts`), by ``method``:

    - ``"dense"``: full-batch over the exact objective, whose N x N score matrix
      makes each step O(N^2 dim) (64 ms at N = 2,025, 2 cores; 500 steps);
    - ``"sampled"``: each step estimates the same objective from ``batch_pairs``
      co-occurring pairs drawn by weight and ``batch_pairs`` noise pairs (anchor by
      its weight, context from the unigram^0.75 distribution), as word2vec does:
      O(batch_pairs dim) per step whatever N;
    - ``"auto"`` (default): dense up to :data:`DENSE_MAX_NODES` nodes, sampled above.

    The counts take O(N^2) memory (8 bytes per pair): tens of thousands of nodes at most.

    The result is cached in word2vec text format under ``cache_dir`` (default
    ``$GMAN_CACHE_DIR/node2vec`` or ``~/.cache/gman/node2vec``), keyed by the
    sha256 of the adjacency and every parameter; ``cache_dir=False`` disables it.
    """
    import torch

    adjacency = np.ascontiguousarray(adjacency, dtype=np.float32)
    params = dict(dim=dim, walk_length=walk_length, walks_per_node=walks_per_node, window=window, p=p, q=q,
                  steps=steps, num_negatives=num_negatives, lr=lr, weighted=weighted, seed=seed)
    for name in ("dim", "walk_length", "walks_per_node", "window", "steps", "num_negatives"):
        if not isinstance(params[name], (int, np.integer)) or params[name] < 1:
            raise DataError(f"node2vec: {name} must be an integer >= 1, got {params[name]!r}")
    if method not in ("auto", "dense", "sampled"):
        raise DataError(f"node2vec: method must be 'auto', 'dense' or 'sampled', got {method!r}")
    if not isinstance(batch_pairs, (int, np.integer)) or batch_pairs < 1:
        raise DataError(f"node2vec: batch_pairs must be an integer >= 1, got {batch_pairs!r}")
    if method == "auto":
        method = "dense" if adjacency.shape[0] <= DENSE_MAX_NODES else "sampled"
    if method == "sampled":  # dense keys stay as they were, so embeddings cached before still match
        params.update(method="sampled", batch_pairs=int(batch_pairs))
    cache_path = None
    if cache_dir is not False:
        cache_path = _cache_root(cache_dir) / f"{node2vec_cache_key(adjacency, params)}.txt"
        if cache_path.is_file():
            try:
                return read_word2vec(cache_path, num_nodes=adjacency.shape[0])
            except DataError as err:  # a damaged cache entry (a disk or a hand edit): computed again below
                warnings.warn(f"node2vec cache {cache_path} is unreadable ({err}); computing the embedding again",
                              stacklevel=2)

    # The tensors here are small (walkers x 1 per walk step, N x N scores): splitting them over
    # threads costs more in synchronisation than it saves, and on a busy machine an intra-op barrier
    # waiting for a descheduled thread made METR-LA ~15x slower (2 threads, load 6: 66 s vs 5.6 s).
    threads = torch.get_num_threads()
    if adjacency.shape[0] <= _SINGLE_THREAD_MAX_NODES:
        torch.set_num_threads(1)
    try:
        vectors = _train_node2vec(adjacency, dim, walk_length, walks_per_node, window, p, q, steps,
                                  num_negatives, lr, weighted, seed, progress,
                                  batch_pairs if method == "sampled" else None)
    finally:
        torch.set_num_threads(threads)
    if cache_path is not None:
        try:
            write_word2vec(cache_path, vectors)
        except OSError as err:  # a cache is best effort: an unwritable one must not stop the training
            warnings.warn(f"node2vec: could not cache the embedding in {cache_path.parent} ({err.strerror or err}); "
                          f"set GMAN_CACHE_DIR to a writable folder to keep it", stacklevel=2)
    return vectors


_SINGLE_THREAD_MAX_NODES = 2000

#: ``method="auto"`` trains on the exact (dense) objective up to this many nodes.
DENSE_MAX_NODES = 2000


def _train_node2vec(adjacency, dim, walk_length, walks_per_node, window, p, q, steps, num_negatives, lr,
                    weighted, seed, progress, batch_pairs=None) -> np.ndarray:
    """Walks, co-occurrence counts, then Adam on the skip-gram loss -> [N, dim] float32
    (full-batch, or ``batch_pairs`` sampled pairs per step when given)."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    walker = BiasedRandomWalker(adjacency, p=p, q=q, weighted=weighted)
    walk = _compiled_walk(walker) or walker.walk
    corpus = SkipGramCounts(walker.num_nodes, window, num_negatives)
    starts = torch.arange(walker.num_nodes).repeat(walks_per_node)
    walk_batches = starts.split(4096)

    from tqdm.auto import tqdm

    with tqdm(total=len(walk_batches) + steps, desc="node2vec", unit="step", disable=not progress, leave=False) as bar:
        bar.set_postfix_str("walks")
        for batch in walk_batches:
            corpus.add_walks(walk(batch, walk_length, generator))
            bar.update()
        # word2vec's initialisation: small random node vectors, zero context vectors
        u = ((torch.rand(walker.num_nodes, dim, generator=generator) - 0.5) / dim).requires_grad_()
        v = torch.zeros(walker.num_nodes, dim, requires_grad=True)
        optimizer = torch.optim.Adam([u, v], lr=lr)
        if batch_pairs is None:
            positive, negative = corpus.matrices()

            def loss_and_gradients() -> "torch.Tensor":
                optimizer.zero_grad()
                loss = SkipGramCounts.loss(u, v, positive, negative)
                loss.backward()
                return loss
        else:
            loss_and_gradients = _sampled_loss(corpus, u, v, num_negatives, batch_pairs, generator)
        for step in range(steps):
            loss = loss_and_gradients()
            optimizer.step()
            if step % 50 == 0 or step == steps - 1:
                bar.set_postfix_str(f"loss={loss.item():.4f}")
            bar.update()
    return u.detach().numpy().astype(np.float32)


def _sampled_loss(corpus: SkipGramCounts, u, v, num_negatives: int, batch_pairs: int, generator):
    """A function that draws one unbiased estimate of :meth:`SkipGramCounts.loss`, writes its
    gradients into ``u.grad`` and ``v.grad`` and returns it::

        loss = E_(a,c)~C [-log sigmoid(u_a . v_c)] + K E_a~r, n~P [-log sigmoid(-u_a . v_n)]

    (the dense objective's pair weights sum to 1 and its noise weights to K), from
    ``batch_pairs`` pairs of each kind drawn by inverse-CDF sampling.  The gradients are
    written out (d/ds of the two terms are -sigmoid(-s)/B and K sigmoid(s)/B, scattered with
    ``index_add_``): autograd through the row gathers took 2.5x as long."""
    import torch
    import torch.nn.functional as F

    anchor, context, pair_weight, row, noise = corpus.sparse()
    cumulative = [torch.cumsum(w, 0) for w in (pair_weight, row, noise)]

    def draw(which: int) -> "torch.Tensor":
        cdf = cumulative[which]
        target = torch.rand(batch_pairs, generator=generator, dtype=torch.float64) * cdf[-1]
        return torch.searchsorted(cdf, target, right=True).clamp_(max=len(cdf) - 1)

    def loss_and_gradients() -> "torch.Tensor":
        pairs = draw(0)
        terms = ((anchor[pairs], context[pairs], 1.0), (draw(1), draw(2), -1.0))  # (anchors, contexts, sign)
        with torch.no_grad():
            grad_u, grad_v = torch.zeros_like(u), torch.zeros_like(v)
            loss = u.new_zeros(())
            for a, c, sign in terms:
                ua, vc = u[a], v[c]
                score = sign * (ua * vc).sum(1)  # the term is -log sigmoid(score), times K for noise
                scale = 1.0 if sign > 0 else float(num_negatives)
                loss -= scale * F.logsigmoid(score).mean()
                coefficient = (-sign * scale / batch_pairs) * torch.sigmoid(-score)  # d loss / d (u_a . v_c)
                grad_u.index_add_(0, a, coefficient[:, None] * vc)
                grad_v.index_add_(0, c, coefficient[:, None] * ua)
            u.grad, v.grad = grad_u, grad_v
        return loss

    return loss_and_gradients


def node2vec_cache_key(adjacency: np.ndarray, params: dict) -> str:
    """sha256 over the adjacency (shape, float32 bytes) and the sorted parameters."""
    import hashlib
    import json

    adjacency = np.ascontiguousarray(adjacency, dtype=np.float32)
    digest = hashlib.sha256()
    digest.update(f"gman-node2vec-v1 {adjacency.shape}".encode())
    digest.update(adjacency.tobytes())
    digest.update(json.dumps(params, sort_keys=True).encode())
    return digest.hexdigest()


def _cache_root(cache_dir: str | Path | None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir)
    base = os.environ.get("GMAN_CACHE_DIR")
    return (Path(base) if base else Path.home() / ".cache" / "gman") / "node2vec"
