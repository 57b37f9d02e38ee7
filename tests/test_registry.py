"""Dataset cards, `gman data list/fetch/import/check`, downloads from a local HTTP server."""
from __future__ import annotations

import re

import hashlib
import os
import pickle
import shutil
import subprocess
import sys
import threading
import warnings
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from gman import cli
from gman.data import registry
from gman.errors import DataError

BUILT_IN = ["los-loop", "metr-la", "pems-bay", "pems03", "pems04", "pems07", "pems08", "pemsd7m"]


@pytest.fixture
def data_root(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "datasets"
    root.mkdir()
    monkeypatch.setenv("GMAN_DATASETS_DIR", str(root))
    return root


@pytest.fixture
def los_loop(data_root, shared_data) -> Path:
    folder = data_root / "los-loop"
    folder.mkdir()
    for name in ("los_speed.csv", "los_adj.csv"):
        shutil.copy(shared_data / "los-loop" / name, folder / name)
    return folder


def run_cli(*argv) -> int:
    return cli.main(["data", *argv])


# ----------------------------------------------------------------------------- cards

def test_built_in_cards_are_valid_and_follow_the_standard_splits(data_root):
    assert set(BUILT_IN) <= set(registry.card_names())
    for name in BUILT_IN:
        card = registry.load_card(name)
        assert card.data_dir == data_root / name
        expected = [0.6, 0.2, 0.2] if name in ("pems03", "pems04", "pems07", "pems08") else [0.7, 0.1, 0.2]
        assert card.raw["split"] == expected, name
        assert card.raw["interval"] == "5min" and card.raw.get("license")
        assert card.values["file"] in {f.name for f in card.files}
        assert card.graph["file"] in {f.name for f in card.files}
        if card.values["format"] == "npz" or name in ("los-loop", "pemsd7m"):
            assert card.raw["start_time"] is not None, name  # files without timestamps


def test_card_checksums_match_the_real_files(shared_data, data_root):
    sums = {}
    for line in (shared_data / "SHA256SUMS").read_text().splitlines():
        digest, path = line.split()
        sums[Path(path).name] = (digest, (shared_data / path).stat().st_size)
    checked = 0
    for name in BUILT_IN:
        for entry in registry.load_card(name).files:
            if entry.sha256 is None:
                assert entry.size is None or entry.size > 0
                continue
            assert (entry.sha256, entry.size) == sums[entry.name], entry.name
            checked += 1
    assert checked >= 17


def test_unknown_name_lists_the_known_ones(data_root):
    with pytest.raises(DataError, match=r"nope: unknown dataset \(known: los-loop, metr-la"):
        registry.card_reader_options("nope")


def test_missing_data_files_say_how_to_get_them(data_root):
    with pytest.raises(DataError, match="gman data fetch pems04") as caught:
        registry.card_reader_options("pems04")
    assert str(data_root / "pems04" / "PEMS04.npz") in str(caught.value)


def test_los_loop_card_loads_through_the_readers(los_loop, shared_data):
    from gman.data.readers import load_dataset

    options = registry.card_reader_options("los-loop")
    assert options["split"] == (0.7, 0.1, 0.2) and options["start_time"] == "2012-03-01 00:00:00"
    dataset = load_dataset("los-loop")
    assert (dataset.num_nodes, dataset.num_steps) == (207, 2016)
    assert dataset.index[0] == pd.Timestamp("2012-03-01") and dataset.index[0].day_name() == "Thursday"
    assert np.array_equal(dataset.adjacency, np.loadtxt(shared_data / "los-loop" / "los_adj.csv", delimiter=",").astype(np.float32))


def test_pems03_card_uses_the_id_map(data_root, shared_data):
    folder = data_root / "pems03"
    folder.mkdir()
    for name in ("PEMS03.csv", "PEMS03.txt"):
        shutil.copy(shared_data / "graphs" / "pems0x" / name, folder / name)
    np.savez(folder / "PEMS03.npz", data=np.random.default_rng(0).uniform(1, 100, (30, 358, 1)))
    from gman.data.readers import load_dataset

    dataset = load_dataset("pems03")
    assert dataset.sensor_ids == (folder / "PEMS03.txt").read_text().split()
    assert dataset.index[0] == pd.Timestamp("2018-09-01") and dataset.adjacency.sum() == 547


def test_bad_card_names_its_file(data_root):
    folder = data_root / "broken"
    folder.mkdir()
    (folder / "dataset.yaml").write_text("name: broken\nvalues: {file: v.csv}\nfiles: [{name: v.csv, sha256: abc}]\n")
    with pytest.raises(DataError, match="sha256 of 'v.csv' is not 64 hex digits") as caught:
        registry.load_card("broken")
    assert str(folder / "dataset.yaml") in str(caught.value)
    (folder / "dataset.yaml").write_text("name: broken\nvalues: {file: v.csv}\ncolour: red\n")
    with pytest.raises(DataError, match="unknown key 'colour'"):
        registry.load_card("broken")
    (folder / "dataset.yaml").write_text("name: broken\nvalues: {file: v.csv}\nsplit: [0.8, 0.2, 0]\n")
    with pytest.raises(DataError, match=r"split must be three positive fractions summing to 1, got \[0\.8, 0\.2, 0\]"):
        registry.load_card("broken")


# ----------------------------------------------------------------------------- list / check

def test_list_shows_cards_and_presence(los_loop, capsys):
    assert run_cli("list") == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line for line in out.splitlines() if line and not line.startswith(" ")}
    assert "ready" in rows["los-loop"] and "2/2" in rows["los-loop"]
    assert "missing metr-la.h5 (manual)" in rows["metr-la"]


def test_check_reports_the_data_and_graph(los_loop, capsys):
    assert run_cli("check", "los-loop") == 0
    out = capsys.readouterr().out
    assert "sensors: 207" in out and "steps: 2016 (2012-03-01 00:00:00 .. 2012-03-07 23:55:00), interval 5min" in out
    assert "missing: 0.00 %" in out and "sha256 verified" in out
    assert "207 nodes, 2626 edges (+207 self-loops), 1 isolated, 2 weakly connected component(s), symmetric" in out
    assert out.strip().endswith("los-loop: OK")


def test_check_finds_sensors_in_the_graph_but_not_the_data(data_root, capsys):
    folder = data_root / "mismatch"
    folder.mkdir()
    index = pd.date_range("2024-01-01", periods=24, freq="1h")
    pd.DataFrame({"timestamp": index, "a": 1.0, "b": 2.0}).to_csv(folder / "v.csv", index=False)
    (folder / "g.pkl").write_bytes(__import__("pickle").dumps([["a", "c"], {"a": 0, "c": 1}, np.eye(2, dtype=np.float32)], protocol=2))
    registry.write_card(folder, {"name": "mismatch", "interval": "1h", "values": {"file": "v.csv", "format": "csv"},
                                 "graph": {"file": "g.pkl", "format": "dcrnn-pickle"}, "files": [{"name": "v.csv"}, {"name": "g.pkl"}]})
    assert run_cli("check", "mismatch") == 1
    out = capsys.readouterr().out
    assert "graph: g.pkl: does not match the data" in out
    assert "sensor ids differ: 1 only in the data (e.g. ['b']), 1 only in the graph (e.g. ['c'])" in out


def test_check_the_built_in_pems03_card_matches_station_ids_through_its_id_map(data_root, shared_data, capsys):
    """PEMS03's npz has no ids: its nodes are named by PEMS03.txt, which the edge list is in."""
    folder = data_root / "pems03"
    folder.mkdir()
    for name in ("PEMS03.csv", "PEMS03.txt"):
        shutil.copy(shared_data / "graphs" / "pems0x" / name, folder / name)
    np.savez(folder / "PEMS03.npz", data=np.random.default_rng(0).uniform(1, 300, (40, 358, 1)))
    assert run_cli("check", "pems03") == 0
    out = capsys.readouterr().out
    assert "sensors: 358" in out and "graph: PEMS03.csv: 358 nodes" in out
    assert out.strip().endswith("pems03: OK")


def test_check_a_corrupted_file(los_loop, capsys):
    with open(los_loop / "los_adj.csv", "r+b") as fh:
        fh.seek(10)
        fh.write(b"9")
    assert run_cli("check", "los-loop") == 1
    assert "MISMATCH" in capsys.readouterr().out


# ----------------------------------------------------------------------------- fetch from a local server

class _Server:
    """Serves ``files`` (url path -> bytes) on 127.0.0.1 with Range support; can cut a response short."""

    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.cut_after: dict[str, int] = {}  # path -> bytes to send before dropping the connection (once)
        self.ranges: list[str | None] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                body = server.files.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                server.ranges.append(self.headers.get("Range"))
                start = 0
                if self.headers.get("Range"):
                    start = int(self.headers["Range"].removeprefix("bytes=").split("-")[0])
                    if start >= len(body):
                        self.send_response(416)
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(body) - start))
                self.end_headers()
                cut = server.cut_after.pop(self.path, None)
                self.wfile.write(body[start:] if cut is None else body[start:start + cut])
                if cut is not None:
                    self.close_connection = True

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    srv = _Server()
    yield srv
    srv.close()


def _toy_card(data_root: Path, server: _Server, body: bytes, sha256: str | None = "real") -> Path:
    folder = data_root / "toy"
    folder.mkdir(exist_ok=True)
    server.files["/files/los_adj.csv"] = body
    digest = hashlib.sha256(body).hexdigest() if sha256 == "real" else sha256
    registry.write_card(folder, {
        "name": "toy", "interval": "5min", "values": {"file": "values.csv", "format": "csv"},
        "files": [
            {"name": "los_adj.csv", "size": len(body), "sha256": digest, "urls": [f"{server.url}/files/los_adj.csv"]},
            {"name": "values.csv", "size": None, "sha256": None, "urls": [], "page": "https://example.org/values"},
        ],
    })
    return folder


def test_fetch_downloads_verifies_and_renames(data_root, server, shared_data, capsys):
    body = (shared_data / "los-loop" / "los_adj.csv").read_bytes()
    folder = _toy_card(data_root, server, body)
    assert run_cli("fetch", "toy", "--file", "los_adj.csv", "--no-progress") == 0
    assert (folder / "los_adj.csv").read_bytes() == body
    assert not (folder / "los_adj.csv.part").exists()
    assert "los_adj.csv: downloaded" in capsys.readouterr().out
    # a second fetch finds it present and does not download again
    assert run_cli("fetch", "toy", "--file", "los_adj.csv", "--no-progress") == 0
    assert len(server.ranges) == 1


def test_interrupted_download_resumes_with_a_range_request(data_root, server, shared_data, capsys):
    body = (shared_data / "los-loop" / "los_adj.csv").read_bytes()
    folder = _toy_card(data_root, server, body)
    server.cut_after["/files/los_adj.csv"] = 40_000
    assert run_cli("fetch", "toy", "--file", "los_adj.csv", "--no-progress") == 2
    err = capsys.readouterr().err
    assert "interrupted after 40000" in err and "run the fetch again to resume" in err
    assert (folder / "los_adj.csv.part").stat().st_size == 40_000
    assert not (folder / "los_adj.csv").exists()

    assert run_cli("fetch", "toy", "--file", "los_adj.csv", "--no-progress") == 0
    assert server.ranges == [None, "bytes=40000-"]
    assert (folder / "los_adj.csv").read_bytes() == body
    assert not (folder / "los_adj.csv.part").exists()


def test_checksum_mismatch_deletes_the_partial_file(data_root, server, capsys):
    body = b"0,1\n1,0\n"
    folder = _toy_card(data_root, server, body, sha256="0" * 64)
    assert run_cli("fetch", "toy", "--file", "los_adj.csv", "--no-progress") == 2
    err = capsys.readouterr().err
    assert "checksum mismatch" in err and "deleted the partial file" in err and str(folder / "los_adj.csv") in err
    assert list(folder.iterdir()) == [folder / "dataset.yaml"]


def test_fetch_of_a_file_without_url_points_at_its_page(data_root, server, capsys):
    _toy_card(data_root, server, b"x")
    assert run_cli("fetch", "toy", "--no-progress") == 2
    assert "no direct download for values.csv; get it from https://example.org/values" in capsys.readouterr().err


def test_a_failed_first_fetch_leaves_no_empty_folder_and_timeouts_are_checked(data_root, monkeypatch, capsys):
    def unreachable(entry, target, **kwargs):
        raise DataError(f"{target}: cannot reach the server")

    monkeypatch.setattr(registry, "download", unreachable)
    assert run_cli("fetch", "los-loop", "--no-progress") == 2
    assert "cannot reach the server" in capsys.readouterr().err
    assert not (data_root / "los-loop").exists()
    for bad in ("0", "-1"):
        assert run_cli("fetch", "los-loop", "--timeout", bad) == 2
        assert "timeout: expected a number of seconds > 0" in capsys.readouterr().err


def test_fetch_unknown_dataset_fails(data_root, capsys):
    assert run_cli("fetch", "nope") == 2
    assert "unknown dataset" in capsys.readouterr().err


# ----------------------------------------------------------------------------- import

def test_import_wide_csv_with_a_distance_graph(data_root, tmp_path, shared_data, capsys):
    speeds = pd.read_csv(shared_data / "los-loop" / "los_speed.csv", nrows=288)
    ids = list(speeds.columns[:5])
    speeds = speeds[ids]
    speeds.iloc[3, 1] = 0.0  # a missing reading
    speeds.insert(0, "timestamp", pd.date_range("2024-05-01", periods=288, freq="5min"))
    speeds.to_csv(tmp_path / "mine.csv", index=False)
    pd.DataFrame({"from": [ids[0], ids[1], ids[2], ids[0]], "to": [ids[1], ids[2], ids[3], ids[0]], "cost": [100.0, 250.0, 900.0, 0.0]}
                 ).to_csv(tmp_path / "distances.csv", index=False)

    command = ["import", "mine", "--values", str(tmp_path / "mine.csv"), "--graph", str(tmp_path / "distances.csv"),
               "--graph-format", "distance-csv", "--units", "mph"]
    # a sensor in no row of the distances is unknown to the graph: an error that says how to keep it
    assert run_cli(*command) == 2
    assert re.search(rf"1 only in the data \(e\.g\. \['{ids[4]}'\]\).*list sensors without edges in graph_sensor_ids",
                     capsys.readouterr().err)
    assert not any(data_root.iterdir())  # nothing half-written
    (tmp_path / "nodes.txt").write_text("\n".join(ids) + "\n")
    assert run_cli(*command, "--graph-sensor-ids", str(tmp_path / "nodes.txt")) == 0
    folder = data_root / "mine"
    card = yaml.safe_load((folder / "dataset.yaml").read_text())
    assert card["interval"] == "5min" and card["missing_value"] == 0.0 and card["split"] == [0.7, 0.1, 0.2]
    for entry in card["files"]:
        assert registry.sha256_of(folder / entry["name"]) == entry["sha256"]
    assert sorted(p.name for p in data_root.iterdir()) == ["mine"]  # no staging folder left

    from gman.data.readers import load_dataset

    dataset = load_dataset("mine")
    assert dataset.sensor_ids == ids and dataset.num_steps == 288
    assert not dataset.mask[3, 1] and dataset.mask.sum() == 288 * 5 - 1
    assert dataset.adjacency[0, 1] > dataset.adjacency[1, 2] > 0 and dataset.adjacency[4, 4] == 1
    capsys.readouterr()
    assert run_cli("check", "mine") == 0
    assert "sensors: 5" in capsys.readouterr().out


def test_import_npz_with_feature_and_start_time(data_root, tmp_path, shared_data):
    data = np.random.default_rng(0).uniform(1, 80, (50, 307, 3))
    np.savez(tmp_path / "PEMS04.npz", data=data)
    assert run_cli("import", "p4", "--values", str(tmp_path / "PEMS04.npz"), "--feature", "speed",
                   "--start-time", "2018-01-01", "--interval", "5min",
                   "--graph", str(shared_data / "graphs" / "pems0x" / "PEMS04.csv"), "--split", "0.6", "0.2", "0.2") == 0
    from gman.data.readers import load_dataset

    dataset = load_dataset("p4")
    assert np.allclose(dataset.values, data[:, :, 2]) and dataset.index[0] == pd.Timestamp("2018-01-01")
    assert dataset.adjacency.sum() == 340


def test_failed_import_writes_nothing(data_root, tmp_path, capsys):
    pd.DataFrame({"timestamp": pd.date_range("2024-01-01", periods=4, freq="1h"), "a": 1.0, "b": 2.0}).to_csv(tmp_path / "v.csv", index=False)
    (tmp_path / "g.csv").write_text("a,zz\n1,0\n0,1\n")  # graph sensor 'zz' is not in the data
    assert run_cli("import", "bad", "--values", str(tmp_path / "v.csv"), "--graph", str(tmp_path / "g.csv")) == 2
    assert "sensor ids differ" in capsys.readouterr().err
    assert list(data_root.iterdir()) == []


def test_import_drops_unmatched_sensors_and_fills_gaps_when_asked(data_root, tmp_path, capsys):
    stamps = pd.date_range("2024-01-01", periods=6, freq="1h").delete(2)  # 02:00 absent
    pd.DataFrame({"timestamp": stamps, "a": 1.0, "b": 2.0, "c": 3.0}).to_csv(tmp_path / "v.csv", index=False)
    (tmp_path / "g.csv").write_text("zz,b,a\n1,0,0\n0,1,0.5\n0,0.5,1\n")  # no 'c' in the graph, no data for 'zz'
    argv = ["import", "mine", "--values", str(tmp_path / "v.csv"), "--graph", str(tmp_path / "g.csv")]
    with pytest.warns(UserWarning, match="kept the 2 sensors in both"):
        assert run_cli(*argv, "--unmatched-sensors", "drop") == 2
    assert "fill_gaps" in capsys.readouterr().err  # the hour missing from the file: the option is named
    with pytest.warns(UserWarning, match="kept the 2 sensors in both"):
        assert run_cli(*argv, "--unmatched-sensors", "drop", "--fill-gaps") == 0
    from gman.data.readers import load_dataset

    with pytest.warns(UserWarning, match=r"1 only in the graph \(e\.g\. \['zz'\]\)"):  # the card drops it again
        dataset = load_dataset("mine")
    assert dataset.sensor_ids == ["a", "b"] and dataset.num_steps == 6
    assert not dataset.mask[2].any() and dataset.mask.sum() == 10
    np.testing.assert_array_equal(dataset.adjacency, [[1, 0.5], [0.5, 1]])

    # the console script prints gman's warnings as one line each, like its errors
    done = subprocess.run([sys.executable, "-m", "gman.cli", "data", *argv, "--force", "--unmatched-sensors", "drop", "--fill-gaps"],
                          capture_output=True, text=True, timeout=120, env=dict(os.environ))
    assert done.returncode == 0, done.stderr
    warned = [line for line in done.stderr.splitlines() if "warning" in line.lower()]
    assert len(warned) == 1 and warned[0].startswith("gman: warning: ") and "kept the 2 sensors in both" in warned[0]


def test_import_reads_local_timestamps_across_daylight_saving_time_with_a_timezone(data_root, tmp_path, capsys):
    index = pd.date_range("2024-11-02", periods=600, freq="5min", tz="America/Chicago", name="timestamp")
    pd.DataFrame({"a": 1.0, "b": 2.0}, index=index).to_csv(tmp_path / "v.csv")  # -05:00, then -06:00
    assert run_cli("import", "local", "--values", str(tmp_path / "v.csv")) == 2
    assert "different UTC offsets" in capsys.readouterr().err
    assert run_cli("import", "local", "--values", str(tmp_path / "v.csv"), "--timezone", "America/Chicago") == 0
    from gman.data.readers import load_dataset

    dataset = load_dataset("local")
    assert str(dataset.index.tz) == "America/Chicago" and dataset.index.equals(index) and dataset.mask.all()
    capsys.readouterr()
    assert run_cli("check", "local") == 0
    assert "time zone: America/Chicago" in capsys.readouterr().out


def test_import_a_csv_without_a_header_row_and_a_bad_missing_value(data_root, tmp_path, capsys):
    rows = np.random.default_rng(2).uniform(20, 70, (30, 3)).round(3)
    np.savetxt(tmp_path / "V.csv", rows, delimiter=",", fmt="%.3f")
    (tmp_path / "ids.txt").write_text("s1\ns2\ns3\n")
    base = ["import", "v", "--values", str(tmp_path / "V.csv"), "--start-time", "2024-01-01", "--interval", "5min"]
    assert run_cli(*base) == 2
    assert re.search(r"V\.csv: the first row \(.*\) holds readings, not column names; .*--no-header", capsys.readouterr().err)
    assert run_cli(*base, "--no-header", "--sensor-ids", str(tmp_path / "ids.txt"), "--missing-value", "abc") == 2
    assert "--missing-value: 'abc' is not a number or 'none'" in capsys.readouterr().err
    assert not any(data_root.iterdir())
    assert run_cli(*base, "--no-header", "--sensor-ids", str(tmp_path / "ids.txt")) == 0
    from gman.data.readers import load_dataset

    dataset = load_dataset("v")
    assert dataset.sensor_ids == ["s1", "s2", "s3"] and dataset.num_steps == 30
    np.testing.assert_allclose(dataset.values, rows, rtol=1e-6)


def _speeds(num_steps: int, ids) -> pd.DataFrame:
    index = pd.date_range("2024-05-01", periods=num_steps, freq="5min", name="timestamp")
    values = np.random.default_rng(3).uniform(30, 70, (num_steps, len(ids))).round(2)
    return pd.DataFrame(values, index=index, columns=list(ids))


def test_import_records_the_missing_value_that_training_and_the_package_use(data_root, tmp_path):
    from gman.data.datamodule import GMANDataModule
    from gman.serving.package import package_metadata
    from gman.training.module import GMANLightningModule

    frame = _speeds(200, ["a", "b", "c"])
    frame.iloc[[4, 50], 1] = 0.0  # METR-LA's convention: 0 = no reading
    frame.to_hdf(tmp_path / "speeds.h5", key="df")
    assert run_cli("import", "zeros", "--values", str(tmp_path / "speeds.h5")) == 0
    assert yaml.safe_load((data_root / "zeros" / "dataset.yaml").read_text())["missing_value"] == 0.0
    datamodule = GMANDataModule(dataset="zeros", history_steps=2, horizon_steps=2)
    datamodule.setup()
    assert datamodule.missing_value == 0.0
    assert not datamodule.dataset.mask[[4, 50], 1].any() and datamodule.dataset.mask.sum() == 598
    model = GMANLightningModule(num_layers=1, num_heads=2, head_dim=4, se_dim=8)
    model.build_for(datamodule)
    # a live history with a 0 reading is then masked as in training, not read as 0 mph
    assert package_metadata(model.net, **model.package_fields(datamodule))["missing_value"] == 0.0

    assert run_cli("import", "nan-only", "--values", str(tmp_path / "speeds.h5"), "--missing-value", "none") == 0
    datamodule = GMANDataModule(dataset="nan-only", history_steps=2, horizon_steps=2)
    datamodule.setup()
    assert datamodule.missing_value is None and datamodule.dataset.mask.all()


def test_import_keeps_the_graph_node_order_for_a_spatial_embedding_file(data_root, tmp_path):
    from gman.data.datamodule import GMANDataModule
    from gman.data.embedding import write_word2vec

    (tmp_path / "g.csv").write_text("a,b,c,d\n1,0.5,0,0\n0,1,0.5,0\n0,0,1,0.25\n0.75,0,0,1\n")
    embedding = str(tmp_path / "se.txt")
    write_word2vec(embedding, np.array([[1.0], [2.0], [3.0], [4.0]], dtype=np.float32))  # rows a, b, c, d

    def imported_and_source(name, columns, *drop):
        _speeds(100, columns).to_csv(tmp_path / f"{name}.csv")
        assert run_cli("import", name, "--values", str(tmp_path / f"{name}.csv"), "--graph", str(tmp_path / "g.csv"), *drop) == 0
        source = GMANDataModule(dataset=str(tmp_path / f"{name}.csv"), graph_path=str(tmp_path / "g.csv"),
                                options={"unmatched_sensors": "drop"} if drop else None, spatial_embedding=embedding,
                                history_steps=2, horizon_steps=2)
        imported = GMANDataModule(dataset=name, spatial_embedding=embedding, history_steps=2, horizon_steps=2)
        source.setup()
        imported.setup()
        assert imported.sensor_ids == source.sensor_ids
        np.testing.assert_array_equal(imported.dataset.adjacency, source.dataset.adjacency)
        np.testing.assert_array_equal(imported.spatial_embedding, source.spatial_embedding)
        return imported

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        permuted = imported_and_source("permuted", ["c", "a", "d", "b"])
    assert permuted.spatial_embedding[:, 0].tolist() == [3.0, 1.0, 4.0, 2.0]
    # b, a graph node without data, keeps its embedding row; z, data without a graph node, is dropped
    with pytest.warns(UserWarning, match="kept the 3 sensors in both"):
        dropped = imported_and_source("dropped", ["c", "z", "a", "d"], "--unmatched-sensors", "drop")
    assert dropped.sensor_ids == ["c", "a", "d"] and dropped.spatial_embedding[:, 0].tolist() == [3.0, 1.0, 4.0]


def test_import_of_permuted_metr_la_columns_maps_the_published_embedding_by_id(data_root, tmp_path, shared_data):
    from gman.data.datamodule import GMANDataModule

    graph = shared_data / "graphs" / "metr-la" / "adj_mx.pkl"
    embedding = shared_data / "graphs" / "metr-la" / "SE_METR_node2vec.txt"
    ids = (shared_data / "graphs" / "metr-la" / "graph_sensor_ids.txt").read_text().strip().split(",")
    permuted = [ids[i] for i in np.random.default_rng(0).permutation(len(ids))]
    _speeds(60, permuted).to_hdf(tmp_path / "metr-la.h5", key="df")
    assert run_cli("import", "shuffled", "--values", str(tmp_path / "metr-la.h5"), "--graph", str(graph)) == 0
    source = GMANDataModule(dataset=str(tmp_path / "metr-la.h5"), graph_path=str(graph), spatial_embedding=str(embedding),
                            history_steps=2, horizon_steps=2)
    imported = GMANDataModule(dataset="shuffled", spatial_embedding=str(embedding), history_steps=2, horizon_steps=2)
    source.setup()
    imported.setup()
    assert imported.sensor_ids == source.sensor_ids == permuted
    np.testing.assert_array_equal(imported.spatial_embedding, source.spatial_embedding)
    np.testing.assert_array_equal(imported.dataset.adjacency, source.dataset.adjacency)


def test_import_refuses_a_split_that_training_refuses(data_root, tmp_path, capsys):
    _speeds(100, ["a", "b"]).to_csv(tmp_path / "v.csv")
    assert run_cli("import", "mine", "--values", str(tmp_path / "v.csv"), "--split", "0.8", "0.2", "0") == 2
    assert re.fullmatch(r"gman: error: --split: fractions must be positive and sum to 1, got \[0\.8, 0\.2, 0\.0\]\n",
                        capsys.readouterr().err)
    assert not any(data_root.iterdir())


def test_a_graph_path_given_with_a_card_is_read_in_its_own_format(data_root, tmp_path):
    from gman.data.datamodule import GMANDataModule

    _speeds(100, ["a", "b", "c"]).to_csv(tmp_path / "v.csv")
    (tmp_path / "g.csv").write_text("a,b,c\n1,0,0\n0,1,0\n0,0,1\n")
    assert run_cli("import", "mine", "--values", str(tmp_path / "v.csv"), "--graph", str(tmp_path / "g.csv")) == 0
    matrix = np.array([[1, 0.5, 0], [0, 1, 0.25], [0, 0, 1]], dtype=np.float32)  # in the order c, a, b
    with open(tmp_path / "adj_mx.pkl", "wb") as handle:
        pickle.dump([["c", "a", "b"], {"c": 0, "a": 1, "b": 2}, matrix], handle, protocol=2)
    datamodule = GMANDataModule(dataset="mine", graph_path=str(tmp_path / "adj_mx.pkl"), history_steps=2, horizon_steps=2)
    datamodule.setup()  # the card's graph_format (dense-csv) is not the pickle's
    assert datamodule.dataset.adjacency[0, 1] == 0.25 and datamodule.dataset.adjacency[2, 0] == 0.5  # a -> b, c -> a


def test_the_cards_own_graph_file_by_another_spelling_keeps_the_cards_graph_options(data_root, tmp_path):
    from gman.data.readers import load_dataset

    _speeds(100, ["a", "b", "c"]).to_csv(tmp_path / "v.csv")
    (tmp_path / "g.csv").write_text("a,b,c,d\n1,0,0,1\n0,1,0,0\n0,0,1,0\n1,0,0,1\n")  # d: a node without data
    assert run_cli("import", "extra", "--values", str(tmp_path / "v.csv"), "--graph", str(tmp_path / "g.csv"),
                   "--unmatched-sensors", "drop") == 0
    for spelling in (data_root / "extra" / "adjacency.csv", data_root / "extra" / ".." / "extra" / "adjacency.csv"):
        with pytest.warns(UserWarning, match="1 only in the graph"):  # the card's unmatched_sensors: drop still holds
            assert load_dataset("extra", graph_path=str(spelling)).sensor_ids == ["a", "b", "c"]


def test_list_shows_a_broken_card_as_invalid_beside_the_others(data_root, capsys):
    (data_root / "broken").mkdir()
    (data_root / "broken" / "dataset.yaml").write_text("name: broken\nvalues: {file: x.csv\n")
    assert run_cli("list") == 1
    out = capsys.readouterr().out
    rows = {line.split()[0]: line for line in out.splitlines() if line and not line.startswith(" ")}
    assert "invalid:" in rows["broken"] and "not valid YAML" in rows["broken"]
    assert "missing metr-la.h5 (manual)" in rows["metr-la"]  # the built-in cards are still listed


def test_hidden_folders_of_an_interrupted_import_are_no_cards(data_root):
    from gman.data import registry

    (data_root / ".mine.import-x1").mkdir()
    (data_root / ".mine.import-x1" / "dataset.yaml").write_text("name: mine\n")
    assert not any(name.startswith(".") for name in registry.card_names())


def test_an_import_without_force_never_replaces_a_dataset_that_appeared_meanwhile(tmp_path):
    """Two imports of one name at once: the existence check at the start passed for both."""
    from gman.data.cli import _replace_folder
    from gman.errors import DataError

    target, staging = tmp_path / "mine", tmp_path / ".mine.import-x"
    for folder, text in ((target, "first"), (staging, "second")):
        folder.mkdir()
        (folder / "dataset.yaml").write_text(text)
    with pytest.raises(DataError, match="a dataset of that name was imported meanwhile; use --force"):
        _replace_folder(staging, target, replace=False)
    assert (target / "dataset.yaml").read_text() == "first"
    _replace_folder(staging, target, replace=True)  # --force
    assert (target / "dataset.yaml").read_text() == "second" and not staging.exists()


def test_imported_data_sets_get_the_usual_permissions(data_root, tmp_path):
    """mkdtemp / mkstemp make 0700 folders and 0600 files: a shared data root would be unreadable to others."""
    import stat

    from gman.data.embedding import write_word2vec

    previous = os.umask(0o022)
    try:
        _speeds(100, ["a", "b", "c"]).to_csv(tmp_path / "v.csv")
        assert run_cli("import", "shared", "--values", str(tmp_path / "v.csv")) == 0
        cache = write_word2vec(tmp_path / "cache" / "x.txt", np.zeros((2, 3)))
    finally:
        os.umask(previous)
    mode = lambda path: stat.S_IMODE(path.stat().st_mode)  # noqa: E731
    assert mode(data_root / "shared") == 0o755
    assert mode(data_root / "shared" / "dataset.yaml") == 0o644 and mode(cache) == 0o644
