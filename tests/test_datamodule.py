"""GMANDataModule: split, scaler, windows, loaders, time look-ups, spatial embeddings, YAML configuration."""
from __future__ import annotations

import sys
import types

import numpy as np
import pandas as pd
import pytest
import torch

from gman.data.datamodule import GMANDataModule
from gman.data.embedding import write_word2vec
from gman.errors import ConfigError, DataError

SMALL = {"num_sensors": 12, "days": 3}


@pytest.fixture(scope="module")
def default_module():
    module = GMANDataModule()
    module.setup("fit")
    return module


def test_default_synthetic_split_scaler_and_sizes(default_module):
    dm = default_module
    ds = dm.dataset
    assert dm.split_ranges == [(0, 5645), (5645, 6451), (6451, 8064)]
    assert (dm.num_nodes, dm.steps_per_day, dm.interval) == (64, 288, pd.Timedelta("5min"))
    assert dm.sensor_ids == ds.sensor_ids and dm.missing_value == 0.0 and dm.spatial_embedding is None
    assert [len(w) for w in (dm.train_windows, dm.val_windows, dm.test_windows)] == [5645 - 23, 806 - 23, 1613 - 23]
    # the authors' scalar z-score: np.mean / np.std of trainX, the training input windows, zeros included
    train_x = np.stack([ds.values[s:s + 12] for s in dm.train_windows.starts]).astype(np.float64)
    assert np.isclose(dm.scaler.mean, train_x.mean()) and np.isclose(dm.scaler.std, train_x.std())
    assert np.isclose(dm.scaler.missing_input, -train_x.mean() / train_x.std())
    x = dm.train_windows[0]
    assert torch.equal(x["x"][~x["x_mask"]], torch.full_like(x["x"][~x["x_mask"]], np.float32(dm.scaler.missing_input)))
    assert (~x["x_mask"]).any()
    # the named alternative: observed training readings only (zeros = missing are left out), missing inputs at 0
    observed = GMANDataModule(normalisation="observed")
    observed.setup("fit")
    train = ds.values[:5645][ds.mask[:5645]].astype(np.float64)
    assert np.isclose(observed.scaler.mean, train.mean()) and np.isclose(observed.scaler.std, train.std())
    assert observed.scaler.mean > dm.scaler.mean + 2 and observed.scaler.missing_input == 0.0
    with pytest.raises(ConfigError, match="data.normalisation: expected one of authors, observed, got 'zscore'"):
        GMANDataModule(normalisation="zscore")
    # no window crosses a split boundary
    for windows, (start, stop) in zip((dm.train_windows, dm.val_windows, dm.test_windows), dm.split_ranges):
        assert windows.starts[0] == start and windows.starts[-1] + 24 == stop


def test_the_training_order_follows_the_runs_seed_unless_data_seed_is_set(monkeypatch):
    """data.seed None takes seed_everything's (PL_GLOBAL_SEED), so runs of different seeds see different
    orders; and no seed replays another seed's order one epoch later (seed + epoch did)."""
    from gman.data.sampling import EpochSeededRandomSampler

    def first_batch(module, epoch=0):
        module.setup("fit")
        loader = module.train_dataloader()
        loader.sampler.set_epoch(epoch)
        return next(iter(loader))["start"].tolist()

    monkeypatch.setenv("PL_GLOBAL_SEED", "3")
    follows = first_batch(GMANDataModule(options=SMALL))
    assert follows == first_batch(GMANDataModule(options=SMALL, seed=3))
    assert follows != first_batch(GMANDataModule(options=SMALL, seed=0))
    monkeypatch.setenv("PL_GLOBAL_SEED", "4")
    assert first_batch(GMANDataModule(options=SMALL)) != follows
    monkeypatch.delenv("PL_GLOBAL_SEED")
    assert first_batch(GMANDataModule(options=SMALL)) == first_batch(GMANDataModule(options=SMALL, seed=0))
    later = EpochSeededRandomSampler(100, seed=0)
    later.set_epoch(1)
    assert list(EpochSeededRandomSampler(100, seed=1)) != list(later)
    with pytest.raises(ConfigError, match="data.seed: expected an integer >= 0 or null, got -1"):
        GMANDataModule(seed=-1)


def test_batches_and_seeded_training_order(default_module):
    dm = default_module
    batch = next(iter(dm.train_dataloader()))
    assert batch["x"].shape == (16, 12, 64) and batch["x"].dtype == torch.float32
    assert batch["time"].shape == (16, 24, 2) and batch["time"].dtype == torch.int64
    assert batch["y"].shape == batch["y_mask"].shape == (16, 12, 64) and batch["y_mask"].dtype == torch.bool
    first_order = batch["start"].tolist()
    assert first_order != sorted(first_order)  # shuffled
    again = GMANDataModule()
    again.setup("fit")
    assert next(iter(again.train_dataloader()))["start"].tolist() == first_order  # same seed, same order
    other_seed = GMANDataModule(seed=1)
    other_seed.setup("fit")
    assert next(iter(other_seed.train_dataloader()))["start"].tolist() != first_order
    val_starts = next(iter(dm.val_dataloader()))["start"]
    assert val_starts.tolist() == list(range(5645, 5645 + 16))  # evaluation loaders keep time order
    assert not dm.train_dataloader().persistent_workers
    with_workers = GMANDataModule(num_workers=2, options=SMALL)
    with_workers.setup()
    assert with_workers.val_dataloader().persistent_workers


def test_sharded_training_order_deals_the_one_process_order_round_robin():
    from torch.utils.data import DistributedSampler

    from gman.data.sampling import EpochSeededRandomSampler, ShardedEpochSampler

    for num_samples, world in ((23, 2), (23, 3), (2, 3), (24, 4)):
        for epoch in (0, 5):
            single = EpochSeededRandomSampler(num_samples, seed=7)
            single.set_epoch(epoch)
            order = list(single)
            shards = []
            for rank in range(world):
                sampler = ShardedEpochSampler(num_samples, num_replicas=world, rank=rank, seed=7)
                sampler.set_epoch(epoch)
                shards.append(list(sampler))
                assert isinstance(sampler, DistributedSampler) and len(sampler) == len(shards[-1])
            assert len({len(s) for s in shards}) == 1 and len(shards[0]) == -(-num_samples // world)
            dealt = [shards[r][i] for i in range(len(shards[0])) for r in range(world)]
            assert dealt[:num_samples] == order and set(dealt[num_samples:]) <= set(order)
    one = ShardedEpochSampler(10, num_replicas=1, rank=0, seed=3)
    assert list(one) == list(EpochSeededRandomSampler(10, seed=3))
    with pytest.raises(ValueError):
        ShardedEpochSampler(10, num_replicas=2, rank=2)


def test_training_loader_is_sharded_by_the_trainers_world_size():
    from gman.data.sampling import EpochSeededRandomSampler, ShardedEpochSampler

    dm = GMANDataModule(options=SMALL, seed=4)
    dm.setup("fit")
    assert type(dm.train_dataloader().sampler) is EpochSeededRandomSampler  # no trainer: one process
    dm.trainer = types.SimpleNamespace(world_size=2, global_rank=1)
    sampler = dm.train_dataloader().sampler
    assert isinstance(sampler, ShardedEpochSampler) and (sampler.num_replicas, sampler.rank) == (2, 1)
    assert list(sampler) == list(EpochSeededRandomSampler(len(dm.train_windows), seed=4))[1::2]


@pytest.mark.parametrize("world", [2, 4])
def test_evaluation_loaders_shard_every_window_once_under_ddp(world):
    """Lightning's default would pad the split by repeating windows, which the summed metrics count twice."""
    from torch.utils.data import DistributedSampler

    dm = GMANDataModule(options=SMALL)
    dm.setup("fit")
    for loader, windows in ((dm.val_dataloader, dm.val_windows), (dm.test_dataloader, dm.test_windows)):
        assert loader().sampler.__class__.__name__ == "SequentialSampler"  # one process: time order
        shards = []
        for rank in range(world):
            dm.trainer = types.SimpleNamespace(world_size=world, global_rank=rank)
            sampler = loader().sampler
            assert isinstance(sampler, DistributedSampler)  # which Lightning leaves as it is
            shards.append(list(sampler))
        del dm.trainer
        assert sorted(sum(shards, [])) == list(range(len(windows)))
        assert shards[0] == list(range(0, len(windows), world))
    assert len(dm.val_windows) % world != 0  # 63: padding would have repeated windows


def test_time_lookups_map_starts_to_timestamps(default_module):
    dm = default_module
    batch = next(iter(dm.test_dataloader()))
    start = int(batch["start"][3])
    times = dm.window_times(start)
    assert len(times) == 24 and times[0] == dm.dataset.index[start]
    targets = dm.target_times(batch["start"])
    assert targets.shape == (16, 12)
    assert pd.Timestamp(targets[3, 11]) == dm.dataset.index[start + 12 + 11]
    # the time features of the batch are those of these timestamps
    assert batch["time"][3, 12, 0].item() == times[12].dayofweek
    with pytest.raises(IndexError):
        dm.window_times(dm.dataset.num_steps - 5)


def test_too_short_series_names_the_file(tmp_path):
    index = pd.date_range("2024-01-01", periods=100, freq="5min", name="timestamp")
    pd.DataFrame({"a": np.arange(100.0) + 1, "b": 2.0}, index=index).to_csv(tmp_path / "short.csv")
    dm = GMANDataModule(dataset=str(tmp_path / "short.csv"))
    with pytest.raises(DataError, match=r"short.csv: 100 steps .* too few steps \(val 10, test 20\)"):
        dm.setup()


def test_word2vec_embedding_rows_follow_the_graph_order(tmp_path):
    index = pd.date_range("2024-01-01", periods=400, freq="5min", name="timestamp")
    rng = np.random.default_rng(0)
    pd.DataFrame(rng.uniform(40, 60, (400, 3)), index=index, columns=["c", "a", "b"]).to_csv(tmp_path / "v.csv")
    (tmp_path / "g.csv").write_text("a,b,c\n1,0.5,0\n0,1,0.5\n0,0,1\n")  # graph order a, b, c
    vectors = np.array([[1.0, 1.0], [2.0, 2.0], [3.0, 3.0]], dtype=np.float32)  # rows: a, b, c
    write_word2vec(tmp_path / "se.txt", vectors)
    dm = GMANDataModule(dataset=str(tmp_path / "v.csv"), graph_path=str(tmp_path / "g.csv"),
                        spatial_embedding=str(tmp_path / "se.txt"))
    dm.setup()
    assert dm.sensor_ids == ["c", "a", "b"]
    assert dm.spatial_embedding.dtype == torch.float32
    assert dm.spatial_embedding[:, 0].tolist() == [3.0, 1.0, 2.0]
    assert dm.dataset.adjacency[1, 2] == 0.5  # a -> b, in the data's order


def test_word2vec_rows_of_graph_nodes_without_data_are_skipped(tmp_path):
    index = pd.date_range("2024-01-01", periods=400, freq="5min", name="timestamp")
    rng = np.random.default_rng(0)
    pd.DataFrame(rng.uniform(40, 60, (400, 2)), index=index, columns=["c", "a"]).to_csv(tmp_path / "v.csv")
    (tmp_path / "g.csv").write_text("a,b,c\n1,0.5,0\n0,1,0.5\n0,0,1\n")  # b: a graph node without data
    write_word2vec(tmp_path / "se.txt", np.array([[1.0, 1.0], [2.0, 2.0], [3.0, 3.0]], dtype=np.float32))
    dm = GMANDataModule(dataset=str(tmp_path / "v.csv"), graph_path=str(tmp_path / "g.csv"),
                        options={"unmatched_sensors": "drop"}, spatial_embedding=str(tmp_path / "se.txt"))
    with pytest.warns(UserWarning, match="kept the 2 sensors in both"):
        dm.setup()
    assert dm.sensor_ids == ["c", "a"]
    assert dm.spatial_embedding[:, 0].tolist() == [3.0, 1.0]


def test_node2vec_embedding_rows_follow_the_data_sensor_order(tmp_path):
    # graph file in the order a..f (two triangles a-b-c and d-e-f); data columns interleave them
    index = pd.date_range("2024-01-01", periods=400, freq="5min", name="timestamp")
    columns = ["d", "a", "e", "b", "f", "c"]
    rng = np.random.default_rng(0)
    pd.DataFrame(rng.uniform(40, 60, (400, 6)), index=index, columns=columns).to_csv(tmp_path / "v.csv")
    graph = np.kron(np.eye(2), np.ones((3, 3)))
    header = "a,b,c,d,e,f\n"
    (tmp_path / "g.csv").write_text(header + "\n".join(",".join(f"{w:g}" for w in row) for row in graph) + "\n")
    options = {"dim": 8, "walks_per_node": 10, "walk_length": 10, "window": 3, "steps": 100, "cache_dir": False}
    dm = GMANDataModule(dataset=str(tmp_path / "v.csv"), graph_path=str(tmp_path / "g.csv"),
                        spatial_embedding="node2vec", node2vec_options=options)
    dm.setup()
    assert dm.sensor_ids == columns
    unit = torch.nn.functional.normalize(dm.spatial_embedding, dim=1)
    cosine = unit @ unit.T
    same = torch.tensor([[(i % 2) == (j % 2) for j in range(6)] for i in range(6)])  # d, e, f at 0, 2, 4
    off_diagonal = ~torch.eye(6, dtype=torch.bool)
    assert cosine[same & off_diagonal].min() > cosine[~same].max()


def test_node2vec_embedding_is_cached(tmp_path, monkeypatch):
    from gman.data import embedding

    options = {"dim": 8, "walks_per_node": 4, "walk_length": 10, "steps": 5, "cache_dir": str(tmp_path)}
    dm = GMANDataModule(options=SMALL, spatial_embedding="node2vec", node2vec_options=options)
    dm.setup()
    assert dm.spatial_embedding.shape == (12, 8)
    assert len(list(tmp_path.glob("*.txt"))) == 1

    def no_walks(*args, **kwargs):
        raise AssertionError("node2vec recomputed despite the cached file")

    monkeypatch.setattr(embedding, "BiasedRandomWalker", no_walks)
    again = GMANDataModule(options=SMALL, spatial_embedding="node2vec", node2vec_options=options)
    again.setup()
    assert torch.equal(again.spatial_embedding, dm.spatial_embedding)


def test_card_split_and_missing_value(tmp_path, monkeypatch):
    index = pd.date_range("2024-01-01", periods=500, freq="5min", name="timestamp")
    frame = pd.DataFrame({"s1": np.linspace(1, 50, 500), "s2": 3.0}, index=index)
    frame.iloc[5, 0] = -1.0
    frame.to_csv(tmp_path / "values.csv")
    registry = types.ModuleType("gman.data.registry")
    registry.card_reader_options = lambda name: {
        "values_path": str(tmp_path / "values.csv"), "split": [0.6, 0.2, 0.2], "missing_value": -1.0}
    monkeypatch.setitem(sys.modules, "gman.data.registry", registry)
    dm = GMANDataModule(dataset="pems-like")
    dm.setup()
    assert dm.split_ranges == [(0, 300), (300, 400), (400, 500)]
    assert dm.missing_value == -1.0 and not dm.dataset.mask[5, 0] and dm.dataset.name == "pems-like"
    explicit = GMANDataModule(dataset="pems-like", split=[0.7, 0.1, 0.2], missing_value=None)
    explicit.setup()
    assert explicit.split_ranges[0] == (0, 350) and explicit.missing_value is None and explicit.dataset.mask.all()


def test_bad_settings_are_config_errors():
    with pytest.raises(ConfigError, match="spatial_embedding"):
        GMANDataModule(spatial_embedding="node2vek")
    with pytest.raises(ConfigError, match="sum to 1"):
        GMANDataModule(split=[0.5, 0.1, 0.1])
    with pytest.raises(ConfigError, match="history_steps"):
        GMANDataModule(history_steps=0)
    with pytest.raises(ConfigError, match="unknown option 'colour'"):
        GMANDataModule(options={"colour": "red"}).setup()
    frame = pd.DataFrame({"a": np.arange(300.0) + 1}, index=pd.date_range("2024-01-01", periods=300, freq="5min"))
    dm = GMANDataModule(spatial_embedding="node2vec")
    dm.load = lambda: __import__("gman.data.readers", fromlist=["x"]).load_dataset(frame)
    with pytest.raises(ConfigError, match="node2vec needs a graph"):
        dm.setup()


def test_configurable_from_yaml():
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(GMANDataModule, "data")
    config = parser.parse_string(
        "data:\n  dataset: synthetic\n  options: {num_sensors: 12, days: 3}\n  split: [0.6, 0.2, 0.2]\n"
        "  missing_value: null\n  batch_size: 8\n"
    )
    dm = parser.instantiate_classes(config).data
    dm.setup()
    assert dm.num_nodes == 12 and dm.split_ranges[0] == (0, 518) and dm.batch_size == 8


def test_a_card_name_wins_over_a_same_named_folder_and_values_path_alone_names_the_file(tmp_path, monkeypatch):
    from gman.data.readers import source_is_path

    monkeypatch.chdir(tmp_path)
    (tmp_path / "pems04").mkdir()  # e.g. the folder a user unpacked the download into
    assert not source_is_path("pems04") and source_is_path("pems04/PEMS04.npz")
    assert not source_is_path("mine")  # neither a card nor a file: loading it says "unknown dataset"
    (tmp_path / "mine").mkdir()
    assert source_is_path("mine")  # no card of that name: the existing folder
    index = pd.date_range("2024-01-01", periods=400, freq="5min", name="timestamp")
    pd.DataFrame({"s1": np.linspace(1, 50, 400), "s2": 3.0}, index=index).to_csv(tmp_path / "values.csv")
    dm = GMANDataModule(values_path=str(tmp_path / "values.csv"), history_steps=4, horizon_steps=4)
    dm.setup()
    assert dm.sensor_ids == ["s1", "s2"] and dm.split_ranges == [(0, 280), (280, 320), (320, 400)]


def test_a_training_split_without_readings_is_named_in_the_error(tmp_path):
    index = pd.date_range("2024-01-01", periods=300, freq="5min", name="timestamp")
    values = np.zeros((300, 2))
    values[250:] = 40.0  # readings only after the training split (0 = missing)
    pd.DataFrame(values, index=index, columns=["s1", "s2"]).to_csv(tmp_path / "late.csv")
    dm = GMANDataModule(dataset=str(tmp_path / "late.csv"), history_steps=4, horizon_steps=4)
    with pytest.raises(DataError, match=r"late\.csv: training split \(steps 0\.\.209\): no observed readings to fit the scaler"):
        dm.setup()


def test_model_layout_reorders_and_drops_sensors_and_converts_the_time_zone(tmp_path):
    """What ``gman evaluate`` asks for: the checkpoint's sensor order (graph rows and columns alike) and its zone."""
    full = GMANDataModule(options=SMALL)
    reference = full.load()
    frame = reference.to_frame().tz_localize("UTC")
    path = tmp_path / "utc.csv"
    frame.to_csv(path, index_label="timestamp")
    graph = tmp_path / "graph.csv"
    pd.DataFrame(reference.adjacency).to_csv(graph, header=False, index=False)
    wanted = list(reversed(reference.sensor_ids[2:]))                   # two sensors dropped, the rest reversed
    dm = GMANDataModule(dataset=str(path), graph_path=str(graph), graph_sensor_ids=list(reference.sensor_ids))
    dm.use_model_layout(wanted, "America/Los_Angeles")
    dm.setup("test")
    got = dm.dataset
    assert dm.sensor_ids == wanted and str(got.index.tz) == "America/Los_Angeles"
    assert got.index.equals(frame.index.tz_convert("America/Los_Angeles"))
    columns = [reference.sensor_ids.index(s) for s in wanted]
    np.testing.assert_array_equal(got.values, reference.values[:, columns])
    np.testing.assert_array_equal(got.mask, reference.mask[:, columns])
    np.testing.assert_array_equal(got.adjacency, reference.adjacency[np.ix_(columns, columns)])
    assert got.graph_order().tolist() == columns  # node-indexed files (a spatial embedding) still map by id
    # local clock times: 00:00 UTC is 16:00 or 17:00 the day before in Los Angeles
    assert got.time_features()[0, 1] in (16 * 12, 17 * 12)

    lacking = GMANDataModule(dataset=str(path))
    lacking.use_model_layout(["nowhere", *reference.sensor_ids])
    with pytest.raises(DataError, match=r"utc.csv: 1 of the model's 13 sensors are not in the data \(first: 'nowhere'\)"):
        lacking.setup("test")
    with pytest.raises(RuntimeError, match="before setup"):
        dm.use_model_layout(wanted)


def test_data_from_python_a_dataframe_a_sensor_dataset_with_a_graph_in_memory_and_a_path(tmp_path):
    from pathlib import Path

    from gman.data.readers import load_dataset

    reference = GMANDataModule(options=SMALL).load()
    frame = reference.to_frame()
    dm = GMANDataModule(dataset=frame)
    dm.setup("fit")
    assert dm.hparams.dataset == "dataframe" and dm.sensor_ids == reference.sensor_ids  # no object in the hparams
    np.testing.assert_array_equal(dm.dataset.values, reference.values)
    # a graph held in memory: an array in the data's order, or a DataFrame matched by id
    by_id = pd.DataFrame(reference.adjacency, index=reference.sensor_ids, columns=reference.sensor_ids).iloc[::-1, ::-1]
    for adjacency in (reference.adjacency, by_id):
        np.testing.assert_array_equal(load_dataset(frame, adjacency=adjacency).adjacency, reference.adjacency)
    with_graph = GMANDataModule(dataset=load_dataset(frame, adjacency=by_id), spatial_embedding="node2vec",
                                node2vec_options={"dim": 4, "steps": 5})
    with_graph.setup("fit")
    assert with_graph.spatial_embedding.shape == (reference.num_nodes, 4)
    path = tmp_path / "series.csv"
    frame.to_csv(path, index_label="timestamp")
    from_path = GMANDataModule(dataset=Path(path), spatial_embedding=None)
    from_path.setup("fit")
    assert from_path.hparams.dataset == str(path) and from_path.spatial_embedding is None
    with pytest.raises(ConfigError, match="data.dataset: expected a card name, 'synthetic', a file path, a pandas "
                                          "DataFrame or a SensorDataset, got int"):
        GMANDataModule(dataset=3)
    with pytest.raises(ConfigError, match=r"reader options \(interval\) do not apply"):
        load_dataset(reference, interval="5min")
    with pytest.raises(DataError, match="adjacency: expected a square numeric matrix"):
        load_dataset(frame, adjacency=np.zeros((3, 4)))
    with pytest.raises(ConfigError, match="adjacency: given together with graph_path"):
        load_dataset(frame, adjacency=reference.adjacency, graph_path="g.csv")
