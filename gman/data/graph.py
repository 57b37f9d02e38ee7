"""Sensor graphs: read them, build them from road distances, convert and describe them.

A graph here is a dense adjacency matrix ``A`` [N, N] float32 where ``A[i, j]``
is the weight of the directed edge ``i -> j`` (0 = no edge), in a known sensor
order.  The forms users bring, and how each becomes ``A``:

| format            | file                                             | ``A``                                   |
| ----------------- | ------------------------------------------------ | --------------------------------------- |
| ``dcrnn-pickle``  | DCRNN ``adj_mx.pkl`` ``[ids, id->index, A]``     | as stored (restricted unpickler)        |
| ``dense-csv``     | N x N weights, optional header row of ids        | as stored                               |
| ``edge-list``     | ``from,to[,cost]`` rows (PEMS03/04/07/08)        | binary: 1 where an edge is listed       |
| ``distance-csv``  | ``from,to,cost`` road distances (DCRNN)          | Gaussian kernel of the distances        |
| ``distance-matrix`` | N x N distances (PeMSD7(M) ``W_228.csv``)      | Gaussian kernel of the distances        |

Gaussian kernel (DCRNN): ``w_ij = exp(-(d_ij / sigma)^2)`` with ``sigma`` the
standard deviation of the finite distances, ``w_ij < threshold -> 0``,
directed, diagonal 1.
"""
from __future__ import annotations

import io
import pickle
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np

from gman.errors import DataError

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd
    import torch

GRAPH_FORMATS = ("dcrnn-pickle", "dense-csv", "edge-list", "distance-csv", "distance-matrix")


# ----------------------------------------------------------------------------- DCRNN pickles

# The only callables a DCRNN adj_mx.pkl references (seen in the METR-LA and
# PEMS-BAY files): numpy's array reconstruction.  numpy 2 renamed numpy.core to
# numpy._core, so both spellings are admitted; protocol 5 rebuilds arrays with
# _frombuffer.  Lists, dicts, str, bytes and numbers need no global lookup,
# except that Python 3 writes bytes at protocol <= 2 as _codecs.encode(text,
# "latin1"), which is admitted for that one encoding only.
_ALLOWED_PICKLE_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
}


def _latin1_bytes(text: str, encoding: str = "latin1") -> bytes:
    """Stand-in for ``_codecs.encode`` that only turns text into latin-1 bytes."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError("_codecs.encode used for something other than latin-1 bytes")
    return text.encode("latin1")


class _PlainDataUnpickler(pickle.Unpickler):
    """Unpickler that resolves only numpy array reconstruction; any other global is refused.

    A pickle is a program: ``GLOBAL os system`` + ``REDUCE`` runs a shell
    command on load.  Refusing every global outside the list above leaves only
    containers, strings, numbers and numpy arrays constructible.
    """

    def __init__(self, file, path: Path):
        super().__init__(file, encoding="latin1")  # DCRNN wrote these with Python 2
        self._path = path

    def find_class(self, module: str, name: str):
        if (module, name) == ("_codecs", "encode"):
            return _latin1_bytes
        if (module, name) in _ALLOWED_PICKLE_GLOBALS:
            return super().find_class(module, name)
        raise DataError(
            f"{self._path}: refused to load pickle: it references {module}.{name}, "
            "but only lists, dicts, strings, numbers and numpy arrays are allowed (a pickle can run code)"
        )

    def persistent_load(self, pid):
        raise DataError(f"{self._path}: refused to load pickle: it uses persistent ids (a pickle can run code)")


def read_dcrnn_pickle(path: str | Path) -> tuple[np.ndarray, list[str]]:
    """Read a DCRNN ``adj_mx.pkl``: ``[sensor_ids, sensor_id_to_ind, adj_mx]``.

    Returns ``(adjacency [N, N] float32, sensor_ids [N])``.
    """
    path = Path(path)
    raw = _read_bytes(path)
    try:
        content = _PlainDataUnpickler(io.BytesIO(raw), path).load()
    except DataError:
        raise
    except Exception as err:  # truncated or not a pickle at all
        raise DataError(f"{path}: not a readable pickle ({type(err).__name__}: {_first_line(err)})") from None
    if not (isinstance(content, (list, tuple)) and len(content) == 3):
        raise DataError(f"{path}: expected a DCRNN pickle [sensor_ids, sensor_id_to_ind, adj_mx], got {type(content).__name__}")
    sensor_ids, id_to_index, matrix = content
    if not isinstance(matrix, np.ndarray) or matrix.dtype.kind not in "fiub":
        raise DataError(f"{path}: the third item must be a numeric numpy array, got {type(matrix).__name__}")
    ids = [id_text(s) for s in sensor_ids]
    adjacency = _check_square(matrix.astype(np.float32), path)
    if len(ids) != adjacency.shape[0]:
        raise DataError(f"{path}: {len(ids)} sensor ids but a {adjacency.shape[0]}x{adjacency.shape[0]} matrix")
    if isinstance(id_to_index, dict) and any(id_to_index.get(k, i) != i for i, k in enumerate(sensor_ids)):
        raise DataError(f"{path}: sensor_id_to_ind disagrees with the order of sensor_ids")
    _check_unique(ids, path)
    return adjacency, ids


# ----------------------------------------------------------------------------- builders

def gaussian_kernel(distances: np.ndarray, threshold: float = 0.1, sigma: float | None = None) -> np.ndarray:
    """Gaussian kernel of a distance matrix: ``w = exp(-(d / sigma)^2)``, ``w < threshold -> 0``.

    distances: [N, N], ``inf`` where no road distance is known.  ``sigma``
    defaults to the standard deviation of the finite entries.  The diagonal is
    set to 1 (self-loops).  Returns [N, N] float32.
    """
    d = np.asarray(distances, dtype=np.float64)
    finite = d[np.isfinite(d)]
    if finite.size == 0:
        raise DataError("distances: no finite distance to build a Gaussian kernel from")
    sigma = float(finite.std()) if sigma is None else float(sigma)
    if not sigma > 0:
        raise DataError(f"distances: Gaussian kernel width sigma must be > 0, got {sigma}")
    with np.errstate(over="ignore", invalid="ignore"):
        weights = np.exp(-np.square(d / sigma))
    weights[~np.isfinite(d)] = 0.0
    weights[weights < threshold] = 0.0
    np.fill_diagonal(weights, 1.0)
    return weights.astype(np.float32)


def gaussian_kernel_adjacency(
    distances: "pd.DataFrame", sensor_ids: Sequence[str], threshold: float = 0.1, *, source: str = "distances",
    warn_unmentioned: bool = True,
) -> np.ndarray:
    """DCRNN adjacency from road distances.

    distances: a DataFrame with columns ``from, to, cost`` (``distance`` is
    accepted for ``cost``); rows whose ends are not both in ``sensor_ids`` are
    ignored (DCRNN's distance files cover more sensors than each data set).
    ``d_ij`` = cost of ``i -> j`` (inf where absent); ``sigma`` = std of the
    finite ``d_ij`` among the kept rows; ``w_ij = exp(-(d_ij/sigma)^2)``;
    ``w_ij < threshold -> 0``; directed; diagonal 1.

    Returns [N, N] float32 in ``sensor_ids`` order.
    """
    ids = [id_text(s) for s in sensor_ids]
    _check_unique(ids, source)
    frm, to, cost = _edge_columns(distances, source, need_cost=True)
    index = {s: i for i, s in enumerate(ids)}
    rows = np.array([index.get(s, -1) for s in frm])
    cols = np.array([index.get(s, -1) for s in to])
    keep = (rows >= 0) & (cols >= 0)
    if not keep.any():
        raise DataError(f"{source}: no row connects two of the {len(ids)} given sensors (ids do not match)")
    # A sensor in no row at all is unknown to the file (an id that differs?); one with only its
    # zero self-distance is known and isolated, as 4 of PEMS-BAY's 325 are in DCRNN's graph.
    mentioned = np.zeros(len(ids), dtype=bool)
    mentioned[rows[keep]] = mentioned[cols[keep]] = True
    if warn_unmentioned and not mentioned.all():
        unknown = [ids[i] for i in np.flatnonzero(~mentioned)]
        warnings.warn(f"{source}: {len(unknown)} of the {len(ids)} sensors are in no row of the distances, "
                      f"e.g. {unknown[:3]}: they have no edges", stacklevel=2)
    rows, cols, cost = _drop_repeated_edges(rows[keep], cols[keep], cost[keep], ids, source)
    dist = np.full((len(ids), len(ids)), np.inf)
    dist[rows, cols] = cost
    return gaussian_kernel(dist, threshold=threshold)


def edge_list_adjacency(
    edges: "pd.DataFrame", sensor_ids: Sequence[str], *, weighted: bool = False, source: str = "edges"
) -> np.ndarray:
    """Connectivity matrix from an edge list (PEMS0X ``from,to,cost``).

    ``A[i, j] = 1`` (or the cost when ``weighted``) for each listed edge
    ``i -> j``; directed, no self-loops added.  Every id must be one of
    ``sensor_ids``.  Returns [N, N] float32 in ``sensor_ids`` order.
    """
    ids = [id_text(s) for s in sensor_ids]
    _check_unique(ids, source)
    frm, to, cost = _edge_columns(edges, source, need_cost=weighted)
    index = {s: i for i, s in enumerate(ids)}
    unknown = sorted({s for s in list(frm) + list(to) if s not in index})
    if unknown:
        raise DataError(
            f"{source}: {len(unknown)} sensor(s) in the graph but not in the sensor list, e.g. {unknown[:3]}"
        )
    rows = np.array([index[s] for s in frm], dtype=np.int64)
    cols = np.array([index[s] for s in to], dtype=np.int64)
    rows, cols, cost = _drop_repeated_edges(rows, cols, cost, ids, source)
    adjacency = np.zeros((len(ids), len(ids)), dtype=np.float32)
    adjacency[rows, cols] = cost if weighted else 1.0
    return adjacency


# ----------------------------------------------------------------------------- loading files

def load_adjacency(
    path: str | Path,
    format: str | None = None,
    sensor_ids: Sequence[str] | None = None,
    *,
    id_map: str | Path | Sequence[str] | None = None,
    threshold: float = 0.1,
) -> tuple[np.ndarray, list[str] | None]:
    """Read a graph file in any supported form.

    Returns ``(adjacency [N, N] float32, ids)`` where ``ids`` is the sensor
    order of the adjacency as the file defines it, or None when the file holds
    no ids (a bare matrix: its order is assumed to be the data's).

    - ``sensor_ids`` (the data's sensors) is needed by ``distance-csv`` and by
      ``edge-list`` without an id map.  Their nodes are then the sensors the
      file's rows mention: the data's, in the data's order, then (edge lists
      only) ids that are not the data's, in the file's order.  A data sensor in
      no row is not a node, so the caller sees it as unmatched; rows of a
      distance file about sensors outside ``sensor_ids`` are ignored (DCRNN's
      distance files cover more sensors than each data set).
    - ``id_map``: the graph's node list, a text file with one sensor id per
      line or a list of ids.  For ``edge-list`` it is the row order (PEMS03's
      ``PEMS03.txt``; when not given, a ``<stem>.txt`` beside a non-``.txt``
      edge list is used if present): the ends of its rows are ids of that list
      when all of them are, else node indices 0..M-1 into it; for
      ``distance-csv`` the sensors the graph knows, including any without
      edges; for a matrix without a header row of ids, the order of its rows.
    - ``threshold``: Gaussian-kernel cut-off for the distance formats.
    """
    path = Path(path)
    if path.is_dir():
        raise DataError(f"{path}: is a folder, not a graph file")
    if not path.is_file():
        raise DataError(f"{path}: graph file not found")
    fmt = format or guess_graph_format(path)
    if fmt not in GRAPH_FORMATS:
        raise DataError(f"{path}: unknown graph format {fmt!r}; choose from {', '.join(GRAPH_FORMATS)}")
    nodes = _id_map(id_map) if id_map is not None else None

    if fmt == "dcrnn-pickle":
        if nodes is not None:
            raise DataError(f"{path}: a DCRNN pickle names its sensors itself; drop the graph sensor ids")
        return read_dcrnn_pickle(path)

    if fmt in ("dense-csv", "distance-matrix"):
        matrix, ids = _read_dense_csv(path)
        if ids is not None and nodes is not None:
            raise DataError(f"{path}: the matrix's header row names its sensors; drop the graph sensor ids")
        if fmt == "distance-matrix":
            if (matrix < 0).any():
                raise DataError(f"{path}: negative distance in the distance matrix")
            matrix = gaussian_kernel(matrix, threshold=threshold)
        if ids is None and nodes is not None:
            if len(nodes) != matrix.shape[0]:
                raise DataError(f"{path}: {len(nodes)} graph sensor ids for a {matrix.shape[0]}x{matrix.shape[0]} matrix")
            ids = nodes
        return matrix, ids

    table = _read_edge_table(path)
    frm, to, _ = _edge_columns(table, str(path), need_cost=False)
    if format is None and fmt == "edge-list" and any(c in table.columns for c in ("cost", "distance", "weight")):
        warnings.warn(f"{path}: read as an edge-list (connectivity 0/1, as PEMS0X are used): its cost column is "
                      "ignored; give graph_format: distance-csv to weight edges by road distance", stacklevel=2)
    if fmt == "distance-csv":
        if nodes is None and sensor_ids is None:
            raise DataError(f"{path}: a distance-csv graph needs the sensor ids (the data's sensors) to fix its order")
        if nodes is None:
            mentioned = set(frm) | set(to)
            data = [id_text(i) for i in sensor_ids]
            nodes = [s for s in data if s in mentioned]
            if not len(frm):
                raise DataError(f"{path}: no distance rows")
            if not nodes:
                raise DataError(f"{path}: none of the file's sensor ids matches one of the data's {len(data)} sensors "
                                f"(file e.g. {frm[0]!r}, data e.g. {data[0]!r})")
        # sensors listed in the id map without rows are meant to be nodes without edges
        return gaussian_kernel_adjacency(table, nodes, threshold, source=str(path), warn_unmentioned=False), nodes

    # edge-list
    if nodes is None and path.suffix.lower() != ".txt" and path.with_suffix(".txt").is_file():
        nodes = read_sensor_ids(path.with_suffix(".txt"))
    if nodes is not None:
        table = _edges_over_node_ids(table, frm, to, nodes)
    if nodes is None:
        if sensor_ids is None:
            raise DataError(f"{path}: an edge-list graph needs the sensor ids or an id map file to fix the node order")
        mentioned = set(frm) | set(to)
        data = [id_text(s) for s in sensor_ids]
        known = set(data)
        nodes = [s for s in data if s in mentioned] + list(dict.fromkeys(s for s in [*frm, *to] if s not in known))
    return edge_list_adjacency(table, nodes, source=str(path)), nodes


def _edges_over_node_ids(table: "pd.DataFrame", frm: np.ndarray, to: np.ndarray, nodes: list[str]) -> "pd.DataFrame":
    """The edge table with its ends as ids of ``nodes``, the graph's node list.

    Ends are ids when every one is in the list (PEMS03's station numbers, which are integers too).
    Otherwise, when every end is a node index (a whole number 0..M-1 written without leading zeros),
    ``i`` is the node ``nodes[i]``; anything else is left for :func:`edge_list_adjacency` to report.
    """
    ends = set(frm) | set(to)
    if ends <= set(nodes):
        return table
    if not all(end.isdigit() and str(int(end)) == end and int(end) < len(nodes) for end in ends):
        return table
    return table.assign(**{"from": [nodes[int(end)] for end in frm], "to": [nodes[int(end)] for end in to]})


def _id_map(id_map: str | Path | Sequence[str]) -> list[str]:
    """A graph's node list: a file of ids, or the ids themselves."""
    if isinstance(id_map, (str, Path)):
        return read_sensor_ids(id_map)
    ids = [id_text(s) for s in id_map]
    _check_unique(ids, "graph sensor ids")
    return ids


def guess_graph_format(path: str | Path) -> str:
    """Guess a graph file's format from its extension and first line."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in (".pkl", ".pickle"):
        return "dcrnn-pickle"
    if suffix not in (".csv", ".txt", ".tsv", ""):
        raise DataError(f"{path}: cannot guess the graph format from the extension; give one of {', '.join(GRAPH_FORMATS)}")
    with open(path, encoding="utf-8", errors="replace") as fh:
        first = fh.readline().strip().lower()
    fields = [f.strip() for f in first.split(",")]
    # numeric from,to[,cost] rows without a header (distances_bay_2017.csv); a 2x2 or 3x3 matrix has N or N+1 lines
    headerless_triples = (len(fields) in (2, 3) and all(_is_number(f) for f in fields)
                          and _count_lines(path) not in (len(fields), len(fields) + 1))
    if fields[:2] == ["from", "to"] or headerless_triples:
        # a cost column holding road distances is the DCRNN distance file; PEMS0X lists are connectivity
        return "edge-list" if len(fields) == 2 or _looks_like_pems_edge_list(path) else "distance-csv"
    return "dense-csv"


def _count_lines(path: Path) -> int:
    with open(path, "rb") as fh:
        return sum(1 for line in fh if line.strip())


def _looks_like_pems_edge_list(path: Path) -> bool:
    """DCRNN distance files list every sensor's self-distance 0; PEMS0X edge lists (almost) never do."""
    table = _read_edge_table(path)
    frm, to, _ = _edge_columns(table, str(path), need_cost=False)
    return int((frm == to).sum()) < 0.5 * len(set(frm))


def read_sensor_ids(path: str | Path) -> list[str]:
    """Sensor ids, one per line or comma-separated (DCRNN ``graph_sensor_ids.txt``, PEMS03 ``PEMS03.txt``)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: sensor id file not found")
    text = path.read_text(encoding="utf-8", errors="replace")
    ids = [s.strip() for s in text.replace(",", "\n").splitlines() if s.strip()]
    if not ids:
        raise DataError(f"{path}: no sensor ids in the file")
    _check_unique(ids, path)
    return ids


# ----------------------------------------------------------------------------- PyG conversion, stats

def to_edge_index(adjacency: np.ndarray) -> tuple["torch.Tensor", "torch.Tensor"]:
    """Dense adjacency [N, N] -> (edge_index LongTensor [2, E], edge_weight FloatTensor [E]), PyG layout.

    Edge ``k`` goes ``edge_index[0, k] -> edge_index[1, k]`` (row -> column).
    """
    import torch
    from torch_geometric.utils import dense_to_sparse

    matrix = torch.as_tensor(_check_square(np.asarray(adjacency, dtype=np.float32), "adjacency"))
    edge_index, edge_weight = dense_to_sparse(matrix)
    return edge_index, edge_weight


def from_edge_index(edge_index: "torch.Tensor", edge_weight: "torch.Tensor | None", num_nodes: int) -> np.ndarray:
    """(edge_index [2, E], edge_weight [E] or None) -> dense adjacency [N, N] float32."""
    from torch_geometric.utils import to_dense_adj

    dense = to_dense_adj(edge_index, edge_attr=edge_weight, max_num_nodes=num_nodes)[0]
    return dense.numpy().astype(np.float32)


@dataclass(frozen=True)
class GraphStats:
    """Summary of a directed graph.  ``edges`` counts non-zero off-diagonal entries."""

    nodes: int
    edges: int
    self_loops: int
    isolated_nodes: int
    weakly_connected_components: int
    symmetric: bool

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def graph_stats(adjacency: np.ndarray) -> GraphStats:
    """Nodes, directed edges, self-loops, isolated nodes (no edge to or from another node) and weak components."""
    matrix = _check_square(np.asarray(adjacency, dtype=np.float32), "adjacency")
    n = matrix.shape[0]
    nonzero = matrix != 0
    self_loops = int(np.trace(nonzero))
    off_diagonal = nonzero & ~np.eye(n, dtype=bool)
    touched = off_diagonal.any(axis=0) | off_diagonal.any(axis=1)
    rows, cols = np.nonzero(off_diagonal)
    return GraphStats(
        nodes=n,
        edges=int(off_diagonal.sum()),
        self_loops=self_loops,
        isolated_nodes=int((~touched).sum()),
        weakly_connected_components=_count_weak_components(n, rows, cols),
        symmetric=bool(np.array_equal(matrix, matrix.T)),
    )


def _count_weak_components(n: int, rows: np.ndarray, cols: np.ndarray) -> int:
    """Union-find over the edges, ignoring direction."""
    parent = list(range(n))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for a, b in zip(rows.tolist(), cols.tolist()):
        ra, rb = root(a), root(b)
        if ra != rb:
            parent[ra] = rb
    return len({root(i) for i in range(n)})


# ----------------------------------------------------------------------------- helpers

def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except OSError as err:
        raise DataError(f"{path}: cannot read ({err.strerror})") from None


def _read_dense_csv(path: Path) -> tuple[np.ndarray, list[str] | None]:
    """N x N numbers, comma-separated, with or without a header row of sensor ids."""
    lines = [ln for ln in path.read_text(encoding="utf-8", errors="replace").splitlines() if ln.strip()]
    if not lines:
        raise DataError(f"{path}: empty matrix file")
    ids = None
    first = [f.strip() for f in lines[0].split(",")]
    # A header row of ids: text, or numeric ids (PeMS station numbers) on top of an N x N block.
    if not all(_is_number(f) for f in first) or len(lines) == len(first) + 1:
        ids = [id_text(f.strip('"')) for f in first]
        lines = lines[1:]
        if ids[0] == "":  # the empty corner cell of a matrix saved with pandas' index
            raise DataError(f"{path}: matrix has a row-label column; save it without the index")
    try:
        rows = [[float(f) for f in ln.split(",")] for ln in lines]
    except ValueError:
        bad = next(i for i, ln in enumerate(lines) if not all(_is_number(f) for f in ln.split(",")))
        raise DataError(f"{path}: non-numeric entry in matrix row {bad + 1 + (ids is not None)}") from None
    widths = {len(r) for r in rows}
    if len(widths) != 1:
        raise DataError(f"{path}: matrix rows have different lengths {sorted(widths)[:4]}")
    matrix = np.array(rows, dtype=np.float64)
    if ids is not None:
        if len(ids) != matrix.shape[1]:
            raise DataError(f"{path}: header has {len(ids)} ids but rows have {matrix.shape[1]} values")
        _check_unique(ids, path)
    if np.isnan(matrix).any():
        raise DataError(f"{path}: NaN entry in the matrix")
    return _check_square(matrix, path).astype(np.float32), ids


def _read_edge_table(path: Path) -> "pd.DataFrame":
    import pandas as pd

    with open(path, encoding="utf-8", errors="replace") as fh:
        first = [f.strip() for f in fh.readline().split(",")]
    # DCRNN's distances_bay_2017.csv has no header: numeric rows are read as from, to[, cost]
    headerless = all(_is_number(f) for f in first) and len(first) in (2, 3)
    names = ["from", "to", "cost"][: len(first)] if headerless else None
    try:
        table = pd.read_csv(path, dtype=str, skipinitialspace=True, header=None if headerless else "infer", names=names)
    except Exception as err:
        raise DataError(f"{path}: not a readable CSV ({_first_line(err)})") from None
    table.columns = [str(c).strip().lower() for c in table.columns]
    return table


def _edge_columns(table: "pd.DataFrame", source, need_cost: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(from ids [E] str, to ids [E] str, cost [E] float64) from a from/to/cost(/distance) table."""
    columns = [str(c).strip().lower() for c in table.columns]
    if "from" not in columns or "to" not in columns:
        raise DataError(f"{source}: needs columns 'from' and 'to' (got {list(table.columns)[:5]})")
    table = table.set_axis(columns, axis=1)
    cost_column = next((c for c in ("cost", "distance", "weight") if c in columns), None)
    if table[["from", "to"]].isna().any().any():
        raise DataError(f"{source}: empty 'from' or 'to' entry")
    frm = np.array([id_text(s) for s in table["from"]], dtype=object)
    to = np.array([id_text(s) for s in table["to"]], dtype=object)
    if cost_column is None:
        if need_cost:
            raise DataError(f"{source}: needs a 'cost' (road distance) column")
        return frm, to, np.ones(len(frm))
    import pandas as pd

    cost = pd.to_numeric(table[cost_column], errors="coerce").to_numpy(dtype=np.float64)
    bad = np.flatnonzero(~np.isfinite(cost))
    if bad.size:
        raise DataError(f"{source}: non-numeric {cost_column} {table[cost_column].iloc[bad[0]]!r} in data row {bad[0] + 1}")
    negative = np.flatnonzero(cost < 0)
    if negative.size:
        raise DataError(f"{source}: negative {cost_column} {cost[negative[0]]} in data row {negative[0] + 1}")
    return frm, to, cost


def _drop_repeated_edges(rows: np.ndarray, cols: np.ndarray, cost: np.ndarray, ids: list[str], source):
    """Refuse an edge listed twice with different costs; drop exact repeats with a warning.

    The published PEMS08.csv repeats 18 rows verbatim, so identical repeats
    are tolerated; two different costs for one edge are ambiguous and refused.
    """
    keys = rows.astype(np.int64) * len(ids) + cols
    order = np.lexsort((cost, keys))
    keys, cost_sorted = keys[order], cost[order]
    same_edge = keys[1:] == keys[:-1]
    conflict = same_edge & (cost_sorted[1:] != cost_sorted[:-1])
    if conflict.any():
        key = int(keys[1:][conflict][0])
        raise DataError(f"{source}: duplicate edge {ids[key // len(ids)]} -> {ids[key % len(ids)]} with different costs")
    if not same_edge.any():
        return rows, cols, cost
    warnings.warn(f"{source}: {int(same_edge.sum())} repeated edge row(s) ignored", stacklevel=3)
    first = np.concatenate([[True], ~same_edge])
    kept = np.sort(order[first])
    return rows[kept], cols[kept], cost[kept]


def _check_square(matrix: np.ndarray, source) -> np.ndarray:
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
        raise DataError(f"{source}: adjacency must be a square N x N matrix, got shape {tuple(matrix.shape)}")
    return matrix


def repeated(ids: Sequence[str]) -> list[str]:
    """The entries of ``ids`` that repeat an earlier one, in order (empty when all are unique)."""
    seen: set[str] = set()
    return [s for s in ids if s in seen or seen.add(s)]


def _check_unique(ids: Sequence[str], source) -> None:
    duplicates = repeated(ids)
    if duplicates:
        raise DataError(f"{source}: duplicate sensor id {duplicates[0]!r}")


def id_text(value) -> str:
    """Sensor ids are compared as text; ``717099``, ``'717099'``, ``b'717099'`` and ``717099.0`` agree."""
    if isinstance(value, bytes):
        value = value.decode("latin1")
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        value = int(value)
    text = str(value).strip()
    if text.endswith(".0") and text[:-2].lstrip("-").isdigit():
        text = text[:-2]
    return text


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__
