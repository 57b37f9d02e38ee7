"""load_dataset: every supported source, missing-value conventions, id matching and bad input."""
from __future__ import annotations

import json
import sys
import types

import numpy as np
import pandas as pd
import pytest

from gman.data.readers import load_dataset
from gman.errors import ConfigError, DataError

LOS = dict(start_time="2012-03-01 00:00", interval="5min")


def small_frame(num_steps=40, ids=("a", "b", "c"), start="2024-01-01"):
    rng = np.random.default_rng(1)
    values = rng.uniform(30, 70, size=(num_steps, len(ids))).round(2)
    values[3, 1] = 0.0
    values[5, 2] = np.nan
    index = pd.date_range(start, periods=num_steps, freq="5min", name="timestamp")
    return pd.DataFrame(values, index=index, columns=list(ids))


# ---------------------------------------------------------------- real files

def test_los_loop_wide_csv_without_timestamps_and_dense_graph(shared_data):
    ds = load_dataset(
        shared_data / "los-loop/los_speed.csv", graph_path=shared_data / "los-loop/los_adj.csv", units="mph", **LOS
    )
    assert (ds.num_steps, ds.num_nodes) == (2016, 207)
    assert ds.index[0] == pd.Timestamp("2012-03-01 00:00") and ds.index[-1] == pd.Timestamp("2012-03-07 23:55")
    assert ds.sensor_ids[:2] == ["773869", "767541"] and ds.steps_per_day == 288
    assert ds.mask.all() and ds.adjacency.shape == (207, 207) and ds.units == "mph"


def test_graph_is_reordered_by_id_not_position(shared_data, tmp_path):
    speeds = pd.read_csv(shared_data / "los-loop/los_speed.csv")
    shuffled = speeds[list(np.random.default_rng(0).permutation(speeds.columns))]
    shuffled.to_csv(tmp_path / "shuffled.csv", index=False)
    pickle_graph = shared_data / "graphs/metr-la/adj_mx.pkl"
    original = load_dataset(shared_data / "los-loop/los_speed.csv", graph_path=pickle_graph, **LOS)
    permuted = load_dataset(tmp_path / "shuffled.csv", graph_path=pickle_graph, **LOS)
    order = [original.sensor_ids.index(s) for s in permuted.sensor_ids]
    assert np.array_equal(permuted.adjacency, original.adjacency[np.ix_(order, order)])
    assert np.array_equal(permuted.values, original.values[:, order])
    # the graph file's node order is kept, for files in node-index order (spatial embeddings)
    assert original.graph_node_ids is None and permuted.graph_node_ids == original.sensor_ids
    assert np.array_equal(permuted.graph_order(), order)
    # the symmetrised published graph is max(A, A^T) of the pickle, in the CSV's column order
    dense = load_dataset(shared_data / "los-loop/los_speed.csv", graph_path=shared_data / "los-loop/los_adj.csv", **LOS)
    assert np.array_equal(dense.adjacency, np.maximum(original.adjacency, original.adjacency.T))


def test_mismatched_ids_name_both_files(shared_data, tmp_path):
    speeds = pd.read_csv(shared_data / "los-loop/los_speed.csv").iloc[:, :-1]  # drop one sensor
    speeds = speeds.rename(columns={speeds.columns[0]: "999999"})
    speeds.to_csv(tmp_path / "fewer.csv", index=False)
    graph = shared_data / "graphs/metr-la/adj_mx.pkl"
    with pytest.raises(DataError) as err:
        load_dataset(tmp_path / "fewer.csv", graph_path=graph, **LOS)
    message = str(err.value)
    assert "fewer.csv" in message and "adj_mx.pkl" in message and "999999" in message and "\n" not in message
    assert "1 only in the data" in message and "2 only in the graph" in message
    assert "unmatched_sensors: drop" in message  # the way out, named


def test_timestamps_across_daylight_saving_time_need_and_take_a_timezone(tmp_path):
    local = pd.date_range("2024-03-09", periods=600, freq="5min", tz="America/Los_Angeles", name="timestamp")
    frame = small_frame(num_steps=600).set_axis(local, axis=0)
    frame.to_csv(tmp_path / "local.csv")  # offsets -08:00 then -07:00
    frame.tz_convert("UTC").to_csv(tmp_path / "utc.csv")
    with pytest.raises(DataError, match=r"local.csv: column 'timestamp' holds timestamps with different UTC offsets .*timezone: America/Los_Angeles"):
        load_dataset(tmp_path / "local.csv")
    for name in ("local.csv", "utc.csv"):
        ds = load_dataset(tmp_path / name, timezone="America/Los_Angeles")
        assert str(ds.index.tz) == "America/Los_Angeles" and ds.index.equals(local) and ds.interval == pd.Timedelta("5min")
        # the time of day is read on the local clock, which jumps from 01:55 to 03:00 on 2024-03-10
        jump = int(np.argmax(local == pd.Timestamp("2024-03-10 03:00", tz="America/Los_Angeles")))
        assert ds.time_features()[jump - 1].tolist() == [6, 23] and ds.time_features()[jump].tolist() == [6, 36]
    assert str(load_dataset(tmp_path / "utc.csv").index.tz) == "UTC"  # one offset throughout: read as it is
    naive = small_frame(num_steps=10, start="2024-07-01")
    assert str(load_dataset(naive, timezone="Europe/Paris").index[0]) == "2024-07-01 00:00:00+02:00"
    with pytest.raises(ConfigError, match="timezone: 'Mars/Olympus' is not a time zone name"):
        load_dataset(naive, timezone="Mars/Olympus")
    spring = small_frame(num_steps=30, start="2024-03-31 01:00")  # naive wall times that do not exist in Paris
    with pytest.raises(DataError, match="naive timestamps cannot be placed in Europe/Paris"):
        load_dataset(spring, timezone="Europe/Paris")


def test_unmatched_sensors_drop_keeps_the_sensors_in_both(tmp_path):
    frame = small_frame(ids=("d", "a", "b", "c"))  # d has no node in the graph
    frame.to_csv(tmp_path / "v.csv")
    # graph nodes in the order b, x, c, a (x has no data); edges b-c 0.5, c-a 0.25, x-a 0.9
    (tmp_path / "g.csv").write_text("b,x,c,a\n1,0,0.5,0\n0,1,0,0.9\n0.5,0,1,0.25\n0,0.9,0.25,1\n")
    with pytest.raises(DataError, match=r"1 only in the data \(e\.g\. \['d'\]\), 1 only in the graph \(e\.g\. \['x'\]\)"):
        load_dataset(tmp_path / "v.csv", graph_path=tmp_path / "g.csv")
    with pytest.warns(UserWarning, match=r"kept the 3 sensors in both, dropped 1 only in the data .*'d'.* 1 only in the graph .*'x'"):
        ds = load_dataset(tmp_path / "v.csv", graph_path=tmp_path / "g.csv", unmatched_sensors="drop")
    assert ds.sensor_ids == ["a", "b", "c"]  # the data's order, without d
    kept = frame[["a", "b", "c"]].to_numpy()
    observed = ~np.isnan(kept) & (kept != 0)
    assert not observed.all()  # small_frame has NaN and zero readings: the mask below is tested
    np.testing.assert_array_equal(ds.mask, observed)  # columns moved with their masks
    np.testing.assert_array_equal(ds.values, np.where(observed, kept, 0).astype(np.float32))
    np.testing.assert_array_equal(ds.adjacency, [[1, 0, 0.25], [0, 1, 0.5], [0.25, 0.5, 1]])
    # a word2vec file in the graph's node order still has 4 rows: a, b, c are rows 3, 0, 2
    assert ds.graph_node_ids == ["b", "x", "c", "a"] and ds.graph_order().tolist() == [3, 0, 2]
    with pytest.raises(ConfigError, match="unmatched_sensors: expected 'error' or 'drop', got 'keep'"):
        load_dataset(tmp_path / "v.csv", graph_path=tmp_path / "g.csv", unmatched_sensors="keep")
    small_frame(ids=("p", "q", "r")).to_csv(tmp_path / "other.csv")
    with pytest.raises(DataError, match="no sensor id in common"):
        load_dataset(tmp_path / "other.csv", graph_path=tmp_path / "g.csv", unmatched_sensors="drop")


def test_dcrnn_h5_us_and_ns_indexes_and_zero_is_missing(shared_data, tmp_path):
    frame = pd.read_csv(shared_data / "los-loop/los_speed.csv").iloc[:300]
    frame.index = pd.date_range("2012-03-01", periods=300, freq="5min")
    frame.iloc[10:20, 3] = 0.0
    graph = shared_data / "graphs/metr-la/adj_mx.pkl"
    loaded = []
    for unit in ("us", "ns"):
        frame.index = frame.index.as_unit(unit)
        frame.to_hdf(tmp_path / f"metr-{unit}.h5", key="df")
        loaded.append(load_dataset(tmp_path / f"metr-{unit}.h5", graph_path=graph, units="mph"))
    us, ns = loaded
    assert us.index.equals(ns.index) and np.array_equal(us.time_features(), ns.time_features())
    assert np.array_equal(us.values, ns.values)
    assert not us.mask[10:20, 3].any() and us.mask.sum() == 300 * 207 - 10
    assert us.adjacency.shape == (207, 207) and np.count_nonzero(us.adjacency) == 1722


def test_raw_metr_la_zeros_follow_the_missing_value_setting(shared_data):
    raw = json.loads((shared_data / "metr-la-raw-100/METRLA.json").read_text())
    speeds = np.array([[reading[0] for reading in raw[str(t)]] for t in range(100)])
    frame = pd.DataFrame(speeds, index=pd.date_range("2012-03-01", periods=100, freq="5min"))
    zeros_missing = load_dataset(frame)
    assert int((~zeros_missing.mask).sum()) == 646
    assert zeros_missing.missing_value == 0.0
    nan_only = load_dataset(frame, missing_value=None)
    assert nan_only.mask.all() and nan_only.missing_value is None
    frame.iloc[0, 0] = np.nan
    assert not load_dataset(frame, missing_value=None).mask[0, 0]  # NaN always means missing


# ---------------------------------------------------------------- formats agree

def test_wide_csv_long_csv_parquet_and_dataframe_agree(tmp_path):
    frame = small_frame()
    frame.to_csv(tmp_path / "wide.csv")
    long = frame.stack(future_stack=True).rename("value").rename_axis(["timestamp", "sensor_id"]).reset_index()
    long = long.sample(frac=1.0, random_state=0)  # long rows may come in any order
    long.to_csv(tmp_path / "long.csv", index=False)
    frame.to_parquet(tmp_path / "wide.parquet")
    long.to_parquet(tmp_path / "long.parquet")
    reference = load_dataset(frame)
    assert reference.sensor_ids == ["a", "b", "c"]
    assert not reference.mask[3, 1] and not reference.mask[5, 2] and reference.mask.sum() == 118
    for source in ("wide.csv", "long.csv", "wide.parquet", "long.parquet"):
        ds = load_dataset(tmp_path / source)
        assert sorted(ds.sensor_ids) == ["a", "b", "c"], source
        order = [ds.sensor_ids.index(s) for s in reference.sensor_ids]
        assert ds.index.equals(reference.index), source
        assert np.allclose(ds.values[:, order], reference.values), source
        assert np.array_equal(ds.mask[:, order], reference.mask), source
        assert ds.name == source.split(".")[0]


def test_pems_npz_feature_start_time_and_edge_list(shared_data, tmp_path):
    rng = np.random.default_rng(0)
    data = rng.uniform(1, 100, size=(50, 307, 3)).astype(np.float32)
    np.savez(tmp_path / "PEMS04.npz", data=data)
    ds = load_dataset(
        tmp_path / "PEMS04.npz", feature="speed", start_time="2018-01-01", interval="5min",
        graph_path=shared_data / "graphs/pems0x/PEMS04.csv", graph_format="edge-list",
    )
    assert ds.num_nodes == 307 and ds.sensor_ids[:3] == ["0", "1", "2"]
    assert np.allclose(ds.values, data[:, :, 2]) and ds.index[-1] == pd.Timestamp("2018-01-01 04:05")
    edges = pd.read_csv(shared_data / "graphs/pems0x/PEMS04.csv")
    assert np.count_nonzero(ds.adjacency) == len(edges)
    assert ds.adjacency[edges.iloc[0, 0], edges.iloc[0, 1]] == 1.0
    assert np.allclose(load_dataset(tmp_path / "PEMS04.npz", feature=0, **LOS).values, data[:, :, 0])


def test_card_name_uses_registry_options(tmp_path, monkeypatch):
    small_frame().to_csv(tmp_path / "values.csv")
    registry = types.ModuleType("gman.data.registry")
    registry.card_reader_options = lambda name: {"values_path": str(tmp_path / "values.csv"), "units": "mph"}
    monkeypatch.setitem(sys.modules, "gman.data.registry", registry)
    ds = load_dataset("my-card")
    assert ds.name == "my-card" and ds.units == "mph" and ds.num_nodes == 3
    assert load_dataset("my-card", units="km/h").units == "km/h"


def test_fill_gaps_turns_missing_timestamps_into_missing_readings(tmp_path):
    frame = small_frame().drop(index=pd.Timestamp("2024-01-01 00:20"))
    with pytest.raises(DataError, match="irregular interval"):
        load_dataset(frame)
    ds = load_dataset(frame, fill_gaps=True)
    assert ds.num_steps == 40 and not ds.mask[4].any()
    # one stray timestamp is named against the series' own 5-minute grid, not a 1-minute one
    stray = small_frame().rename(index={pd.Timestamp("2024-01-01 00:20"): pd.Timestamp("2024-01-01 00:21")})
    with pytest.raises(DataError, match=r"timestamp 2024-01-01 00:21:00 is not on the 0 days 00:05:00 grid \(the most common step"):
        load_dataset(stray, fill_gaps=True)


# ---------------------------------------------------------------- bad input

def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    "name, text, message",
    [
        ("text.csv", "timestamp,a,b\n2024-01-01 00:00,1,2\n2024-01-01 00:05,x,3\n", "non-numeric value 'x' in column 'a', data row 2"),
        ("inf.csv", "timestamp,a,b\n2024-01-01 00:00,1,2\n2024-01-01 00:05,inf,3\n", "infinite value"),
        ("dup.csv", "timestamp,a\n2024-01-01 00:00,1\n2024-01-01 00:00,2\n", "duplicate timestamp"),
        ("unsorted.csv", "timestamp,a\n2024-01-01 00:10,1\n2024-01-01 00:05,2\n2024-01-01 00:15,2\n", "not sorted"),
        ("gap.csv", "timestamp,a\n2024-01-01 00:00,1\n2024-01-01 00:05,2\n2024-01-01 00:15,2\n", "irregular interval"),
        ("badtime.csv", "timestamp,a\n2024-01-01 00:00,1\nnot-a-time,2\n", "cannot parse 'not-a-time'"),
        ("empty.csv", "", "file is empty"),
        ("header.csv", "timestamp,a,b\n", "no data rows"),
        ("corrupt.h5", "this is not an HDF5 file\n", "cannot read as h5"),
        ("corrupt.parquet", "PAR1 nonsense", "cannot read as parquet"),
        ("corrupt.npz", "PK nonsense", "cannot read as npz"),
        ("twice.csv", "timestamp,a,b,a\n2024-01-01 00:00,1,2,3\n", r"^\S*twice\.csv: the header names column 'a' twice \(columns 2 and 4\)"),
        ("trailing.csv", "timestamp,a,b,\n2024-01-01 00:00,1,2,\n", "column 'Unnamed: 3' has no name in the header"),
        ("same_id.csv", "timestamp,7,7.0\n2024-01-01 00:00,1,2\n", "sensor id '7' names two columns"),
        ("epoch.csv", "timestamp,a\n1330560000,1\n1330560300,2\n", "column 'timestamp' holds numbers .* not timestamps"),
        ("long_gap.csv", "timestamp,sensor_id,value\n2024-01-01 00:00,a,1\n2024-01-01 00:00,,2\n",
         "empty 'sensor_id' in data row 2"),
        ("noheader.csv", "64.375,67.625\n62.667,68.125\n", r"^\S*noheader\.csv: the first row \(64\.375, 67\.625\) holds readings, not column names; .* give header: false"),
        ("noheader_repeats.csv", "63.066,60.5,63.066\n62.667,68.125,61.0\n",  # a repeated reading is no column name
         r"^\S*noheader_repeats\.csv: the first row \(63\.066, 60\.5, 63\.066\) holds readings, not column names"),
        ("huge.csv", "timestamp,a,b\n2024-01-01 00:00,1,2\n2024-01-01 00:05,1e40,3\n",
         "value beyond float32's range 1e\\+40 at 2024-01-01 00:05:00, sensor 'a'"),
    ],
)
def test_bad_files_raise_one_line_data_errors_naming_the_file(tmp_path, name, text, message):
    path = write(tmp_path, name, text)
    with pytest.raises(DataError, match=message) as err:
        load_dataset(path)
    assert name in str(err.value) and "\n" not in str(err.value)


def test_bad_graphs_and_options(tmp_path):
    values = tmp_path / "v.csv"
    small_frame().to_csv(values)
    with pytest.raises(DataError, match="v.csv: file not found"):
        load_dataset(tmp_path / "missing/v.csv")
    with pytest.raises(DataError, match="square"):
        load_dataset(values, graph_path=write(tmp_path, "rect.csv", "1,0,0,0\n0,1,0,0\n0,0,1,0\n"))
    with pytest.raises(DataError, match="3 sensors but the graph has 2"):
        load_dataset(values, graph_path=write(tmp_path, "two.csv", "1,0\n0,1\n"))
    with pytest.raises(ConfigError, match="unknown option 'graph'"):
        load_dataset(values, graph="x")
    with pytest.raises(DataError, match="interval is 0 days 00:05:00 in the file but 0 days 00:15:00"):
        load_dataset(values, interval="15min")
    np.savez(tmp_path / "x.npz", data=np.ones((5, 2, 1)))
    with pytest.raises(DataError, match="x.npz: an npz file holds no timestamps"):
        load_dataset(tmp_path / "x.npz")
    with pytest.raises(DataError, match="no timestamp column"):
        load_dataset(write(tmp_path, "nots.csv", "1,2\n3,4\n5,6\n"))


def test_headerless_csv_with_a_distance_matrix_pemsd7m_layout(shared_data, tmp_path):
    """PeMSD7(M): V_228.csv has no header row; W_228.csv is a bare distance matrix in the same order."""
    distances = np.loadtxt(shared_data / "graphs" / "pemsd7m" / "W_228.csv", delimiter=",")
    rng = np.random.default_rng(0)
    speeds = rng.uniform(20, 70, size=(300, distances.shape[0])).round(1)
    values_path = tmp_path / "V_228.csv"
    np.savetxt(values_path, speeds, delimiter=",", fmt="%.1f")  # no header row, as published
    data = load_dataset(values_path, header=False, start_time="2012-05-01", interval="5min",
                        graph_path=str(shared_data / "graphs" / "pemsd7m" / "W_228.csv"),
                        graph_format="distance-matrix")
    assert data.values.shape == (300, 228)                       # the first row is data, not ids
    np.testing.assert_allclose(data.values[0], speeds[0], rtol=1e-6)
    assert data.sensor_ids[:3] == ["0", "1", "2"]
    assert data.adjacency.shape == (228, 228) and np.all(np.diag(data.adjacency) == 1.0)


def test_ids_stay_text_and_agree_across_data_and_graph(tmp_path):
    # long format: "007" is an id, not the number 7
    write(tmp_path, "long.csv", "timestamp,sensor_id,value\n2024-01-01 00:00,007,1\n2024-01-01 00:00,010,2\n"
                                "2024-01-01 00:05,007,3\n2024-01-01 00:05,010,4\n")
    write(tmp_path, "g.csv", "from,to,cost\n007,010,1\n007,007,0\n010,010,0\n")
    dataset = load_dataset(tmp_path / "long.csv", graph_path=tmp_path / "g.csv", graph_threshold=0.001)
    assert dataset.sensor_ids == ["007", "010"] and dataset.adjacency[0, 1] > 0
    # float column labels (a DataFrame built from numbers) match a pickle's text ids
    frame = small_frame(ids=("a", "b", "c"))
    frame.columns = [773869.0, 767541.0, 767542.0]
    (tmp_path / "adj.pkl").write_bytes(__import__("pickle").dumps(
        [["773869", "767541", "767542"], {}, np.eye(3, dtype=np.float32)], protocol=2))
    assert load_dataset(frame, graph_path=tmp_path / "adj.pkl").sensor_ids == ["773869", "767541", "767542"]
    # a headerless file reads with header: false
    write(tmp_path, "noheader.csv", "64.375,67.625\n62.667,68.125\n")
    plain = load_dataset(tmp_path / "noheader.csv", header=False, start_time="2024-01-01", interval="5min")
    assert plain.num_steps == 2 and plain.values[0, 0] == pytest.approx(64.375)


def test_a_folder_a_keyless_npz_and_timestamps_given_twice(tmp_path):
    (tmp_path / "data.csv").mkdir()
    with pytest.raises(DataError, match=r"data\.csv: is a folder, not a data file"):
        load_dataset(tmp_path / "data.csv")
    np.savez(tmp_path / "two.npz", speed=np.ones((5, 2)), flow=np.ones((5, 2)))
    with pytest.raises(DataError, match=r"no array 'data' in the npz and several others \(\['speed', 'flow'\]\); give key="):
        load_dataset(tmp_path / "two.npz", start_time="2024-01-01", interval="5min")
    small_frame().to_csv(tmp_path / "stamped.csv")
    with pytest.raises(ConfigError, match=r"start_time: given, but .*stamped\.csv has its own timestamps \(column 'timestamp'\)"):
        load_dataset(tmp_path / "stamped.csv", start_time="2024-01-01", interval="5min")


def test_ids_given_twice_are_refused(tmp_path):
    small_frame().to_csv(tmp_path / "v.csv")
    (tmp_path / "ids.txt").write_text("x\ny\nz\n")
    with pytest.raises(ConfigError, match=r"sensor_ids: given, but .*v\.csv names its sensors itself"):
        load_dataset(tmp_path / "v.csv", sensor_ids=str(tmp_path / "ids.txt"))
    (tmp_path / "g.csv").write_text("a,b,c\n1,0,0\n0,1,0\n0,0,1\n")
    with pytest.raises(DataError, match="header row names its sensors; drop the graph sensor ids"):
        load_dataset(tmp_path / "v.csv", graph_path=tmp_path / "g.csv", graph_sensor_ids=["c", "b", "a"])


def test_a_graph_threshold_outside_zero_one_is_refused(tmp_path):
    small_frame().to_csv(tmp_path / "v.csv")
    (tmp_path / "d.csv").write_text("from,to,cost\na,b,1\na,a,0\nb,b,0\nc,c,0\n")
    for bad in (-1, 1.5, "high"):
        with pytest.raises(ConfigError, match=r"graph_threshold: expected a Gaussian-kernel weight cut-off in \[0, 1\)"):
            load_dataset(tmp_path / "v.csv", graph_path=tmp_path / "d.csv", graph_threshold=bad)


def test_a_single_time_step_takes_the_interval_option(tmp_path):
    write(tmp_path, "one.csv", "timestamp,a\n2024-01-01 00:00,1\n")
    with pytest.raises(DataError, match=r"one\.csv: a single time step needs an interval \(the interval option\)"):
        load_dataset(tmp_path / "one.csv")
    assert load_dataset(tmp_path / "one.csv", interval="5min").interval == pd.Timedelta("5min")
