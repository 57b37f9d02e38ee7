"""How good and how fast is the package's node2vec on the METR-LA graph?

Measures, for the package's SE (default parameters, several seeds) and for the
SE published with GMAN (``SE_METR_node2vec.txt``):

- mean cosine similarity of 1-hop neighbours (pairs i != j with A[i, j] != 0),
- mean cosine similarity of random pairs (i != j, uniform),
- for the package's SE, wall-clock and CPU time on this machine.

Usage::

    python experiments/node2vec_quality.py [--shared-data ../shared/data] [--seeds 0 1 2] [--threads 2]
        [--method auto|dense|sampled] [--out FILE]

Writes experiments/results/node2vec_quality.json (``--method auto``, which is dense at 207 nodes).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def cosine_summary(vectors: np.ndarray, adjacency: np.ndarray, num_random_pairs: int = 50_000) -> dict:
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    cosine = unit @ unit.T
    n = len(adjacency)
    neighbours = (adjacency != 0) & ~np.eye(n, dtype=bool)
    rng = np.random.default_rng(0)
    i, j = rng.integers(0, n, num_random_pairs), rng.integers(0, n, num_random_pairs)
    keep = i != j
    neighbour_cos = float(cosine[neighbours].mean())
    random_cos = float(cosine[i[keep], j[keep]].mean())
    # how often a neighbour pair is more similar than a random pair (AUC of "is an edge" from cosine)
    pos = cosine[neighbours]
    neg = cosine[i[keep], j[keep]]
    auc = float((pos[:, None] > neg[None, :5000]).mean())
    return {"neighbour_cosine": neighbour_cos, "random_pair_cosine": random_cos,
            "gap": neighbour_cos - random_cos, "neighbour_vs_random_auc": auc}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared-data", type=Path, default=Path(os.environ.get("GMAN_SHARED_DATA", HERE.parent.parent / "shared" / "data")))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--method", choices=("auto", "dense", "sampled"), default="auto",
                        help="node2vec_embedding's method (auto = dense at METR-LA's 207 nodes)")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "node2vec_quality.json")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from gman.data.embedding import NODE2VEC_DEFAULTS, node2vec_embedding, read_word2vec
    from gman.data.graph import graph_stats, load_adjacency

    graphs = args.shared_data / "graphs" / "metr-la"
    adjacency, _ = load_adjacency(graphs / "adj_mx.pkl")
    published = read_word2vec(graphs / "SE_METR_node2vec.txt", num_nodes=len(adjacency))

    runs = []
    for seed in args.seeds:
        wall, cpu = time.perf_counter(), time.process_time()
        vectors = node2vec_embedding(adjacency, seed=seed, method=args.method, cache_dir=False, progress=False)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        runs.append({"seed": seed, "wall_s": round(wall, 2), "cpu_s": round(cpu, 2), **cosine_summary(vectors, adjacency)})
        print(f"seed {seed}: {runs[-1]}")

    result = {
        "graph": "METR-LA adj_mx.pkl",
        "graph_stats": graph_stats(adjacency).as_dict(),
        "parameters": {**NODE2VEC_DEFAULTS, "weighted": True, "steps": 500, "num_negatives": 5, "method": args.method},
        "machine": {"cpu_count": os.cpu_count(), "torch_threads": args.threads, "platform": platform.platform(),
                    "load_average_at_end": os.getloadavg()},
        "published_SE_METR_node2vec": cosine_summary(published, adjacency),
        "package_node2vec": runs,
        "package_node2vec_mean": {
            key: float(np.mean([r[key] for r in runs]))
            for key in ("wall_s", "cpu_s", "neighbour_cosine", "random_pair_cosine", "gap", "neighbour_vs_random_auc")
        },
        "package_node2vec_seed_std": {
            key: float(np.std([r[key] for r in runs]))
            for key in ("neighbour_cosine", "random_pair_cosine", "gap")
        },
    }
    print("published:", result["published_SE_METR_node2vec"])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
