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
from pathlib import Path

import numpy as np

from gman.errors import DataError


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
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
