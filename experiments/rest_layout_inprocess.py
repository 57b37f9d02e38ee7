"""MLflow's POST /invocations handler in process: tidy vs wide answers (``params.layout``).

The serving benchmark's METR-LA-sized package (N = 207, P = Q = 12, L = 3, random weights),
ONNX Runtime with one thread; the two layouts alternate call by call so that machine load
hits both alike. Prints p50 / p90 over ``--calls`` calls each (after 10 warm-up calls) and the
answer sizes.

    python experiments/rest_layout_inprocess.py [--calls 50]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

LAYOUTS = ("tidy", "wide")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=50)
    args = parser.parse_args(argv)
    os.environ.setdefault("GMAN_THREADS", "1")

    import mlflow.pyfunc
    from mlflow.pyfunc import scoring_server

    import serving_benchmark
    from gman.serving.pyfunc import save_model

    with tempfile.TemporaryDirectory(prefix="gman-rest-layout-") as tmp:
        package, _ = serving_benchmark.build_package(Path(tmp))
        model = mlflow.pyfunc.load_model(str(save_model(package, Path(tmp) / "mlflow-model")))
        schema = model.metadata.get_input_schema()
        ids = json.loads((package / "gman.json").read_text())["sensor_ids"]
        bodies = {layout: serving_benchmark.payload_bytes(ids, layout).decode() for layout in LAYOUTS}
        times: dict[str, list[float]] = {layout: [] for layout in LAYOUTS}
        sizes: dict[str, int] = {}
        for _ in range(10 + args.calls):
            for layout in LAYOUTS:
                start = time.perf_counter()
                answer = scoring_server.invocations(bodies[layout], "application/json", model, schema)
                times[layout].append((time.perf_counter() - start) * 1e3)
                if answer.status != 200:
                    raise RuntimeError(f"{layout}: HTTP {answer.status}: {answer.response[:300]}")
                sizes[layout] = len(answer.response)
    for layout in LAYOUTS:
        kept = sorted(times[layout][10:])
        print(f"{layout}: p50 {kept[len(kept) // 2]:.1f} ms, p90 {kept[int(len(kept) * 0.9)]:.1f} ms, "
              f"answer {sizes[layout]:,} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
