"""MLflow set-up: where runs go, and Lightning's MLFlowLogger pointed there.

Default store: an embedded sqlite database in the working directory
(``sqlite:///<cwd>/mlflow.db``) with artifacts beside it in ``<cwd>/mlruns``,
so nothing has to be started and ``mlflow ui --backend-store-uri
sqlite:///mlflow.db`` shows the runs.  ``MLFLOW_TRACKING_URI`` or the
``tracking_uri`` setting points elsewhere (a server, another database).

Two facts of MLflow 3 on a plain machine shape this module: a tracking URI
that is a bare folder selects the deprecated file store, which raises unless
``MLFLOW_ALLOW_FILE_STORE`` is set, and an experiment created in a sqlite
store without an explicit artifact location puts its artifacts in
``./mlruns`` of whatever the *current* directory happens to be.  So the
experiment is always created here, with an absolute artifact location.
"""
from __future__ import annotations

import contextlib
import functools
import os
from pathlib import Path

from lightning.pytorch.loggers import Logger, MLFlowLogger
from lightning.pytorch.utilities import rank_zero_only

from gman.errors import ConfigError

DEFAULT_DB_NAME = "mlflow.db"
DEFAULT_ARTIFACT_DIR = "mlruns"


def resolve_tracking_uri(setting: str | None = None, workdir: str | Path | None = None) -> str:
    """The tracking URI to use: the setting, else ``MLFLOW_TRACKING_URI``, else the embedded sqlite store."""
    uri = setting or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        workdir = Path(workdir or os.getcwd()).resolve()
        return f"sqlite:///{workdir / DEFAULT_DB_NAME}"
    if "://" not in uri and not uri.startswith(("sqlite:", "databricks")):
        raise ConfigError(
            f"tracking_uri: {uri!r} is not a URI; use sqlite:///<path>/mlflow.db or http://host:port"
        )
    return _absolute_sqlite_path(uri, workdir)


def _absolute_sqlite_path(uri: str, workdir: str | Path | None) -> str:
    """``sqlite:///rel.db`` (three slashes: relative to the working directory) as ``sqlite:////abs/rel.db``.

    The URI is stored in the run's ``run.json`` and ``config.yaml``; a relative one would point
    ``--resume`` (or ``gman evaluate --run_id``) from another directory at another, empty database.
    Other schemes are left alone; a bare path or a ``file:rel`` URI has no ``://`` and is refused above.
    """
    if not uri.startswith("sqlite:///"):
        return uri
    path, query_mark, query = uri[len("sqlite:///"):].partition("?")
    if not path or path == ":memory:" or Path(path).is_absolute():
        return uri
    absolute = os.path.abspath(Path(workdir or os.getcwd()).resolve() / path)
    return f"sqlite:///{absolute}{query_mark}{query}"


PASSWORD_MASK = "***"


def without_password(uri: str) -> str:
    """The URI with its password (``scheme://user:PASSWORD@host``), if any, replaced by ``***``.

    The form in which gman writes or prints a tracking URI: the MLflow param, ``config.yaml``,
    ``run.json``, the console, error messages.
    """
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(uri)
    except ValueError:
        return uri
    if not parts.password:  # none, or empty (``user:@host``): nothing to hide, and a resume needs nothing back
        return uri
    userinfo, _, hostport = parts.netloc.rpartition("@")
    user = userinfo.partition(":")[0]
    return parts._replace(netloc=f"{user}:{PASSWORD_MASK}@{hostport}").geturl()


def scrub_password(text: str, uri: str) -> str:
    """``text`` (e.g. an exception's message, which may quote the URI) with the URI's password masked:
    wherever it stands as ``:PASSWORD@`` (the URI quoted), and also alone when it is long enough (8
    characters or more) not to be an everyday word or a letter of the message."""
    from urllib.parse import urlsplit

    try:
        password = urlsplit(uri).password
    except ValueError:
        return text
    if not password:
        return text
    text = text.replace(f":{password}@", f":{PASSWORD_MASK}@")
    return text.replace(password, PASSWORD_MASK) if len(password) >= 8 else text


def has_masked_password(uri: str | None) -> bool:
    """Whether the URI is one written by gman without its password (``user:***@host``)."""
    from urllib.parse import urlsplit

    try:
        return bool(uri) and urlsplit(uri).password == PASSWORD_MASK
    except ValueError:
        return False


def check_run_to_resume(tracking_uri: str, run_id: str) -> None:
    """Raise a ConfigError unless the MLflow run ``run_id`` is in the store at ``tracking_uri``.

    Called before ``--resume`` writes anything: MLflow would otherwise create an empty sqlite
    database where the URI points and then fail deep inside Lightning's logger.
    """
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    shown_uri = without_password(tracking_uri)
    if tracking_uri.startswith("sqlite:///"):
        db_path = Path(tracking_uri[len("sqlite:///"):].partition("?")[0])
        if not db_path.is_file():
            raise ConfigError(f"--resume: the run's MLflow store {shown_uri} does not exist (no file {db_path}); "
                              "give its URI with --tracking_uri")
    try:
        run = MlflowClient(tracking_uri).get_run(run_id)
    except MlflowException as err:
        if err.error_code == "RESOURCE_DOES_NOT_EXIST":
            raise ConfigError(f"--resume: MLflow run {run_id} is not in {shown_uri}; give the URI of the store "
                              "it was started in with --tracking_uri") from None
        raise unusable_store(tracking_uri, err) from None
    except Exception as err:  # noqa: BLE001 - an unreachable server or database raises many kinds
        raise unusable_store(tracking_uri, err) from None
    if run.info.lifecycle_stage == "deleted":
        raise ConfigError(f"--resume: MLflow run {run_id} in {shown_uri} was deleted; restore it (mlflow runs "
                          "restore) or start a new run")


def unusable_store(tracking_uri: str, err: BaseException) -> ConfigError:
    """The one-line error for a store MLflow cannot use, with no password in it."""
    detail = " ".join(part.strip() for part in str(err).splitlines() if part.strip())[:200]
    return ConfigError(f"tracking_uri: {without_password(tracking_uri)}: cannot use this MLflow tracking store "
                       f"({type(err).__name__}: {scrub_password(detail, tracking_uri)})")


def default_artifact_location(tracking_uri: str) -> str | None:
    """Absolute artifact folder for a sqlite store (``mlruns`` beside the database); None lets a server choose."""
    if tracking_uri.startswith("sqlite:///"):
        db_path = Path(tracking_uri[len("sqlite:///"):])
        return (db_path.parent / DEFAULT_ARTIFACT_DIR).resolve().as_uri()
    return None


@contextlib.contextmanager
def _store_lock(tracking_uri: str):
    """Serialise first use of a sqlite store across processes.

    Two ``gman train`` processes started together on a new ``mlflow.db`` both
    run MLflow's schema migration and one fails ("table _alembic_tmp_...
    already exists"); an advisory lock on ``<db>.lock`` makes the second wait.
    """
    if not tracking_uri.startswith("sqlite:///"):
        yield
        return
    try:
        import fcntl
    except ImportError:  # no advisory locks on this platform
        yield
        return
    lock_path = Path(tracking_uri[len("sqlite:///"):]).with_suffix(".lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def ensure_experiment(name: str, tracking_uri: str) -> str:
    """Id of the experiment called ``name``, created (with an explicit artifact location) if needed."""
    from mlflow.tracking import MlflowClient

    with _store_lock(tracking_uri):
        client = MlflowClient(tracking_uri)
        experiment = client.get_experiment_by_name(name)
        if experiment is not None:
            if experiment.lifecycle_stage == "deleted":
                client.restore_experiment(experiment.experiment_id)
            return experiment.experiment_id
        return client.create_experiment(name, artifact_location=default_artifact_location(tracking_uri))


def code_version_tags() -> dict[str, str]:
    """A copy of :func:`_code_version_tags`, which asks git once per process (a resume compares them again)."""
    return dict(_code_version_tags())


@functools.lru_cache(maxsize=1)
def _code_version_tags() -> dict[str, str]:
    """``gman.version`` and, where the imported gman package is tracked in a git checkout, the checkout's
    HEAD as ``mlflow.source.git.commit`` (no such tag if git is missing, slow or says otherwise).

    MLflow derives that tag from ``sys.argv[0]``, which for the ``gman`` console script is in the virtual
    environment, not in the checkout.  "Tracked" rules out a copy installed into a virtual environment
    that happens to lie inside some other repository.
    """
    import subprocess

    from mlflow.utils.mlflow_tags import MLFLOW_GIT_COMMIT

    import gman

    tags = {"gman.version": gman.__version__}
    package_dir = Path(gman.__file__).resolve().parent

    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", "-C", str(package_dir), *args], capture_output=True, text=True, timeout=5)

    try:
        if git("ls-files", "--error-unmatch", Path(gman.__file__).name).returncode == 0:
            head = git("rev-parse", "HEAD")
            if head.returncode == 0 and head.stdout.strip():
                tags[MLFLOW_GIT_COMMIT] = head.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return tags


def make_logger(experiment_name: str, tracking_uri: str, run_id: str | None = None, run_name: str | None = None,
                tags: dict[str, str] | None = None):
    """Lightning's MLFlowLogger on ``tracking_uri``; ``run_id`` reopens an existing run (``--resume``).

    The run stays RUNNING when Lightning finishes ``fit`` or ``test`` (see
    :class:`RunFinishedByCaller`): it is done only after the caller has
    logged the test tables, plots and model.
    """
    ensure_experiment(experiment_name, tracking_uri)
    return RunFinishedByCaller(
        experiment_name=experiment_name,
        tracking_uri=tracking_uri,
        run_id=run_id,
        run_name=run_name,
        tags=tags,
        artifact_location=default_artifact_location(tracking_uri),
        log_model=False,  # the best checkpoint and the serving package are logged by the caller
    )


class RunFinishedByCaller(MLFlowLogger):
    """MLFlowLogger whose successful ``finalize`` does not end the run.

    Lightning finalises its loggers after ``fit`` and again after ``test``;
    the stock logger marks the run FINISHED at the first one, while ``gman
    train`` still has to test, score the baselines and log the outputs.  A
    failure ("failed") is still recorded at once; success is recorded by
    :meth:`finish`.
    """

    def finalize(self, status: str = "success") -> None:
        if status == "failed":
            super().finalize(status)

    @rank_zero_only
    def finish(self, status: str = "FINISHED") -> None:
        """Mark the run terminated (FINISHED, FAILED or KILLED) if it was ever started."""
        if self._initialized:
            self.experiment.set_terminated(self.run_id, status)


class OtherRankLogger(Logger):
    """The logger of DDP ranks other than 0: logs nothing and never opens the MLflow store.

    Lightning logs from rank 0 only anyway; the other ranks still need a logger
    for callbacks that require one (``LearningRateMonitor``).
    """

    @property
    def name(self) -> str:
        return ""

    @property
    def version(self) -> str:
        return ""

    def log_metrics(self, metrics, step=None) -> None:
        pass

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass

    def finish(self, status: str = "FINISHED") -> None:
        pass
