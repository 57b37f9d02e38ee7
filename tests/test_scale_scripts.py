"""The scale benchmark, the GPU-epoch, the steady-state memory and the group-accuracy scripts: argument
handling, skipping, slopes, CPU smoke runs."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
import gpu_epoch  # noqa: E402
import group_accuracy  # noqa: E402
import memory_steady_state  # noqa: E402
import node2vec_scale  # noqa: E402
import scale_benchmark  # noqa: E402


def ring_graph(tmp_path: Path, n: int) -> Path:
    """An n-sensor ring as a dense CSV graph: stands in for METR-LA's in the CPU smoke runs."""
    adj = np.eye(n, dtype=np.float32) + np.roll(np.eye(n, dtype=np.float32), 1, axis=1) * 0.5
    graph = tmp_path / "ring.csv"
    np.savetxt(graph, adj, delimiter=",", fmt="%.3f")
    return graph


@pytest.mark.parametrize(
    "argv",
    [
        ["--nodes", "100", "200", "--batch", "1", "2", "3"],
        ["--nodes", "0"],
        ["--groups", "0"],
        ["--dense-max-gib", "0"],
        ["--modes", "sparse"],
    ],
)
def test_scale_benchmark_refuses_bad_arguments(argv, capsys):
    with pytest.raises(SystemExit) as info:
        scale_benchmark.parse_args(argv)
    assert info.value.code == 2


def test_scale_benchmark_skips_dense_configurations_that_cannot_fit(monkeypatch, tmp_path):
    calls = []

    def fake_run(args, mode, nodes, batch):  # cost N^2 for dense, N^(4/3) for group, per window
        calls.append((mode, nodes, batch))
        cost = batch * (nodes**2 if mode == "dense" else nodes ** (4 / 3)) * 1e-6
        return {"status": "ok", "spatial_attention": mode, "nodes": nodes, "batch": batch,
                "train_step_s": cost, "infer_s": cost / 3, "flops_per_step": cost * 1e9, "peak_mem_mb": 500.0}

    monkeypatch.setattr(scale_benchmark, "run_configuration", fake_run)
    out = tmp_path / "scale.json"
    code = scale_benchmark.main(["--nodes", "883", "2000", "8600", "--batch", "4", "2", "1",
                                 "--json", str(out), "--plot", str(tmp_path / "scale.png")])
    assert code == 0
    assert ("dense", 8600, 1) not in calls and ("group", 8600, 1) in calls
    results = json.loads(out.read_text())
    skipped = [r for r in results["records"] if r["status"] == "skipped"]
    assert [(r["spatial_attention"], r["nodes"]) for r in skipped] == [("dense", 8600)]
    # K*B*P*N^2 float32 = 8*1*12*8600^2*4 bytes
    assert skipped[0]["dense_score_gib"] == pytest.approx(8 * 12 * 8600**2 * 4 / 2**30, abs=0.01)
    slope = results["slopes"]["group"]["train_s_per_window"]
    assert slope["fitted"] == pytest.approx(4 / 3, abs=1e-3) and slope["endpoints"] == pytest.approx(4 / 3, abs=1e-3)
    assert results["slopes"]["dense"]["flops_per_window"]["fitted"] == pytest.approx(2.0, abs=1e-3)
    assert (tmp_path / "scale.png").stat().st_size > 0


@pytest.mark.parametrize(
    "argv",
    [["--variants", "eager,jit"], ["--batch", "0"], ["--windows", "4", "--batch", "8"], ["--max-steps", "0"],
     ["--spatial-attention", "sparse"], ["--inductor", "combo_kernels"], ["--inductor", "combo_kernels=yes please"],
     ["--inductor", "=1"]],
)
def test_gpu_epoch_refuses_bad_arguments(argv):
    with pytest.raises(SystemExit) as info:
        gpu_epoch.parse_args(argv)
    assert info.value.code == 2


def test_gpu_epoch_sets_inductor_options_and_refuses_unknown_ones():
    import torch._inductor.config as inductor_config

    args = gpu_epoch.parse_args(["--inductor", "combo_kernels=True", "--inductor", "combo_kernels_autotune=3"])
    assert args.inductor == {"combo_kernels": True, "combo_kernels_autotune": 3}
    with inductor_config.patch(combo_kernels=False, combo_kernels_autotune=1):
        gpu_epoch.apply_inductor_settings(args.inductor)
        assert inductor_config.combo_kernels is True and inductor_config.combo_kernels_autotune == 3
        with pytest.raises(SystemExit, match="no_such_setting"):
            gpu_epoch.apply_inductor_settings({"no_such_setting": 1})


def test_gpu_epoch_runs_a_few_steps_on_the_cpu(tmp_path):
    n = 6
    graph = ring_graph(tmp_path, n)
    out = tmp_path / "epoch.json"
    code = gpu_epoch.main(["--graph", str(graph), "--device", "cpu", "--windows", "40", "--batch", "4",
                           "--layers", "1", "--heads", "2", "--head-dim", "4", "--history", "3", "--horizon", "2",
                           "--warmup", "1", "--max-steps", "2", "--matmul-size", "64", "--json", str(out)])
    assert code == 0
    result = json.loads(out.read_text())
    assert result["nodes"] == n and result["amp"] == "none" and result["device"] == "cpu"
    (eager,) = result["variants"]
    assert eager["variant"] == "eager" and eager["steps"] == 2 and eager["windows_trained"] == 8
    assert eager["flops_per_step"] > 0 and eager["mfu"] > 0 and np.isfinite(eager["mean_train_mae"])


def test_scale_benchmark_merges_a_measured_record_over_a_skipped_one():
    ok = {"status": "ok", "spatial_attention": "dense", "nodes": 8600, "batch": 1, "train_step_s": 100.0,
          "infer_s": 30.0, "flops_per_step": 1e12, "peak_mem_mb": 2000.0}
    small = {**ok, "nodes": 883, "batch": 4, "train_step_s": 4 * 100.0 / (8600 / 883) ** 2, "flops_per_step": None}
    first = {"slope_range": [883, 8600], "settings": {},
             "records": [small, {"status": "skipped", "spatial_attention": "dense", "nodes": 8600, "batch": 1}]}
    merged = scale_benchmark.merge([first, {"slope_range": [883, 8600], "records": [ok]}])
    assert [r["status"] for r in merged["records"]] == ["ok", "ok"]
    assert merged["slopes"]["dense"]["train_s_per_window"]["fitted"] == pytest.approx(2.0, abs=1e-6)


@pytest.mark.parametrize("argv", [["--steps", "0"], ["--nodes", "-3"], ["--threads", "0"]])
def test_memory_steady_state_refuses_bad_arguments(argv, capsys):
    with pytest.raises(SystemExit) as info:
        memory_steady_state.main(argv)
    assert info.value.code == 2
    assert f"--{argv[0][2:]} must be a positive integer" in capsys.readouterr().err


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallinfo2 is glibc's")
def test_memory_steady_state_reports_heap_and_rss_after_the_chosen_steps(capsys):
    assert memory_steady_state.main(["--nodes", "5", "--batch", "2", "--steps", "3", "--threads", "1"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("after step")]
    assert [line.split(":")[0] for line in lines] == ["after step   1", "after step   3"]
    for line in lines:
        footprint, in_use, rss = (float(part.split()[-2]) for part in line.split(":")[1].split(","))
        assert 0 < in_use <= footprint and rss > 0


def test_group_accuracy_trains_only_the_runs_it_was_not_given(tmp_path, monkeypatch):
    def fake_run(folder: Path, mae: float) -> Path:
        folder.mkdir(parents=True)
        rows = [f"GMAN,{step},{5 * step},{mae + step / 100},1.0,2.0" for step in (3, 6, 12)]
        (folder / "horizons.csv").write_text("model,step,minutes,mae,rmse,mape\n" + "\n".join(
            rows + [f"GMAN,all,,{mae},1.0,2.0", f"Last value,all,,9.0,9.0,9.0"]) + "\n")
        return folder

    trained = []
    monkeypatch.setattr(group_accuracy, "train", lambda variant, seed, *rest: (
        trained.append((variant, seed)) or fake_run(tmp_path / f"new-{variant}-{seed}", 4.0)))
    given = fake_run(tmp_path / "dense-1", 3.0)
    out = tmp_path / "table.csv"
    assert group_accuracy.main(["--variants", "dense", "group", "--seeds", "1", "--out", str(out),
                                "--existing", f"dense:1:{given}"]) == 0
    assert trained == [("group", 1)]  # dense seed 1 came from the finished run
    lines = out.read_text().splitlines()
    assert lines[0] == "variant,seed,step,minutes,mae,rmse,mape"
    assert "dense,1,all,,3.0,1.0,2.0" in lines and "group,1,all,,4.0,1.0,2.0" in lines
    assert not any("Last value" in line or "9.0" in line for line in lines)


def test_bf16_short_attention_diagnostic_runs_and_restores_the_layers(tmp_path, capsys):
    import bf16_short_attention

    import gman.model.layers as layers

    n = 6
    graph = ring_graph(tmp_path, n)
    before = layers.attention, layers.BatchNorm.fused_training
    assert bf16_short_attention.main(["--graph", str(graph), "--steps", "2", "--seeds", "0", "--threads", "1"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("seed 0")]
    assert len(lines) == 2 and "bf16 scores" in lines[0] and "float32 scores" in lines[1]
    assert (layers.attention, layers.BatchNorm.fused_training) == before
    with pytest.raises(SystemExit):
        bf16_short_attention.main(["--graph", str(tmp_path / "missing.pkl")])


def test_lightning_epoch_times_the_product_training_loop_on_the_cpu(tmp_path):
    import lightning_epoch

    n = 6
    graph = ring_graph(tmp_path, n)
    out = tmp_path / "lightning.json"
    assert lightning_epoch.main(["--graph", str(graph), "--device", "cpu", "--windows", "40", "--batch", "4",
                                 "--layers", "1", "--heads", "2", "--head-dim", "4", "--max-steps", "2",
                                 "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    (eager,) = result["variants"]
    assert eager["variant"] == "eager" and eager["steps"] == 2 and eager["epoch_s"] > 0
    assert eager["train_windows"] >= 40  # the 70 % training part holds at least --windows windows
    with pytest.raises(SystemExit):
        lightning_epoch.parse_args(["--variants", "turbo"])


def test_node2vec_scale_times_both_methods_on_a_grid(tmp_path, monkeypatch):
    grid = node2vec_scale.grid_graph(3)
    assert grid.sum() == 2 * 12 and np.array_equal(grid, grid.T)  # 12 undirected edges of a 3 x 3 grid
    out = tmp_path / "scale.json"
    monkeypatch.setattr(sys, "argv", ["node2vec_scale.py", "--sides", "3", "--skip", "3:dense", "--threads", "1",
                                      "--out", str(out)])
    node2vec_scale.main()
    (record,) = json.loads(out.read_text())["records"]
    assert (record["nodes"], record["method"]) == (9, "sampled") and record["seconds"] >= 0
    assert record["gap"] > 0 and 0.5 < record["neighbour_vs_random_auc"] <= 1
