"""``gman train`` and ``gman evaluate``.

``gman train`` parses ``model`` (GMANLightningModule), ``data``
(GMANDataModule) and ``trainer`` sections with LightningCLI (YAML via
``--config``, any key overridable as ``--section.key value``), then runs:

    data set-up → fit (checkpoints, early stopping, lr monitor) → test with the best
    checkpoint → baselines on the same windows → horizons.csv, plots, model package
    → MLflow (params, metrics, artifacts, pyfunc model) → rename the output folder

The output folder is built as ``<output_dir>.partial`` and renamed to
``<output_dir>`` only when everything is written, so a folder without the
suffix is always complete.  An interrupted run (crash, SIGKILL) leaves the
``.partial`` folder with ``run.json`` (the MLflow run id), the resolved
``config.yaml`` and ``checkpoints/last.ckpt`` (saved at every epoch end);
``gman train --resume <folder>`` continues it into the same MLflow run, with the
settings of its ``config.yaml``: only those of :data:`RESUME_MAY_CHANGE` may be
changed (a changed one is recorded in a ``gman.resume.<n>`` tag).  SIGTERM at any
point once the MLflow run exists ends it KILLED (exit 143), as inside Lightning's
fit and test (:class:`_SigtermEndsTheRun`).

What a resumed run reproduces: ``last.ckpt`` is written at every epoch end
(after validation) and holds the weights, Adam's moments, the lr scheduler,
early stopping and the best-checkpoint bookkeeping; a run killed mid-epoch
replays that epoch from its start.  The replay visits the same batches (the
data module's ``EpochSeededRandomSampler``: the order depends only on seed and
epoch) with the same dropout masks (the module reseeds torch before every
batch from seed, epoch and batch index), so on the same machine and thread
count the resumed run ends with bit-identical weights and test metrics
(checked by tests/test_cli_train.py).  Not bit-exact: a different thread
count, device or library version (float summation order), GPU kernels that
are non-deterministic unless ``trainer.deterministic`` is set,
``trainer.max_time`` (stops by the clock), and mid-epoch validation
(``trainer.val_check_interval`` < 1) which checkpoints inside an epoch.  In
MLflow the replayed epoch's training metrics appear twice (once from the
killed process, once from the replay, at the same steps).

Under DDP (``trainer.strategy: ddp``; see docs/multi-gpu.md) every process
runs this command, but only global rank 0 creates the folder and the MLflow
run and writes anything; the other ranks train, evaluate and exit.

``gman evaluate`` re-scores a checkpoint (``--checkpoint``) or the best
checkpoint of an MLflow run (``--run_id``) on a data set's test split (by
default the one it was trained on) and writes the same table, csv and plots.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from gman.errors import ConfigError, DataError

DEFAULT_RUNS_DIR = "runs"
PARTIAL_SUFFIX = ".partial"
CONFIG_FILE = "config.yaml"
RUN_FILE = "run.json"
CHECKPOINT_DIR = "checkpoints"
BEST_CHECKPOINT = "best"
LAST_CHECKPOINT = "last.ckpt"
HORIZONS_CSV = "horizons.csv"
ERRORS_PLOT = "error_by_horizon.png"
FORECAST_PLOT = "forecast_vs_truth.png"
PACKAGE_DIR = "model"
MONITOR = "val_mae"
# DDP: rank 0 puts its run folder here for the ranks Lightning's launcher starts (they re-run the command)
RUN_DIR_ENV = "GMAN_RUN_DIR"
# where launchers put a process's rank (Lightning's launcher, torchrun, SLURM, LSF)
RANK_ENV_KEYS = ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK")

# `gman train` without --config: the built-in synthetic network and a small, fast
# model (experiments/demo.yaml spells the same values out).  With --config, unset
# values are the classes' own defaults (the authors' METR-LA settings, except L = 3, the
# paper's best, and a learnable spatial embedding where no graph is configured), not these.
DEMO_DEFAULTS: dict[str, Any] = {
    "model.num_layers": 1,
    "model.num_heads": 2,
    "model.head_dim": 8,
    "model.se_dim": 16,
    "model.dropout": 0.0,
    "model.learning_rate": 0.005,
    "model.lr_decay_every": 2,
    "data.dataset": "synthetic",
    "data.batch_size": 16,
    "data.eval_batch_size": 64,
    "data.spatial_embedding": "node2vec",  # of the built-in road graph (16 dims = model.se_dim, ~1 s, cached)
    "trainer.max_epochs": 6,
    "trainer.limit_train_batches": 100,  # an "epoch" = 100 random batches (1,600 of the 5,622 windows)
    # One intra-op thread: a model this small gains little from a second one, and on a busy
    # 2-core machine two threads spin in barriers (measured 4x the CPU time, 2x the wall time).
    "threads": 1,
}
TRAIN_DESCRIPTION = (
    "Train GMAN, test the best checkpoint against two baselines, log everything to MLflow. "
    "Without --config: the built-in synthetic data set and a small demo model (experiments/demo.yaml). "
    "With --config FILE.yaml: that file over the classes' defaults (the authors' METR-LA settings, except "
    "L = 3 and a learnable spatial embedding unless data.spatial_embedding says node2vec). Any key can be "
    "overridden, e.g. "
    "--trainer.max_epochs 20 --model.num_layers 3 --data.batch_size 32."
)
# Settings `gman train --resume` may change: when training stops, where it runs, what it reports and
# where the results go.  None of them changes what the checkpoint's training means.  Any other change
# (model, data, optimiser and lr schedule, batch sizes, seed, callbacks, precision, ...) would continue
# the run as another one than it started as (and the optimiser and lr scheduler restored from the
# checkpoint would override model.learning_rate anyway), so it is refused.
RESUME_MAY_CHANGE = (
    "trainer.max_epochs", "trainer.max_steps", "trainer.max_time", "patience",           # when it stops
    "trainer.accelerator", "trainer.devices", "trainer.num_nodes", "trainer.strategy",   # where it runs
    "threads", "data.num_workers",  # the batches' order and content do not depend on the loader processes
    "trainer.enable_progress_bar", "trainer.enable_model_summary", "trainer.log_every_n_steps",  # reporting
    "tracking_uri", "register",  # how the store is reached (the run must be in it), the registry name
)
TRAINER_DEFAULTS: dict[str, Any] = {
    "accelerator": "auto",
    "devices": 1,
    "log_every_n_steps": 10,
    "enable_model_summary": False,
}


# ---------------------------------------------------------------- parsing
def _one_line(message: str) -> str:
    return " ".join(part.strip() for part in str(message).splitlines() if part.strip())


def _parse_error(err: Exception) -> str:
    """jsonargparse's error as one line; its "Does not validate against any of the Union subtypes"
    report (every subtype, every error) is shortened to the key, the value and what it takes."""
    import re

    text = _one_line(err)
    key = re.search(r'Parser key "([^"]+)"', text)
    subtypes = re.search(r"Subtypes: \[(.*)\] Errors:", text)
    given = re.search(r"Given value: (.*)$", text)
    if not (key and subtypes and given and "Union subtypes" in text):
        return text
    kinds = re.sub(r"typing\.Literal\[([^\]]*)\]", lambda m: m.group(1).replace(", ", " | "), subtypes.group(1))
    kinds = re.sub(r"<class '([^']+)'>", lambda m: {"NoneType": "null", "bool": "true | false"}.get(m.group(1), m.group(1)),
                   kinds)
    kinds = kinds.replace("list[float]", "a list of numbers, e.g. [0.7, 0.1, 0.2]")
    return f"{key.group(1)}: {given.group(1)!r} is not valid; expected {kinds}"


def _lightning_cli_class():
    from lightning.pytorch.cli import LightningCLI

    class GMANCli(LightningCLI):
        """LightningCLI that parses and builds the model and data module; the trainer comes later.

        The trainer needs the output folder and the MLflow run, which are
        decided only once the data has loaded, so ``instantiate_classes``
        leaves it out and :func:`train` calls ``instantiate_trainer``.
        """

        use_demo_defaults = True

        def add_arguments_to_parser(self, parser) -> None:
            parser.add_argument("--output_dir", "--output-dir", type=str | None, default=None,
                                help="run folder (default: runs/<experiment>-<timestamp>)")
            parser.add_argument("--experiment", type=str | None, default=None,
                                help="MLflow experiment (default: the dataset's name)")
            parser.add_argument("--tracking_uri", "--tracking-uri", type=str | None, default=None,
                                help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db "
                                     "in the working directory)")
            parser.add_argument("--register", type=str | None, default=None,
                                help="also register the packaged model under this name in the MLflow registry")
            parser.add_argument("--patience", type=int, default=10,
                                help="early stopping: epochs without a better validation MAE")
            parser.add_argument("--threads", type=int | None, default=None,
                                help="torch CPU threads for training (default: torch's choice; 1 in the demo "
                                     "of gman train without --config)")
            parser.add_argument("--resume", type=str | None, default=None,
                                help="continue the interrupted run in this folder (its .partial folder)")
            if self.use_demo_defaults:
                parser.set_defaults(DEMO_DEFAULTS)

        def parse_arguments(self, parser, args) -> None:
            # `gman train` always passes its own argv; skip LightningCLI's warning about sys.argv
            self.config = parser.parse_args(args)

        def instantiate_classes(self) -> None:
            _node2vec_width_from_model(self.config)
            _absolute_data_paths(self.config)
            instantiate = getattr(self.parser, "instantiate", None) or self.parser.instantiate_classes
            self.config_init = instantiate(self.config)
            self.datamodule = self._get(self.config_init, "data")
            self.model = self._get(self.config_init, "model")
            self.trainer = None

    return GMANCli


def _check_config_files(argv: list[str]) -> None:
    """Each ``--config FILE`` must be a readable YAML mapping whose sections are mappings (jsonargparse
    would otherwise fail with a traceback, or print the whole file in its message)."""
    import yaml

    files = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a in ("-c", "--config")]
    files += [a.split("=", 1)[1] for a in argv if a.startswith("--config=")]
    for name in files:
        path = Path(name)
        if not path.is_file():
            raise ConfigError(f"--config: {path}: no such file")
        try:
            content = yaml.safe_load(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError:
            raise ConfigError(f"--config: {path}: not a text file (a YAML config is expected)") from None
        except yaml.YAMLError as err:
            raise ConfigError(f"--config: {path}: not valid YAML ({_one_line(err)})") from None
        if content is None:
            continue
        if not isinstance(content, dict):
            raise ConfigError(f"--config: {path}: expected a YAML mapping of sections (model:, data:, trainer:, ...), "
                              f"got a {type(content).__name__}")
        for section in ("model", "data", "trainer"):
            if content.get(section) is not None and not isinstance(content[section], dict):
                raise ConfigError(f"--config: {path}: section {section!r} must be a mapping of settings, "
                                  f"got {content[section]!r}")


_PATH_OPTIONS = ("values_path", "graph_path", "graph_sensor_ids", "sensor_ids")


def _absolute_data_paths(config) -> None:
    """Relative file paths in ``data`` are read from the working directory; they are made absolute here
    so that the run's config.yaml (used by ``gman evaluate`` and ``--resume``) works from anywhere."""
    from gman.data.readers import source_is_path

    data = config.data

    def absolute(value):
        return str(Path(value).resolve()) if isinstance(value, str) and Path(value).exists() else value

    if isinstance(data.dataset, str) and data.dataset != "synthetic" and source_is_path(data.dataset):
        data.dataset = absolute(data.dataset)
    for key in _PATH_OPTIONS:
        if hasattr(data, key):
            setattr(data, key, absolute(getattr(data, key)))
    if data.spatial_embedding not in ("learnable", "node2vec"):
        data.spatial_embedding = absolute(data.spatial_embedding)
    if data.options:
        data.options = {k: absolute(v) if k in _PATH_OPTIONS else v for k, v in data.options.items()}


def _node2vec_width_from_model(config) -> None:
    """A node2vec embedding is computed ``model.se_dim`` wide (it would be 64 otherwise, and the
    model would silently take that width); an explicit, different ``dim`` is an error."""
    data, model = config.data, config.model
    if data.spatial_embedding != "node2vec":
        return
    options = dict(data.node2vec_options or {})
    dim = options.get("dim")
    if dim is not None and dim != model.se_dim:
        raise ConfigError(f"data.node2vec_options.dim {dim} differs from model.se_dim {model.se_dim}; set one of them")
    options["dim"] = model.se_dim
    data.node2vec_options = options


def parse_train_args(argv: list[str]):
    """LightningCLI on ``argv``; unknown keys and bad values become one-line ConfigErrors."""
    from gman.data.datamodule import GMANDataModule
    from gman.training.module import GMANLightningModule

    _check_config_files(argv)
    cli_class = _lightning_cli_class()
    cli_class.use_demo_defaults = not any(a in ("-c", "--config") or a.startswith("--config=") for a in argv)
    try:
        return cli_class(
            GMANLightningModule,
            GMANDataModule,
            run=False,
            args=argv,
            save_config_callback=None,
            trainer_defaults=TRAINER_DEFAULTS,
            seed_everything_default=0,
            auto_configure_optimizers=False,
            load_from_checkpoint_support=False,
            parser_kwargs={"exit_on_error": False, "prog": "gman train", "description": TRAIN_DESCRIPTION},
        )
    except argparse.ArgumentError as err:
        raise ConfigError(_parse_error(err)) from None


def _split_resume(argv: list[str]) -> tuple[list[str], Path | None]:
    """Take ``--resume FOLDER`` out of ``argv``: the folder's saved config must be parsed first."""
    rest, folder = [], None
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--resume":
            if i + 1 >= len(argv):
                raise ConfigError("--resume: expected the folder of an interrupted run")
            folder, i = argv[i + 1], i + 2
            continue
        if arg.startswith("--resume="):
            folder = arg.split("=", 1)[1]
        else:
            rest.append(arg)
        i += 1
    return rest, (Path(folder) if folder else None)


def _resume_folder(folder: Path) -> Path:
    """The ``.partial`` folder of an interrupted run, given it or its final name."""
    candidates = [folder] if folder.name.endswith(PARTIAL_SUFFIX) else [
        folder.with_name(folder.name + PARTIAL_SUFFIX), folder]
    for candidate in candidates:
        if (candidate / RUN_FILE).is_file() and (candidate / CONFIG_FILE).is_file():
            if not candidate.name.endswith(PARTIAL_SUFFIX):
                raise ConfigError(f"--resume: {candidate} is a finished run; nothing to resume")
            return candidate
    raise ConfigError(f"--resume: {folder} is not the folder of an interrupted gman run "
                      f"(no {RUN_FILE} and {CONFIG_FILE} in it)")


# ------------------------------------------------------------- utilities
def _flatten(config: dict, prefix: str = "", lists: bool = False) -> dict[str, Any]:
    """``{"a": {"b": 1}}`` as ``{"a.b": 1}``; with ``lists``, a list of mappings by index too (``trainer.callbacks``:
    ``trainer.callbacks.0.class_path``, ``trainer.callbacks.0.init_args.decay``)."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value and key not in ("spatial_attention_options",):
            flat.update(_flatten(value, f"{name}.", lists))
        elif lists and isinstance(value, list) and value and all(isinstance(item, dict) for item in value):
            for index, item in enumerate(value):
                flat.update(_flatten(item, f"{name}.{index}.", lists))
        else:
            flat[name] = value
    return flat


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def _log_params(logger, params: dict[str, Any]) -> None:
    """Log settings as MLflow params; on a resumed run only those not logged yet (params are immutable)."""
    from mlflow.entities import Param
    from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

    client, run_id = logger.experiment, logger.run_id
    existing = client.get_run(run_id).data.params
    items = [Param(k, str(v)[:MAX_PARAM_VAL_LENGTH]) for k, v in params.items() if k not in existing]
    for lo in range(0, len(items), 100):
        client.log_batch(run_id, params=items[lo:lo + 100])


def _print(*lines: str) -> None:
    for line in lines:
        print(line, flush=True)


# ----------------------------------------------------------------- train
def _folder_name(experiment: str) -> str:
    """The experiment's name as one folder name (``runs/<it>-<time stamp>``): path separators, ``..``,
    spaces, quotes and shell wildcards become ``-`` (MLflow keeps the name as given)."""
    import re

    return re.sub(r"[^\w.-]+", "-", experiment).strip(".-") or "run"


def _check_new_run_folder(final_dir: Path) -> None:
    """Refuse a run folder that exists, finished or (``.partial``) interrupted."""
    work_dir = final_dir.with_name(final_dir.name + PARTIAL_SUFFIX)
    if final_dir.exists():
        raise ConfigError(f"output_dir: {final_dir} already exists; choose another --output_dir")
    if work_dir.exists():
        raise ConfigError(f"output_dir: {work_dir} (an interrupted run) exists; resume it with --resume {work_dir} "
                          "or choose another --output_dir")


def train(argv: list[str]) -> int:
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    argv, resume = _split_resume(list(argv))
    # DDP: Lightning's launcher re-runs this command for ranks 1.. (torchrun / SLURM start every rank);
    # only global rank 0 creates the run folder and the MLflow run and writes anything.
    writer = _launch_rank_is_zero()
    saved_run: dict[str, Any] = {}
    if resume is not None:
        work_dir = _resume_folder(resume).resolve()  # the paths run.json and config.yaml record stay absolute
        saved_run = json.loads((work_dir / RUN_FILE).read_text())
        argv = ["--config", str(work_dir / CONFIG_FILE), *_settings_older_runs_had(work_dir / CONFIG_FILE), *argv]
    cli = parse_train_args(argv)
    config = cli.config
    if config.patience < 1:
        raise ConfigError(f"patience: expected an integer >= 1 (epochs without a better validation MAE), got {config.patience}")
    datamodule, module = cli.datamodule, cli.model
    if config.threads is not None:
        if config.threads < 1:
            raise ConfigError(f"threads: expected an integer >= 1, got {config.threads}")
        import torch

        torch.set_num_threads(config.threads)

    from gman.training.tracking import check_run_to_resume, resolve_tracking_uri, without_password

    if config.tracking_uri:  # stored absolute (a relative sqlite path would mean another file after a cd)
        config.tracking_uri = resolve_tracking_uri(config.tracking_uri)
    tracking_uri = resolve_tracking_uri(config.tracking_uri or saved_run.get("tracking_uri"))
    if resume is None and config.output_dir and writer:  # before minutes of data loading
        _check_new_run_folder(Path(config.output_dir).resolve())
    resume_changes = _resume_changes(cli, work_dir / CONFIG_FILE) if resume is not None else None
    if resume is not None and writer:  # a store without the run: nothing is created there, run.json is untouched
        tracking_uri = _with_password_again(tracking_uri)
        check_run_to_resume(tracking_uri, saved_run.get("run_id") or "")
    if without_password(tracking_uri) != tracking_uri:
        # MLflow prints "View run ... at: <the URI with its password>" when a run on a server ends
        os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    # Data and network first: a bad file or setting stops here, before any folder or MLflow run exists.
    datamodule.prepare_data()
    datamodule.setup("fit")
    module.build_for(datamodule)
    _check_sync_batchnorm(config, module)

    from gman.training.tracking import OtherRankLogger, code_version_tags, make_logger, unusable_store

    dataset_name = datamodule.dataset.name
    experiment = config.experiment or saved_run.get("experiment") or dataset_name
    if resume is not None:
        final_dir = work_dir.with_name(work_dir.name[: -len(PARTIAL_SUFFIX)])
    else:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        default_dir = Path(DEFAULT_RUNS_DIR) / f"{_folder_name(experiment)}-{stamp}"
        final_dir = Path(config.output_dir or default_dir).resolve()
        if not writer and os.environ.get(RUN_DIR_ENV):
            final_dir = Path(os.environ[RUN_DIR_ENV])  # rank 0's folder (its time stamp may differ from ours)
        work_dir = final_dir.with_name(final_dir.name + PARTIAL_SUFFIX)
        if writer:
            _check_new_run_folder(final_dir)
    if writer and final_dir.exists():
        raise ConfigError(f"output_dir: {final_dir} already exists; cannot finish the resumed run into it")

    trainer = _build_trainer(cli, work_dir, writer)
    if writer:
        try:
            logger = make_logger(experiment, tracking_uri, run_id=saved_run.get("run_id"), run_name=final_dir.name,
                                 tags={"gman.output_dir": str(final_dir), "gman.dataset": dataset_name,
                                       **code_version_tags()})
        except ConfigError:
            raise
        except Exception as err:  # noqa: BLE001 - MLflow raises many kinds for an unusable store
            raise unusable_store(tracking_uri, err) from None
    else:
        logger = OtherRankLogger()
    # held while this run trains and reports: a second gman train on the same folder is refused, and this
    # one only ever cleans up a folder it holds (before, a second run's failure removed the first's .partial)
    claimed = _claimed_run_folder(work_dir, resuming=bool(resume)) if writer else contextlib.nullcontext()
    sigterm = _SigtermEndsTheRun() if writer else contextlib.nullcontext()
    with claimed, sigterm:
        try:
            result = _fit_test_and_report(cli, trainer, logger, work_dir, final_dir, experiment, tracking_uri,
                                          resume_changes, writer)
            if writer:
                sigterm.ignore()  # everything is logged; what is left takes milliseconds and must not be cut short
                _complete_run(logger, work_dir, final_dir, result["best_checkpoint"])
        except BaseException as err:
            if writer:
                sigterm.ignore()  # a second SIGTERM must not cut the marking of the run short
                # Lightning turns Ctrl-C into SystemExit(1) after its own clean-up
                logger.finish(_end_status(err))
                _handle_failed_folder(work_dir, err)
            if isinstance(err, SystemExit) and not err.code:
                # Lightning stops on SIGTERM with a bare SystemExit (status 0): a killed run must not look successful
                raise SystemExit(128 + signal.SIGTERM) from None
            raise
    if writer:
        _print(result["table"], "", f"MLflow run: {result['run_id']} (experiment {experiment!r}, "
                                    f"{without_password(tracking_uri)})",
               str(final_dir))
    return 0


class _SigtermEndsTheRun:
    """While installed (``with``), SIGTERM stops ``gman train`` as it does inside ``trainer.fit``.

    Lightning handles SIGTERM only inside ``trainer.fit`` / ``trainer.test``: its handler notes the
    signal and the loops raise ``SIGTERMException`` at the next batch, which :func:`train` turns into a
    KILLED run, the resume hint and exit status 143.  Around them (set-up, baselines, plots, the model's
    logging and registration) the default action would end the process on the spot and leave the MLflow
    run RUNNING forever; this handler raises the same exception there.  Inside fit/test Lightning
    installs its own handler and calls the one it found (this one) after it; this one then leaves the
    stop to Lightning, so the graceful stop at a batch boundary and its clean-up are unchanged.
    """

    def __init__(self) -> None:
        self._previous = None
        self._ignoring = False
        # signal handlers can only be set from the main thread (train() called from another: left as it is)
        self._active = threading.current_thread() is threading.main_thread()

    def __enter__(self) -> "_SigtermEndsTheRun":
        if self._active:
            self._previous = signal.signal(signal.SIGTERM, self)
        return self

    def __exit__(self, *exc_info) -> None:
        if self._active:
            signal.signal(signal.SIGTERM, self._previous)

    def ignore(self) -> None:
        """From now on SIGTERM is ignored: the run is being completed or marked FAILED / KILLED."""
        self._ignoring = True

    def __call__(self, signum, frame) -> None:
        from lightning.pytorch.utilities.exceptions import SIGTERMException

        if self._ignoring or signal.getsignal(signal.SIGTERM) is not self:
            return  # not installed itself: Lightning's handler called it, and its loops stop at the next batch
        self._ignoring = True
        raise SIGTERMException()


def _stop_if_sigterm_was_noted(trainer) -> None:
    """Lightning's loops act on a SIGTERM only at their checks; one that arrives after the last check of
    ``fit`` or ``test`` (saving the last checkpoint, tear-down) is noted in ``trainer.received_sigterm``
    and would otherwise be forgotten when the next stage resets it."""
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    if trainer.received_sigterm:
        raise SIGTERMException()


def _complete_run(logger, work_dir: Path, final_dir: Path, best_name: str) -> None:
    """The run's last step: the folder gets its final name, run.json and the MLflow run say FINISHED."""
    os.replace(work_dir, final_dir)
    run = json.loads((final_dir / RUN_FILE).read_text())
    run.update(status="FINISHED", best_checkpoint=str(final_dir / CHECKPOINT_DIR / best_name))
    _write_json(final_dir / RUN_FILE, run)
    logger.finish("FINISHED")


def _resume_changes(cli, saved_config: Path) -> list[tuple[str, Any, Any]]:
    """(key, saved value, new value) for each setting of a resumed run that differs from its config.yaml.

    Raises a ConfigError for the first one not in :data:`RESUME_MAY_CHANGE`, before anything is written.
    Keys the saved config lacks (settings added to gman after the run started) are not compared.
    """
    import yaml

    saved = _flatten(yaml.safe_load(saved_config.read_text()) or {})
    # compared as written (the saved tracking URI has no password), so the password is not recorded either
    now = _flatten(_without_secrets(yaml.safe_load(cli.parser.dump(cli.config, skip_none=False)) or {}))
    changes = [(key, saved[key], value) for key, value in now.items() if key in saved and saved[key] != value]
    for key, old, new in changes:
        if key not in RESUME_MAY_CHANGE:
            raise ConfigError(f"--resume: {key} cannot change when a run is resumed ({_setting_text(old)} -> "
                              f"{_setting_text(new)}); a resume may change only {', '.join(RESUME_MAY_CHANGE)}; "
                              "start a new run for other settings")
    return changes


def _setting_text(value: Any) -> str:
    return json.dumps(value, default=str)


def _record_resume(logger, changes: list[tuple[str, Any, Any]]) -> None:
    """Tag ``gman.resume.<n>`` on the MLflow run with what this resume changed (its params keep the values
    the run started with: MLflow params cannot change), and say it on the console.  A different gman
    version or commit than the run's tags name (those of its start) is listed too."""
    from mlflow.utils.validation import MAX_TAG_VAL_LENGTH

    from gman.training.tracking import code_version_tags

    client, run_id = logger.experiment, logger.run_id
    tags = client.get_run(run_id).data.tags
    changes = [*changes, *((key, tags.get(key), value) for key, value in code_version_tags().items()
                           if tags.get(key) != value)]
    previous = [k for k in tags if k.startswith("gman.resume.")]
    text = "; ".join(f"{key}: {_setting_text(old)} -> {_setting_text(new)}" for key, old, new in changes)
    text = text or "settings unchanged"
    client.set_tag(run_id, f"gman.resume.{len(previous) + 1}", text[:MAX_TAG_VAL_LENGTH])
    _print(f"resuming MLflow run {run_id}: {text}")


def _with_password_again(tracking_uri: str) -> str:
    """The URI of a resumed run's store with its password: gman wrote it as ``user:***@host`` (see
    :func:`~gman.training.tracking.without_password`), so the password comes from ``--tracking_uri`` given
    again (then it is not masked here) or from ``MLFLOW_TRACKING_URI`` naming the same store."""
    from gman.training.tracking import has_masked_password, without_password

    if not has_masked_password(tracking_uri):
        return tracking_uri
    from_environment = os.environ.get("MLFLOW_TRACKING_URI")
    if from_environment and without_password(from_environment) == tracking_uri:
        return from_environment
    raise ConfigError(f"tracking_uri: {tracking_uri}: the run's store needs its password, which gman does not "
                      "write down; give the URI again with --tracking_uri or MLFLOW_TRACKING_URI")


def _launch_rank_is_zero() -> bool:
    """Whether this process is global rank 0, read from the launcher's environment.

    Known before any trainer exists: Lightning's own launcher starts ranks > 0 with
    ``LOCAL_RANK`` (and ``NODE_RANK`` on other nodes), torchrun sets ``RANK``, SLURM
    ``SLURM_PROCID``, LSF ``JSM_NAMESPACE_RANK``.  Rank 0 is the process for which
    none of them is set to anything but 0.  :func:`_fit_test_and_report` checks the
    answer against ``trainer.global_rank`` before anything is written.
    """
    return all(os.environ.get(key, "0").strip() in ("", "0") for key in RANK_ENV_KEYS)


def _check_sync_batchnorm(config, module) -> None:
    """``trainer.sync_batchnorm`` would silently drop GMAN's batch norm (see ``SYNC_BATCHNORM_ERROR``)."""
    from gman.model import BatchNorm
    from gman.training.module import SYNC_BATCHNORM_ERROR

    trainer_config = getattr(config, "trainer", None)
    if getattr(trainer_config, "sync_batchnorm", False) and any(
            isinstance(m, BatchNorm) for m in module.net.modules()):
        raise ConfigError(SYNC_BATCHNORM_ERROR.format(batch_norm=module.hparams.batch_norm))


def _settings_older_runs_had(config_file: Path) -> list[str]:
    """Arguments that keep a run written by an older gman resuming as it started: before session 9
    the scaler was fitted on observed readings only (now ``data.normalisation: authors`` by default)."""
    import yaml

    data = (yaml.safe_load(config_file.read_text()) or {}).get("data") or {}
    return [] if "normalisation" in data else ["--data.normalisation", "observed"]


def _end_status(err: BaseException) -> str:
    """MLflow's run status for a run that ended with ``err``: KILLED for Ctrl-C or SIGTERM, else FAILED."""
    return "KILLED" if isinstance(err, (KeyboardInterrupt, SystemExit)) else "FAILED"


@contextlib.contextmanager
def _claimed_run_folder(work_dir: Path, resuming: bool):
    """Make the run's ``.partial`` folder (a new run: it must not exist) and hold a lock on it while the
    block runs.  Another process training into the same folder, or resuming it, gets a one-line ConfigError."""
    import fcntl

    try:
        work_dir.mkdir(parents=True, exist_ok=resuming)
    except FileExistsError:
        raise ConfigError(f"output_dir: {work_dir} was just created by another gman train; choose another "
                          "--output-dir") from None
    except OSError as err:
        raise ConfigError(f"output_dir: cannot create {work_dir}: {err.strerror}") from None
    handle = os.open(work_dir, os.O_RDONLY)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(handle)
        raise ConfigError(f"--resume: {work_dir} is being trained by another gman train process") from None
    try:
        yield
    finally:
        os.close(handle)  # releases the lock


def _handle_failed_folder(work_dir: Path, err: BaseException) -> None:
    """A failed run keeps its ``.partial`` folder only where there is a checkpoint to resume from."""
    last = work_dir / CHECKPOINT_DIR / LAST_CHECKPOINT
    if not work_dir.exists():
        return
    if last.is_file():
        try:
            run = json.loads((work_dir / RUN_FILE).read_text())
            run.update(status=_end_status(err), error=_one_line(f"{type(err).__name__}: {err}"))
            _write_json(work_dir / RUN_FILE, run)
        except (OSError, ValueError):
            pass
        print(f"gman: run interrupted; resume it with: gman train --resume {work_dir}", file=sys.stderr)
    else:
        shutil.rmtree(work_dir, ignore_errors=True)


def _early_stopping_class():
    from lightning.pytorch.callbacks import EarlyStopping

    class EarlyStoppingKeepingPatience(EarlyStopping):
        """Lightning's EarlyStopping with the configured patience also on ``--resume``.

        The stock callback restores ``patience`` from the checkpoint, so a resume could not change it;
        and ``trainer.should_stop`` is not saved, so a run whose early stopping had fired before it was
        stopped (during its test or report) would train another epoch when resumed.  Here such a run
        stops at once, unless the new patience is larger than the epochs it has waited.
        """

        @property
        def state_key(self) -> str:
            # the stock class's key, so that checkpoints written with either class restore into both
            return f"EarlyStopping{dict(monitor=self.monitor, mode=self.mode)!r}"

        def load_state_dict(self, state_dict: dict[str, Any]) -> None:
            patience = self.patience
            super().load_state_dict(state_dict)
            self.patience = patience

        def on_train_start(self, trainer, pl_module) -> None:
            super().on_train_start(trainer, pl_module)
            if self.wait_count >= self.patience:
                trainer.should_stop = True

    return EarlyStoppingKeepingPatience


def _build_trainer(cli, work_dir: Path, writer: bool):
    """The Lightning trainer with gman's callbacks, still without its logger: built before the MLflow
    experiment is touched, so that a trainer setting Lightning refuses leaves nothing behind."""
    from lightning.fabric.utilities.exceptions import MisconfigurationException
    from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint

    config = cli.config
    # every rank gets the same callbacks; ModelCheckpoint takes rank 0's folder (a broadcast) and only
    # rank 0 saves, but all ranks track the best checkpoint, which they all load for the test stage
    checkpoint = ModelCheckpoint(dirpath=work_dir / CHECKPOINT_DIR, filename=BEST_CHECKPOINT, monitor=MONITOR,
                                 mode="min", save_top_k=1, save_last=True, enable_version_counter=False)
    callbacks = [checkpoint, _early_stopping_class()(monitor=MONITOR, mode="min", patience=config.patience),
                 LearningRateMonitor(logging_interval="epoch")]
    user_callbacks = cli._get(cli.config_init, "trainer", default={}).get("callbacks") or []
    try:
        trainer = cli.instantiate_trainer(logger=False, callbacks=[*callbacks, *list(user_callbacks)],
                                          default_root_dir=str(work_dir))
    except (MisconfigurationException, ModuleNotFoundError, ValueError, RuntimeError) as err:
        # e.g. max_epochs -2, an accelerator whose package is missing, devices more than the machine has
        raise ConfigError(f"trainer: {_one_line(err)}") from None
    environment = getattr(trainer.strategy, "cluster_environment", None)  # none for one device
    if environment is not None and environment.creates_processes_externally:
        # torchrun / SLURM started the processes: Lightning would check devices × num_nodes against their
        # number only inside fit, after rank 0 had created the MLflow run
        try:
            environment.validate_settings(num_devices=trainer.num_devices, num_nodes=trainer.num_nodes)
        except ValueError as err:
            raise ConfigError(f"trainer: {_one_line(err)}") from None
    if trainer.is_global_zero != writer:  # e.g. a stray SLURM_PROCID=1 in a one-process run; nothing written yet
        raise ConfigError(f"trainer: the launcher's environment ({_rank_environment()}) and Lightning (global rank "
                          f"{trainer.global_rank} of {trainer.world_size}) disagree on whether this process is rank 0; "
                          f"match trainer.devices / trainer.num_nodes to the launcher or unset those variables")
    return trainer


def _fit_test_and_report(cli, trainer, logger, work_dir: Path, final_dir: Path, experiment: str, tracking_uri: str,
                         resume_changes: list[tuple[str, Any, Any]] | None, writer: bool = True) -> dict[str, Any]:
    """Fit, test and report; ``resume_changes`` is None for a new run, else the settings a resume changed."""
    from gman.training.module import DATA_DERIVED, data_hparams
    from gman.training.tracking import without_password

    config, datamodule, module = cli.config, cli.datamodule, cli.model
    resuming = resume_changes is not None
    trainer.logger = logger

    last = work_dir / CHECKPOINT_DIR / LAST_CHECKPOINT
    ckpt_path = str(last) if resuming and last.is_file() else None
    if not writer:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
        run_test_on_best_checkpoint(trainer, module, datamodule)
        return {"table": "", "run_id": None, "best_checkpoint": None}

    try:  # the folder exists: train() claimed it
        run_id = logger.run_id  # creates (or reopens) the MLflow run now, so run.json can name it
    except Exception as err:  # noqa: BLE001 - e.g. a read-only sqlite store whose experiment exists
        from gman.training.tracking import unusable_store

        raise unusable_store(tracking_uri, err) from None
    if resuming:
        # reopened, the run shows RUNNING again (not KILLED / FAILED while it trains); MLflow keeps its old
        # end time until the run ends, as mlflow.start_run(run_id=...) does
        logger.experiment.update_run(run_id, status="RUNNING")
        _record_resume(logger, resume_changes)
    # a resumed run's config.yaml takes the settings the resume changed (RESUME_MAY_CHANGE)
    config_yaml = _set_output_dir(cli.parser.dump(config, skip_none=False), final_dir)
    (work_dir / (CONFIG_FILE + ".tmp")).write_text(config_yaml)
    os.replace(work_dir / (CONFIG_FILE + ".tmp"), work_dir / CONFIG_FILE)
    _write_json(work_dir / RUN_FILE, {"run_id": run_id, "experiment": experiment,
                                      "tracking_uri": without_password(tracking_uri),
                                      "output_dir": str(final_dir), "status": "RUNNING"})

    # run-control options are not settings; data-derived model sizes are logged from the data (data_derived.*)
    params = {k: v for k, v in _flatten(config.as_dict(), lists=True).items()
              if not k.startswith(("resume", "register", "config", "trainer.logger"))
              and not (k.startswith("model.") and k[len("model."):] in DATA_DERIVED and v is None)}
    params.update({f"data_derived.{k}": v for k, v in data_hparams(datamodule, config.model.se_dim).items()})
    if params.get("tracking_uri"):
        params["tracking_uri"] = without_password(params["tracking_uri"])
    _log_params(logger, params)
    logger.experiment.log_artifact(run_id, str(work_dir / CONFIG_FILE))

    # ranks started by Lightning's launcher (inside fit) re-run this command: tell them rank 0's folder
    previous = os.environ.get(RUN_DIR_ENV)
    os.environ[RUN_DIR_ENV] = str(final_dir)
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    finally:
        if previous is None:
            os.environ.pop(RUN_DIR_ENV, None)
        else:
            os.environ[RUN_DIR_ENV] = previous
    _stop_if_sigterm_was_noted(trainer)
    run_test_on_best_checkpoint(trainer, module, datamodule)
    _stop_if_sigterm_was_noted(trainer)
    return _report(module, datamodule, trainer.checkpoint_callback, logger, work_dir, final_dir, config.register)


def run_test_on_best_checkpoint(trainer, module, datamodule) -> None:
    """Test the best checkpoint's weights.

    With a weight-averaging callback (Lightning's ``EMAWeightAveraging`` /
    ``WeightAveraging`` in ``trainer.callbacks``) validation, and so the choice of
    the best checkpoint, used the averaged weights, which the checkpoint holds as
    its ``state_dict``; the callback would put the live weights (its
    ``current_model_state``) back when the checkpoint is loaded, so it is detached
    for the test stage.
    """
    import warnings

    from lightning.pytorch.callbacks import WeightAveraging

    detached = [c for c in trainer.callbacks if isinstance(c, WeightAveraging)]
    for callback in detached:
        trainer.callbacks.remove(callback)
    with warnings.catch_warnings():
        if detached:  # Lightning's reminder to pass the checkpoint's callbacks: left out on purpose
            warnings.filterwarnings("ignore", message=".*callbacks used to create the checkpoint.*")
        trainer.test(module, datamodule=datamodule, ckpt_path="best", verbose=False)


def _rank_environment() -> str:
    return ", ".join(f"{key}={os.environ[key]}" for key in RANK_ENV_KEYS if key in os.environ) or "no rank variables"


def _set_output_dir(config_yaml: str, final_dir: Path) -> str:
    """The resolved config with ``output_dir`` fixed to the run's folder (so ``--resume`` finds it again),
    and no password in ``tracking_uri``."""
    import yaml

    data = _without_secrets(yaml.safe_load(config_yaml))
    data["output_dir"] = str(final_dir)
    data["resume"] = None
    return yaml.safe_dump(data, sort_keys=False)


def _without_secrets(settings: dict) -> dict:
    """The settings (a loaded config) with the tracking URI's password masked."""
    from gman.training.tracking import without_password

    if settings.get("tracking_uri"):
        settings = {**settings, "tracking_uri": without_password(settings["tracking_uri"])}
    return settings


def _report(module, datamodule, checkpoint, logger, work_dir: Path, final_dir: Path,
            register: str | None) -> dict[str, Any]:
    """Baselines, table, csv, plots, package, MLflow artifacts and model. Rank 0 only.

    A resumed run whose first attempt was stopped here does it all again (the metrics are logged again
    at the same step, the artifacts overwritten) except the model: one already logged complete (READY)
    by the run is not logged again, nor registered again under a name that has a version from the run.
    """
    import mlflow

    from gman.serving.package import save_package
    from gman.serving.pyfunc import log_model
    from gman.training import evaluate
    from gman.training.module import horizon_metric_names

    results, table = score_test_split(module, datamodule)
    interval_minutes = module.hparams.interval_minutes
    units = getattr(datamodule.dataset, "units", "")
    evaluate.write_horizons_csv(work_dir / HORIZONS_CSV, results, interval_minutes)
    evaluate.plot_errors_by_horizon(work_dir / ERRORS_PLOT, results, interval_minutes, units)
    day = evaluate.forecast_one_day(module, datamodule.dataset, datamodule.test_windows)
    evaluate.plot_forecast_vs_truth(work_dir / FORECAST_PLOT, day, units)

    best = Path(checkpoint.best_model_path)
    best_name = best.name
    package = save_package(work_dir / PACKAGE_DIR, module.net, **module.package_fields(datamodule))

    client, run_id = logger.experiment, logger.run_id
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    step = module.global_step
    baseline_metrics = []
    for name, errors in results.items():
        if name == evaluate.MODEL_NAME:
            continue
        prefix = "baseline_" + name.replace(" ", "_")
        for key, value in horizon_metric_names(errors, interval_minutes, prefix=prefix).items():
            baseline_metrics.append(Metric(key, value, now, step))
    for lo in range(0, len(baseline_metrics), 500):
        client.log_batch(run_id, metrics=baseline_metrics[lo:lo + 500])
    for name in (HORIZONS_CSV, ERRORS_PLOT, FORECAST_PLOT):
        client.log_artifact(run_id, str(work_dir / name))
    client.log_artifact(run_id, str(best), artifact_path=CHECKPOINT_DIR)
    with mlflow.start_run(run_id=run_id):
        model_uri = _model_logged_by(client, run_id)
        if model_uri is None:
            log_model(package, artifact_path=PACKAGE_DIR, registered_model_name=register)
        elif register and not any(version.name == register  # the name compared here: it may hold quotes
                                  for version in client.search_model_versions(f"run_id = '{run_id}'")):
            mlflow.register_model(model_uri, register)
    client.set_tag(run_id, "gman.best_checkpoint", f"{CHECKPOINT_DIR}/{best_name}")
    return {"table": table, "run_id": run_id, "best_checkpoint": best_name}


def _model_logged_by(client, run_id: str) -> str | None:
    """URI of the complete (READY) model package a run has logged, if any (a resumed run's first attempt
    may have logged it before it was stopped)."""
    from mlflow.entities import LoggedModelStatus

    run = client.get_run(run_id)
    models = client.search_logged_models(experiment_ids=[run.info.experiment_id],
                                         filter_string=f"source_run_id = '{run_id}' AND name = '{PACKAGE_DIR}'")
    ready = [m for m in models if m.status == LoggedModelStatus.READY]
    return f"models:/{ready[0].model_id}" if ready else None


def _observed_training_mean(datamodule) -> float:
    """Mean of the observed training readings: the last-value baseline's forecast for a sensor with no
    reading in its history (the scaler's mean counts missing readings as 0 under the authors' normalisation)."""
    import numpy as np

    start, stop = datamodule.split_ranges[0]
    dataset = datamodule.dataset
    observed = dataset.values[start:stop][dataset.mask[start:stop]]
    return float(observed.mean(dtype=np.float64)) if observed.size else float(datamodule.scaler.mean)


def score_test_split(module, datamodule) -> tuple[dict, str]:
    """{model name: HorizonErrors} for GMAN (from ``trainer.test``) and both baselines, and the table."""
    from gman.training import evaluate

    windows = datamodule.test_windows
    # the windows GMAN was scored on (all of them, unless trainer.limit_test_batches cut the test short)
    starts = module.test_window_starts if module.test_window_starts is not None else windows.starts
    baselines = evaluate.score_baselines(
        datamodule.dataset, tuple(datamodule.split_ranges[0]), starts, windows.history_steps,
        windows.horizon_steps, fallback=_observed_training_mean(datamodule))
    results = {evaluate.MODEL_NAME: module.test_errors, **baselines}
    return results, evaluate.format_table(results, module.hparams.interval_minutes)


# -------------------------------------------------------------- evaluate
def _training_config_near(checkpoint: Path) -> Path | None:
    """The run's ``config.yaml`` for a checkpoint inside a run folder (``<run>/checkpoints/x.ckpt``)."""
    for folder in (checkpoint.parent, checkpoint.parent.parent):
        if (folder / CONFIG_FILE).is_file():
            return folder / CONFIG_FILE
    return None


def _fetch_run(run_id: str, tracking_uri: str, into: Path) -> tuple[Path, Path | None, str]:
    """Download the best checkpoint and the config of an MLflow run; returns (checkpoint, config, the
    checkpoint's artifact path)."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from gman.training.tracking import without_password

    client = MlflowClient(tracking_uri)
    try:
        run = client.get_run(run_id)
    except MlflowException:
        raise ConfigError(f"--run_id: no MLflow run {run_id!r} in {without_password(tracking_uri)}") from None
    best = run.data.tags.get("gman.best_checkpoint")
    if not best:
        raise ConfigError(f"--run_id: run {run_id} has no best checkpoint logged (did it finish?)")
    checkpoint = Path(client.download_artifacts(run_id, best, str(into)))
    try:
        config = Path(client.download_artifacts(run_id, CONFIG_FILE, str(into)))
    except (MlflowException, OSError):
        config = None
    return checkpoint, config, best


def _evaluate_parser(data_defaults: dict[str, Any]):
    from jsonargparse import ArgumentParser

    from gman.data.datamodule import GMANDataModule

    parser = ArgumentParser(
        prog="gman evaluate", exit_on_error=False,
        description="Re-evaluate a checkpoint or an MLflow run on a data set's test split. The data settings "
                    "default to those the model was trained with (the run's config.yaml); override any of them "
                    "with --data.KEY VALUE, or all with --data FILE.yaml.")
    parser.add_argument("--checkpoint", type=str | None, default=None, help="a .ckpt written by gman train")
    parser.add_argument("--run_id", "--run-id", type=str | None, default=None,
                        help="an MLflow run of gman train (its best checkpoint is used)")
    parser.add_argument("--tracking_uri", "--tracking-uri", type=str | None, default=None,
                        help="MLflow tracking URI for --run_id (default as for gman train)")
    parser.add_argument("--output_dir", "--output-dir", type=str | None, default=None,
                        help="output folder (default runs/evaluate-<dataset>-<timestamp>)")
    parser.add_class_arguments(GMANDataModule, "data")
    parser.set_defaults({f"data.{k}": v for k, v in data_defaults.items()})
    return parser


def evaluate_command(argv: list[str]) -> int:
    """``gman evaluate``: test metrics, baselines, table, csv and plots for a trained model."""
    import tempfile

    import yaml

    from gman.training.tracking import resolve_tracking_uri

    # Where the model comes from decides the data defaults, so read those two options first.
    pre = argparse.ArgumentParser(add_help=False)
    for names in (("--checkpoint",), ("--run_id", "--run-id"), ("--tracking_uri", "--tracking-uri")):
        pre.add_argument(*names)
    known, _ = pre.parse_known_args(argv)
    if any(arg in ("-h", "--help") for arg in argv):
        _evaluate_parser({}).parse_args(["--help"])  # prints the options and exits
    if bool(known.checkpoint) == bool(known.run_id):
        raise ConfigError("gman evaluate: give exactly one of --checkpoint PATH or --run_id ID")
    with tempfile.TemporaryDirectory(prefix="gman-evaluate-") as tmp:
        if known.run_id:
            checkpoint, train_config, artifact = _fetch_run(known.run_id, resolve_tracking_uri(known.tracking_uri), Path(tmp))
        else:
            checkpoint = Path(known.checkpoint)
            if not checkpoint.is_file():
                raise ConfigError(f"--checkpoint: {checkpoint} does not exist")
            train_config = _training_config_near(checkpoint)
        data_defaults = {}
        if train_config is not None:
            data_defaults = (yaml.safe_load(train_config.read_text()) or {}).get("data") or {}
        try:
            args = _evaluate_parser(data_defaults).parse_args(argv)
        except argparse.ArgumentError as err:
            raise ConfigError(_parse_error(err)) from None
        source = None
        if train_config is not None:
            source = str(train_config) if known.checkpoint else f"config.yaml (MLflow run {known.run_id})"
        # a run's checkpoint is downloaded into a temporary folder: name it by the run instead
        label = None if known.checkpoint else f"MLflow run {known.run_id}, artifact {artifact}"
        return _evaluate(checkpoint, args, source, label)


def _evaluate(checkpoint: Path, args, train_config: str | None = None, checkpoint_label: str | None = None) -> int:
    import pickle
    import warnings

    import lightning as L
    import torch

    from gman.data.datamodule import GMANDataModule
    from gman.training import evaluate
    from gman.training.module import GMANLightningModule

    try:
        with warnings.catch_warnings():  # torch's note on the pickle protocol of a file it then refuses
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            module = GMANLightningModule.load_from_checkpoint(str(checkpoint), map_location="cpu")
    except (RuntimeError, KeyError, TypeError, EOFError, OSError, IndexError, pickle.UnpicklingError) as err:
        # torch's unpickler fails on a text file with KeyError(105), IndexError...: such details say nothing
        detail = _one_line(err)[:120]
        if isinstance(err, pickle.UnpicklingError) and "weights only" in detail.lower():
            detail = ": it holds Python objects beyond tensors and plain containers, which a weights-only load refuses"
        elif isinstance(err, (IndexError, EOFError, pickle.UnpicklingError)) or not detail or detail.strip("'\"").isdigit():
            detail = ""
        else:
            detail = f" ({detail})"
        raise ConfigError(f"--checkpoint: {checkpoint} is not a gman checkpoint (a .ckpt file written by "
                          f"gman train){detail}") from None
    try:
        # the checkpoint holds the trained spatial embedding: none is computed from the data's graph
        datamodule = GMANDataModule(**{**args.data.as_dict(), "spatial_embedding": "learnable"})
        # the inputs are normalised as in training: the checkpoint's scaler, not one fitted again (runs from
        # before session 9 have no normalisation setting and no missing input: theirs was 0)
        # ... and its sensors in the model's order, timestamps in its time zone (older checkpoints: as given)
        datamodule.use_trained(module)
        datamodule.prepare_data()
        datamodule.setup("test")
    except (ConfigError, DataError) as err:
        if train_config is None:
            raise
        # the data settings not given on the command line came from the training run
        raise type(err)(f"{err} (data settings default to the training run's {train_config}; "
                        "override them with --data.KEY VALUE or --data FILE.yaml)") from None
    hp = module.hparams
    for name in ("num_nodes", "history_steps", "horizon_steps", "steps_per_day"):
        if int(hp[name]) != int(getattr(datamodule, name)):
            raise ConfigError(f"data: {name} = {getattr(datamodule, name)} does not match the checkpoint's "
                              f"{hp[name]} ({checkpoint})")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    final_dir = Path(args.output_dir or Path(DEFAULT_RUNS_DIR) / f"evaluate-{datamodule.dataset.name}-{stamp}")
    final_dir = final_dir.resolve()
    if final_dir.exists():
        raise ConfigError(f"output_dir: {final_dir} already exists; choose another --output_dir")
    work_dir = final_dir.with_name(final_dir.name + PARTIAL_SUFFIX)
    work_dir.mkdir(parents=True, exist_ok=False)
    try:
        trainer = L.Trainer(logger=False, enable_checkpointing=False, enable_model_summary=False,
                            default_root_dir=str(work_dir), accelerator="auto", devices=1)
        trainer.test(module, datamodule=datamodule, verbose=False)
        results, table = score_test_split(module, datamodule)
        units = getattr(datamodule.dataset, "units", "")
        evaluate.write_horizons_csv(work_dir / HORIZONS_CSV, results, hp.interval_minutes)
        evaluate.plot_errors_by_horizon(work_dir / ERRORS_PLOT, results, hp.interval_minutes, units)
        with torch.no_grad():
            day = evaluate.forecast_one_day(module, datamodule.dataset, datamodule.test_windows)
        evaluate.plot_forecast_vs_truth(work_dir / FORECAST_PLOT, day, units)
        os.replace(work_dir, final_dir)
    except BaseException:
        shutil.rmtree(work_dir, ignore_errors=True)
        raise
    _print(table, "", f"checkpoint: {checkpoint_label or checkpoint}", str(final_dir))
    return 0


def main(command: str, argv: list[str]) -> int:
    from gman.allocator import keep_freed_memory

    keep_freed_memory()
    if command == "train":
        return train(argv)
    if command == "evaluate":
        return evaluate_command(argv)
    raise ConfigError(f"gman.training.cli: unknown command {command!r}")
