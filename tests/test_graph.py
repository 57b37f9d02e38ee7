"""Graph readers and builders against the real benchmark graph files, plus bad input."""
from __future__ import annotations

import os
import pickle

import numpy as np
import pandas as pd
import pytest

from gman.data.graph import (
    from_edge_index,
    gaussian_kernel_adjacency,
    graph_stats,
    guess_graph_format,
    load_adjacency,
    read_dcrnn_pickle,
    to_edge_index,
)
from gman.errors import DataError


# ----------------------------------------------------------------------------- real files

def test_pems_bay_gaussian_kernel_reproduces_dcrnn_pickle(shared_data):
    graphs = shared_data / "graphs" / "pems-bay"
    published, ids = load_adjacency(graphs / "adj_mx_bay.pkl")
    assert published.shape == (325, 325) and len(ids) == 325
    distances = pd.read_csv(graphs / "distances_bay_2017.csv", header=None, names=["from", "to", "cost"], dtype={0: str, 1: str})
    built = gaussian_kernel_adjacency(distances, ids, threshold=0.1)
    assert np.array_equal(built != 0, published != 0)
    assert np.abs(built - published).max() <= 1e-6
    # the same through the file reader, with the format guessed from the content
    assert guess_graph_format(graphs / "distances_bay_2017.csv") == "distance-csv"
    from_file, order = load_adjacency(graphs / "distances_bay_2017.csv", sensor_ids=ids)
    assert order == ids and np.abs(from_file - published).max() <= 1e-6


def test_metr_la_pickle_ids_and_stats(shared_data):
    adjacency, ids = load_adjacency(shared_data / "graphs" / "metr-la" / "adj_mx.pkl")
    assert adjacency.dtype == np.float32 and adjacency.shape == (207, 207)
    assert ids == (shared_data / "graphs" / "metr-la" / "graph_sensor_ids.txt").read_text().strip().split(",")
    stats = graph_stats(adjacency)
    assert (stats.nodes, stats.edges + stats.self_loops, stats.self_loops) == (207, 1722, 207)
    assert not stats.symmetric


def test_pems03_edge_list_uses_its_id_map(shared_data):
    folder = shared_data / "graphs" / "pems0x"
    station_ids = (folder / "PEMS03.txt").read_text().split()
    adjacency, order = load_adjacency(folder / "PEMS03.csv")  # PEMS03.txt beside it is found
    assert order == station_ids and adjacency.shape == (358, 358)
    i, j = order.index("317842"), order.index("318711")  # first row of PEMS03.csv
    assert adjacency[i, j] == 1.0 and adjacency[j, i] == 0.0
    assert set(np.unique(adjacency)) <= {0.0, 1.0}
    assert graph_stats(adjacency).edges + graph_stats(adjacency).self_loops == 547
    again, _ = load_adjacency(folder / "PEMS03.csv", "edge-list", id_map=folder / "PEMS03.txt")
    assert np.array_equal(again, adjacency)


def test_an_edge_list_over_node_indices_is_read_through_the_graph_sensor_ids(tmp_path):
    nodes = ["s10", "s7", "s3"]
    (tmp_path / "by_index.csv").write_text("from,to\n0,1\n1,2\n2,2\n")
    (tmp_path / "by_id.csv").write_text("from,to\ns10,s7\ns7,s3\ns3,s3\n")
    by_index, order = load_adjacency(tmp_path / "by_index.csv", "edge-list", id_map=nodes)
    by_id, _ = load_adjacency(tmp_path / "by_id.csv", "edge-list", id_map=nodes)
    assert order == nodes and np.array_equal(by_index, by_id) and by_index[0, 1] == 1 and by_index[1, 0] == 0
    # integer ids that are all in the list stay ids (PEMS03's station numbers), even where they could be indices
    (tmp_path / "int_ids.csv").write_text("from,to\n2,0\n")
    adjacency, _ = load_adjacency(tmp_path / "int_ids.csv", "edge-list", id_map=["0", "1", "2"])
    assert adjacency[2, 0] == 1 and adjacency.sum() == 1
    adjacency, _ = load_adjacency(tmp_path / "int_ids.csv", "edge-list", id_map=["5", "2", "0"])
    assert adjacency[1, 2] == 1 and adjacency.sum() == 1
    # ends that are neither all ids nor all indices 0..M-1 are named
    (tmp_path / "out_of_range.csv").write_text("from,to\n0,3\n")
    with pytest.raises(DataError, match=r"out_of_range\.csv: 2 sensor\(s\) in the graph but not in the sensor list"):
        load_adjacency(tmp_path / "out_of_range.csv", "edge-list", id_map=nodes)


def test_pems04_edge_list_needs_the_sensor_order(shared_data):
    path = shared_data / "graphs" / "pems0x" / "PEMS04.csv"
    with pytest.raises(DataError, match="needs the sensor ids"):
        load_adjacency(path)
    with pytest.warns(UserWarning, match="read as an edge-list .* its cost column is ignored; give graph_format: distance-csv"):
        adjacency, order = load_adjacency(path, sensor_ids=[str(i) for i in range(307)])
    assert adjacency[73, 5] == 1.0 and adjacency.sum() == 340
    # ids the data lacks become nodes after the data's, for the caller to match (readers: unmatched_sensors)
    fewer, order = load_adjacency(path, sensor_ids=[str(i) for i in range(300)])
    assert order[:300] == [str(i) for i in range(300)] and sorted(order[300:], key=int) == [str(i) for i in range(300, 307)]
    assert fewer.sum() == 340 and np.array_equal(fewer[:300, :300], adjacency[:300, :300])
    # a data sensor in no row is not a node of the graph
    some, order = load_adjacency(path, sensor_ids=["5", "73", "9999"])
    assert order[:2] == ["5", "73"] and "9999" not in order and len(order) == 307
    assert some[1, 0] == 1.0  # 73 -> 5


def test_pems08_verbatim_repeated_rows_are_dropped_with_a_warning(shared_data):
    with pytest.warns(UserWarning, match="18 repeated edge row"):
        adjacency, _ = load_adjacency(shared_data / "graphs" / "pems0x" / "PEMS08.csv", sensor_ids=[str(i) for i in range(170)])
    assert adjacency.sum() == 295 - 18


def test_pemsd7m_distance_matrix_gaussian_kernel(shared_data):
    path = shared_data / "graphs" / "pemsd7m" / "W_228.csv"
    distances = np.loadtxt(path, delimiter=",")
    adjacency, ids = load_adjacency(path, "distance-matrix")
    assert ids is None and adjacency.shape == (228, 228)
    expected = np.exp(-np.square(distances / distances.std()))
    expected[expected < 0.1] = 0
    np.fill_diagonal(expected, 1)
    assert np.abs(adjacency - expected).max() < 1e-6
    assert graph_stats(adjacency).symmetric


# ----------------------------------------------------------------------------- restricted unpickler

class _RunsAShellCommand:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_that_would_run_code_is_refused_and_not_executed(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "adj_mx.pkl"
    path.write_bytes(pickle.dumps([["a"], {"a": 0}, _RunsAShellCommand(marker)], protocol=2))
    with pytest.raises(DataError, match="a pickle can run code") as caught:
        load_adjacency(path)
    assert str(path) in str(caught.value) and "\n" not in str(caught.value)
    assert not marker.exists()


def test_pickle_with_a_non_numeric_array_is_refused(tmp_path):
    path = tmp_path / "adj.pkl"
    path.write_bytes(pickle.dumps([["a"], {"a": 0}, np.array([[None]], dtype=object)], protocol=4))
    with pytest.raises(DataError, match="numeric numpy array"):
        read_dcrnn_pickle(path)
    path.write_bytes(b"\x80\x02]q\x00(X")  # truncated
    with pytest.raises(DataError, match="not a readable pickle"):
        read_dcrnn_pickle(path)


@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
def test_plain_pickle_round_trips_at_any_protocol(tmp_path, protocol):
    matrix = np.array([[1, 0.5], [0, 1]], dtype=np.float32)
    path = tmp_path / "adj.pkl"
    path.write_bytes(pickle.dumps([["7", "9"], {"7": 0, "9": 1}, matrix], protocol=protocol))
    adjacency, ids = load_adjacency(path)
    assert ids == ["7", "9"] and np.array_equal(adjacency, matrix)


# ----------------------------------------------------------------------------- small hand-checked graphs

def test_gaussian_kernel_by_hand():
    distances = pd.DataFrame({"from": ["a", "a", "b", "x"], "to": ["b", "c", "c", "a"], "cost": [1.0, 3.0, 2.0, 5.0]})
    adjacency = gaussian_kernel_adjacency(distances, ["a", "b", "c"], threshold=0.1)
    sigma = np.std([1.0, 3.0, 2.0])  # the row with unknown sensor 'x' is ignored
    expected = np.eye(3)
    expected[0, 1], expected[0, 2], expected[1, 2] = (np.exp(-((d / sigma) ** 2)) for d in (1.0, 3.0, 2.0))
    expected[expected < 0.1] = 0
    assert expected[0, 2] == 0  # exp(-(3/0.816)^2) is cut by the threshold
    assert np.allclose(adjacency, expected, atol=1e-7)
    # a sensor the distances never mention is isolated, and said to be
    with pytest.warns(UserWarning, match=r"1 of the 4 sensors are in no row of the distances, e\.g\. \['d'\]"):
        isolated = gaussian_kernel_adjacency(distances, ["a", "b", "c", "d"], threshold=0.1)
    assert np.allclose(isolated[:3, :3], expected, atol=1e-7) and isolated[3].tolist() == [0, 0, 0, 1]


def test_sensors_a_distance_file_never_mentions_are_not_its_nodes(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("from,to,cost\na,a,0\na,b,1\nb,b,0\nb,c,2\nc,c,0\nx,a,5\n")
    adjacency, ids = load_adjacency(path, "distance-csv", sensor_ids=["c", "d", "a", "b"])
    assert ids == ["c", "a", "b"] and adjacency.shape == (3, 3)
    # listed as the graph's nodes (graph_sensor_ids), a sensor without rows is a node without edges
    adjacency, ids = load_adjacency(path, "distance-csv", sensor_ids=["c", "d", "a", "b"], id_map=["a", "b", "c", "d"])
    assert ids == ["a", "b", "c", "d"] and adjacency[3].tolist() == [0, 0, 0, 1]


def test_a_distance_file_sharing_no_id_with_the_data_names_an_id_of_each(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("from,to,cost\n400001,400001,0\n400001,400017,1800\n")
    with pytest.raises(DataError) as caught:
        load_adjacency(path, "distance-csv", sensor_ids=["001", "002", "003"])
    assert str(caught.value) == (f"{path}: none of the file's sensor ids matches one of the data's 3 sensors "
                                 "(file e.g. '400001', data e.g. '001')")


def test_edge_index_round_trip_and_stats():
    adjacency = np.zeros((6, 6), dtype=np.float32)
    adjacency[0, 1], adjacency[1, 2], adjacency[3, 4] = 0.5, 1.0, 2.0
    adjacency[5, 5] = 1.0  # node 5 only has a self-loop: isolated
    edge_index, edge_weight = to_edge_index(adjacency)
    assert edge_index.shape == (2, 4) and sorted(edge_weight.tolist()) == [0.5, 1.0, 1.0, 2.0]
    assert np.array_equal(from_edge_index(edge_index, edge_weight, 6), adjacency)
    stats = graph_stats(adjacency)
    assert stats.as_dict() == dict(nodes=6, edges=3, self_loops=1, isolated_nodes=1,
                                   weakly_connected_components=3, symmetric=False)


# ----------------------------------------------------------------------------- bad input

@pytest.mark.parametrize(
    "text, fmt, problem",
    [
        ("from,to,cost\na,b,1\nb,a,-2\n", "distance-csv", "negative cost"),
        ("from,to,cost\na,b,1\nb,a,far\n", "distance-csv", "non-numeric cost"),
        ("from,to,cost\na,b,1\na,b,2\n", "distance-csv", "duplicate edge a -> b"),
        ("1,0,0\n0,1,0\n", "dense-csv", "square"),
        ("1,0\n0,x\n", "dense-csv", "non-numeric"),
        ("a,b\n1,0,0\n0,1,0\n", "dense-csv", "header has 2 ids"),
        ("0,2\n-1,0\n", "distance-matrix", "negative distance"),
    ],
)
def test_bad_graph_files_name_the_file_and_problem(tmp_path, text, fmt, problem):
    path = tmp_path / "graph.csv"
    path.write_text(text)
    with pytest.raises(DataError, match=problem) as caught:
        load_adjacency(path, fmt, sensor_ids=["a", "b"])
    message = str(caught.value)
    assert message.startswith(str(path)) and "\n" not in message


def test_dense_csv_with_header_keeps_its_ids(tmp_path):
    path = tmp_path / "adj.csv"
    path.write_text("s1,s2\n1,0.3\n0,1\n")
    adjacency, ids = load_adjacency(path)
    assert ids == ["s1", "s2"] and adjacency[0, 1] == np.float32(0.3)
    path.write_text("773869,767541\n1,0.3\n0,1\n")  # numeric station ids: N + 1 rows of N values
    adjacency, ids = load_adjacency(path)
    assert ids == ["773869", "767541"] and adjacency.shape == (2, 2)


def test_missing_graph_file(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_adjacency(tmp_path / "nope.pkl")


@pytest.mark.parametrize("labels", [None, ["a", "b", "c"]])
def test_a_matrix_saved_with_its_index_is_named_as_such(tmp_path, labels):
    pd.DataFrame(np.eye(3), columns=["a", "b", "c"], index=labels).to_csv(tmp_path / "m.csv")
    with pytest.raises(DataError, match=r"m\.csv: matrix has a row-label column; save it without the index"):
        load_adjacency(tmp_path / "m.csv")
