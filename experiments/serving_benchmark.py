"""Serving speed: in-process predict latency, cold start, and REST load through `mlflow models serve`.

The model is METR-LA-sized: N = 207 sensors, P = Q = 12, L = 3, K = 8, d = 8,
D_se = 64, random weights (latency does not depend on the weight values). The
package carries ``model.onnx`` (``gman export --format onnx --into-package``),
so both backends are measured: ONNX Runtime (what ``Forecaster.load`` picks
when onnxruntime is installed) and PyTorch (``backend="torch"``: the network
with batch-norm folded).

    1. in-process, per backend and thread count (``--threads``, e.g. 1,2):
       ``Forecaster.predict`` on a 12-step history DataFrame, after a warm-up;
       p50 / p90 / p99 over ``--calls`` calls, process CPU time per call; also
       the backend's network call alone, for the breakdown.
    2. cold start, per backend: a fresh interpreter runs ``import gman``,
       ``Forecaster.load`` and one ``predict``; wall time from process spawn and
       the child's CPU time (``--cold-runs`` runs).
    3. REST: the package wrapped as an MLflow pyfunc model, served by
       ``mlflow models serve --env-manager local`` on 127.0.0.1; ``--clients``
       concurrent clients each send ``--requests`` POST /invocations (one
       keep-alive connection each) with the documented ``dataframe_split``
       payload; latency p50 / p99, requests per second, errors (non-200 or
       connection failures). The server runs the default backend (``--rest-backend``)
       with ``--server-threads`` intra-op threads per worker.

Targets (issue 5, 2-core machine): in-process p50 <= 20 ms, p99 <= 50 ms;
cold start <= 5 s; REST 8 x 1000 requests with 0 errors.

    python experiments/serving_benchmark.py                      # full run (minutes)
    python experiments/serving_benchmark.py --requests 50 --calls 100 --cold-runs 1   # quick check
    python experiments/serving_benchmark.py --skip-rest                         # in-process + cold start

Results: experiments/results/serving.json (``--output``). The machine's load
average before and after is recorded: numbers taken while other work runs are
not the machine's speed.
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUTPUT = REPO / "experiments" / "results" / "serving.json"
N, P, Q, LAYERS = 207, 12, 12, 3
SCALER_MEAN, SCALER_STD = 58.3, 13.1  # about METR-LA's observed speeds (mph)


def sensor_ids() -> list[str]:
    """METR-LA's sensor ids where the shared data is at hand, else made-up ones (only the count matters)."""
    path = Path(os.environ.get("GMAN_SHARED_DATA", REPO.parent / "shared" / "data")) / "graphs/metr-la/graph_sensor_ids.txt"
    if path.is_file():
        ids = [s for s in path.read_text().replace(",", " ").split() if s]
        if len(ids) == N:
            return ids
    return [f"{700000 + i}" for i in range(N)]


def build_package(folder: Path) -> tuple[Path, float]:
    """The package (with model.onnx) and the ONNX graph's max abs difference from the plain network."""
    import pandas as pd
    import torch

    from gman.model import GMAN, BatchNorm
    from gman.serving.cli import export_onnx
    from gman.serving.forecaster import Forecaster
    from gman.serving.package import ONNX_FILE, attach_onnx, save_package

    torch.manual_seed(0)
    model = GMAN(num_nodes=N, steps_per_day=288, se_dim=64, history_steps=P, horizon_steps=Q,
                 num_layers=LAYERS, num_heads=8, head_dim=8)
    model.set_spatial_embedding(torch.randn(N, 64))
    with torch.no_grad():  # trained-looking batch-norm statistics, so that folding them is exercised
        for module in model.modules():
            if isinstance(module, BatchNorm):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
    package = save_package(folder / "package", model.eval(), scaler_mean=SCALER_MEAN, scaler_std=SCALER_STD,
                           sensor_ids=sensor_ids(), interval=pd.Timedelta("5min"), missing_value=0.0,
                           dataset_name="metr-la-sized", units="mph")
    graph = folder / ONNX_FILE
    difference = export_onnx(Forecaster.load(package, backend="torch"), graph)
    attach_onnx(package, graph)
    return package, float(difference)


def make_history(ids: list[str], seed: int = 0):
    import pandas as pd

    rng = np.random.default_rng(seed)
    values = np.round(SCALER_MEAN + SCALER_STD * rng.standard_normal((P, len(ids))), 2)
    values[rng.random(values.shape) < 0.05] = np.nan
    index = pd.date_range("2012-06-04 07:00", periods=P, freq="5min")
    return pd.DataFrame(values, index=index, columns=ids)


def percentiles(seconds: list[float]) -> dict[str, float]:
    ms = np.asarray(seconds) * 1e3
    return {"p50_ms": round(float(np.percentile(ms, 50)), 3), "p90_ms": round(float(np.percentile(ms, 90)), 3),
            "p99_ms": round(float(np.percentile(ms, 99)), 3), "mean_ms": round(float(ms.mean()), 3),
            "max_ms": round(float(ms.max()), 3), "count": int(len(ms))}


# ----------------------------------------------------------------------------- 1. in-process


def in_process(package: Path, calls: int, threads: int, backend: str) -> dict:
    """Wall-clock percentiles of predict (and of the network alone), plus process CPU time per call.

    With one thread, CPU time per call is close to what the wall time would be
    on an idle machine even while other work shares the cores: a contention-
    robust estimate to put beside the wall-clock figures.
    """
    from gman.serving.forecaster import Forecaster

    forecaster = Forecaster.load(package, backend=backend, threads=threads)
    history = make_history(forecaster.sensor_ids)
    for _ in range(20):
        forecaster.predict(history)
    predict = []
    cpu_start = time.process_time()
    for _ in range(calls):
        start = time.perf_counter()
        forecaster.predict(history)
        predict.append(time.perf_counter() - start)
    cpu_per_call = (time.process_time() - cpu_start) / calls

    rng = np.random.default_rng(1)
    values = (SCALER_MEAN + SCALER_STD * rng.standard_normal((1, P, N))).astype(np.float32)
    clock = np.zeros((1, P + Q, 2), dtype=np.int64)
    clock[..., 1] = np.arange(84, 84 + P + Q)
    forward = []
    if forecaster.backend == "onnxruntime":
        def network():
            forecaster._session.run(None, {"values": values, "time": clock})
    else:
        import torch

        x, t = torch.from_numpy(values), torch.from_numpy(clock)

        def network():
            with torch.inference_mode():
                forecaster._net(x, t)
    cpu_start = time.process_time()
    for _ in range(calls):
        start = time.perf_counter()
        network()
        forward.append(time.perf_counter() - start)
    forward_cpu = (time.process_time() - cpu_start) / calls
    return {"backend": forecaster.backend, "threads": threads, "predict": percentiles(predict),
            "predict_process_cpu_ms_per_call": round(cpu_per_call * 1e3, 3),
            "network_only": percentiles(forward), "network_only_process_cpu_ms_per_call": round(forward_cpu * 1e3, 3)}


# ----------------------------------------------------------------------------- 2. cold start

_COLD_SCRIPT = """
import time
start = time.perf_counter()
import gman
import numpy as np
import pandas as pd
forecaster = gman.Forecaster.load({package!r})
loaded = time.perf_counter()
index = pd.date_range("2012-06-04 07:00", periods=forecaster.history_steps, freq=forecaster.interval)
history = pd.DataFrame(np.full((len(index), len(forecaster.sensor_ids)), 60.0), index=index, columns=forecaster.sensor_ids)
forecaster.predict(history)
done = time.perf_counter()
print(loaded - start, done - start)
"""


def cold_start(package: Path, runs: int, backend: str) -> dict:
    import resource

    env = dict(os.environ, GMAN_BACKEND=backend)
    results = []
    for _ in range(runs):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        out = subprocess.run([sys.executable, "-c", _COLD_SCRIPT.format(package=str(package))],
                             capture_output=True, text=True, check=True, env=env)
        wall = time.perf_counter() - start
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        to_load, to_first = (float(v) for v in out.stdout.split())
        results.append({"process_wall_s": round(wall, 3), "process_cpu_s": round(cpu, 3),
                        "import_and_load_s": round(to_load, 3), "import_load_first_predict_s": round(to_first, 3)})
    median = lambda key: round(float(np.median([r[key] for r in results])), 3)  # noqa: E731
    return {"backend": backend, "runs": results, "median_process_wall_s": median("process_wall_s"),
            "median_process_cpu_s": median("process_cpu_s"),
            "median_import_load_first_predict_s": median("import_load_first_predict_s")}


# ----------------------------------------------------------------------------- 3. REST


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def payload_bytes(ids: list[str], layout: str = "tidy") -> bytes:
    history = make_history(ids)
    rows = [[stamp.isoformat(), *(None if np.isnan(v) else float(v) for v in row)]
            for stamp, row in zip(history.index, history.to_numpy())]
    payload: dict = {"dataframe_split": {"columns": ["timestamp", *ids], "data": rows}}
    if layout != "tidy":
        payload["params"] = {"layout": layout}
    return json.dumps(payload).encode()


def rest_load(package: Path, workdir: Path, clients: int, requests_per_client: int, workers: int,
              server_threads: int, backend: str, layout: str = "tidy") -> dict:
    from gman.serving.cli import serve_command_line, serving_environment
    from gman.serving.pyfunc import save_model

    model_dir = save_model(package, workdir / "mlflow-model")
    port = _free_port()
    env = serving_environment()
    env["OMP_NUM_THREADS"] = str(server_threads)
    env["MKL_NUM_THREADS"] = str(server_threads)
    env["GMAN_THREADS"] = str(server_threads)
    env["GMAN_BACKEND"] = backend
    log = open(workdir / "server.log", "wb")
    started = time.perf_counter()
    server = subprocess.Popen(serve_command_line(str(model_dir), host="127.0.0.1", port=port, workers=workers),
                              env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_ready(server, port, workdir / "server.log")
        ready_s = time.perf_counter() - started
        body = payload_bytes(json.loads((package / "gman.json").read_text())["sensor_ids"], layout)
        for _ in range(20):  # warm-up (every worker)
            status, answer = _post(_connection(port), body)
            if status != 200:
                raise RuntimeError(f"warm-up request failed with HTTP {status}; see {workdir / 'server.log'}")

        latencies: list[list[float]] = [[] for _ in range(clients)]
        errors = [0] * clients
        barrier = threading.Barrier(clients + 1)

        def client(k: int) -> None:
            connection = _connection(port)
            barrier.wait()
            for _ in range(requests_per_client):
                start = time.perf_counter()
                try:
                    status, _ = _post(connection, body)
                except (OSError, http.client.HTTPException):
                    status = -1
                    connection.close()
                    connection = _connection(port)
                latencies[k].append(time.perf_counter() - start)
                if status != 200:
                    errors[k] += 1
            connection.close()

        threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
        for thread in threads:
            thread.start()
        barrier.wait()
        start = time.perf_counter()
        for thread in threads:
            thread.join()
        wall = time.perf_counter() - start
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=30)
        log.close()
    total = clients * requests_per_client
    return {"clients": clients, "requests_per_client": requests_per_client, "total_requests": total,
            "workers": workers, "backend": backend, "server_threads": server_threads, "layout": layout,
            "payload_bytes": len(body), "answer_bytes": len(answer),
            "server_ready_s": round(ready_s, 2), "errors": int(sum(errors)), "wall_s": round(wall, 3),
            "requests_per_s": round(total / wall, 2), "latency": percentiles([t for lat in latencies for t in lat])}


def _connection(port: int) -> http.client.HTTPConnection:
    return http.client.HTTPConnection("127.0.0.1", port, timeout=120)


def _post(connection: http.client.HTTPConnection, body: bytes) -> tuple[int, bytes]:
    connection.request("POST", "/invocations", body=body, headers={"Content-Type": "application/json"})
    response = connection.getresponse()
    return response.status, response.read()


def _wait_ready(server: subprocess.Popen, port: int, log: Path, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"server exited with {server.returncode}:\n{log.read_text()[-2000:]}")
        try:
            connection = _connection(port)
            connection.request("GET", "/ping")
            if connection.getresponse().status == 200:
                return
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"server not ready after {timeout} s; see {log}")


# ----------------------------------------------------------------------------- main


def environment() -> dict:
    import mlflow
    import onnxruntime
    import pandas as pd
    import torch

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = ""
    return {"cpu_count": os.cpu_count(), "processor": platform.processor() or platform.machine(),
            "python": platform.python_version(), "torch": torch.__version__, "pandas": pd.__version__,
            "mlflow": mlflow.__version__, "onnxruntime": onnxruntime.__version__, "git_commit": commit}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=500, help="in-process predict calls timed")
    parser.add_argument("--threads", default="1,2", help="intra-op thread counts in-process (comma-separated)")
    parser.add_argument("--backends", default="onnx,torch", help="backends measured in-process and at cold start")
    parser.add_argument("--cold-runs", type=int, default=3)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=1000, help="requests per client")
    parser.add_argument("--workers", type=int, default=1, help="uvicorn workers of the scoring server")
    parser.add_argument("--server-threads", type=int, default=1, help="intra-op threads per server worker")
    parser.add_argument("--rest-backend", default="auto", help="GMAN_BACKEND of the server (auto: ONNX Runtime)")
    parser.add_argument("--rest-layout", choices=["tidy", "wide"], default="tidy",
                        help="the answer's layout (the payload's params.layout)")
    parser.add_argument("--skip-rest", action="store_true")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    args = parser.parse_args(argv)
    # As gman.serving.forecaster does when it imports torch first: OpenMP threads sleep, not spin (here torch
    # is imported before any Forecaster, by build_package).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

    result: dict = {"model": {"N": N, "P": P, "Q": Q, "L": LAYERS, "K": 8, "d": 8, "se_dim": 64},
                    "load_average_before": list(os.getloadavg()),
                    "omp_wait_policy": os.environ["OMP_WAIT_POLICY"]}
    with tempfile.TemporaryDirectory(prefix="gman-serving-bench-") as tmp:
        package, onnx_difference = build_package(Path(tmp))
        result["onnx_export_max_abs_difference"] = onnx_difference
        backends = [b for b in args.backends.split(",") if b]
        result["in_process"] = {}
        for threads in (int(t) for t in args.threads.split(",")):
            for backend in backends:
                key = f"{backend}_{threads}_thread{'s' if threads > 1 else ''}"
                result["in_process"][key] = in_process(package, args.calls, threads, backend)
                print(f"in-process {key}:", json.dumps(result["in_process"][key]), flush=True)
        result["cold_start"] = {}
        for backend in backends:
            result["cold_start"][backend] = cold_start(package, args.cold_runs, backend)
            print(f"cold start {backend}:", json.dumps(result["cold_start"][backend]), flush=True)
        if not args.skip_rest:
            result["rest"] = rest_load(package, Path(tmp), args.clients, args.requests, args.workers, args.server_threads,
                                       args.rest_backend, args.rest_layout)
            print("REST:", json.dumps(result["rest"]), flush=True)
    result["load_average_after"] = list(os.getloadavg())
    result["environment"] = environment()
    result["command"] = " ".join([Path(sys.executable).name, *sys.argv])
    args.output.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = args.output.with_suffix(".json.tmp")
    tmp_out.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp_out, args.output)
    print(f"-> {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
