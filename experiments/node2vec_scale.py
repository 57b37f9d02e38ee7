"""How node2vec's two training methods scale with the number of nodes, and what they embed.

Road-like graphs: a side x side grid, each node joined to its 4 neighbours (so
the co-occurrence counts stay local, as on a road network, unlike a random
graph whose walks reach every node). For each size and method
(``gman.data.embedding.node2vec_embedding``, default parameters otherwise):
wall time, peak RSS of the process so far, and the quality summary of
``node2vec_quality.py`` (mean cosine similarity of grid neighbours vs random
pairs, and the AUC of "is a neighbour" from the cosine).

    python experiments/node2vec_scale.py --sides 45 90 --methods dense sampled --threads 2

``--skip SIDE:METHOD`` leaves a combination out (dense at 90 x 90 takes many minutes).
Writes experiments/results/node2vec_scale.json (one record per run, printed as it comes).
"""
from __future__ import annotations

import argparse
import json
import platform
import resource
import time
from pathlib import Path

import numpy as np

from node2vec_quality import cosine_summary

HERE = Path(__file__).resolve().parent


def grid_graph(side: int) -> np.ndarray:
    """[side², side²] float32 adjacency of a 4-neighbour grid (symmetric, no self-loops)."""
    n = side * side
    adjacency = np.zeros((n, n), dtype=np.float32)
    index = np.arange(n).reshape(side, side)
    for a, b in ((index[:, :-1], index[:, 1:]), (index[:-1, :], index[1:, :])):
        adjacency[a.ravel(), b.ravel()] = adjacency[b.ravel(), a.ravel()] = 1.0
    return adjacency


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sides", type=int, nargs="+", default=[45, 90])
    parser.add_argument("--methods", nargs="+", default=["dense", "sampled"], choices=["dense", "sampled"])
    parser.add_argument("--skip", nargs="*", default=[], metavar="SIDE:METHOD")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "node2vec_scale.json")
    args = parser.parse_args()
    if any(side < 2 for side in args.sides):
        parser.error("--sides must be at least 2")

    import torch

    torch.set_num_threads(args.threads)
    from gman.data.embedding import node2vec_embedding

    records = []
    for side in args.sides:
        adjacency = grid_graph(side)
        for method in args.methods:
            if f"{side}:{method}" in args.skip:
                continue
            start = time.perf_counter()
            vectors = node2vec_embedding(adjacency, seed=args.seed, cache_dir=False, progress=False, method=method)
            seconds = time.perf_counter() - start
            record = {"nodes": side * side, "grid_side": side, "method": method, "seconds": round(seconds, 1),
                      "peak_rss_mib_so_far": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024,
                      **{k: round(v, 4) for k, v in cosine_summary(vectors, adjacency).items()}}
            print(json.dumps(record), flush=True)
            records.append(record)
    result = {"machine": platform.processor() or platform.machine(), "threads": args.threads, "seed": args.seed,
              "torch": torch.__version__, "records": records}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
