"""Dataset cards (``datasets/<name>/dataset.yaml``): what a data set is, where its files come from.

A card names the series file and the graph file of a data set, how to read
them (format, interval, start time for files without timestamps, units, the
missing-value convention, the PEMS0X feature), the standard split, the
license, and for every file its size, sha256 and download URL(s).  The data
files themselves sit beside the card, git-ignored.

Where things are looked for:

- cards: ``$GMAN_DATASETS_DIR/<name>/dataset.yaml`` first, then the checkout's
  ``datasets/<name>/dataset.yaml`` (the built-in cards);
- data files: ``<data root>/<name>/``, where the data root is
  ``$GMAN_DATASETS_DIR`` when set, else the checkout's ``datasets/`` folder.
  A pip-installed gman has no checkout: set ``GMAN_DATASETS_DIR``.

Card schema (YAML)::

    name: metr-la                      # = folder name
    title: one line
    description: a paragraph
    interval: 5min
    start_time: null                   # for files without timestamps (npz, Los-loop CSV)
    units: mph
    missing_value: 0                   # reading that means "missing" besides NaN; null = NaN only
    split: [0.7, 0.1, 0.2]             # train / val / test fractions, chronological
    license: text
    values: {file: metr-la.h5, format: h5, feature: null, key: null}
    graph: {file: adj_mx.pkl, format: dcrnn-pickle, sensor_ids: null, threshold: null}
                                       # also unmatched_sensors: drop (graph nodes without data; imports write it)
    files:
      - {name: metr-la.h5, size: null, sha256: null, urls: [], page: https://..., note: ...}
"""
from __future__ import annotations

import hashlib
import os
import sys
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from gman._modes import give_usual_mode
from gman.errors import ConfigError, DataError, UnknownDatasetError

CARD_FILE = "dataset.yaml"
ENV_DATASETS_DIR = "GMAN_DATASETS_DIR"
_CARD_KEYS = {"name", "title", "description", "interval", "start_time", "units", "missing_value", "split",
              "license", "values", "graph", "files", "notes", "source"}
_VALUES_KEYS = {"file", "format", "feature", "features", "key", "sensor_ids", "header"}
_GRAPH_KEYS = {"file", "format", "sensor_ids", "threshold", "unmatched_sensors"}
_FILE_KEYS = {"name", "size", "sha256", "urls", "page", "note"}


# ----------------------------------------------------------------------------- where cards and data live

def checkout_datasets_dir() -> Path | None:
    """``<repo>/datasets`` when gman runs from a source checkout, else None."""
    candidate = Path(__file__).resolve().parents[2] / "datasets"
    return candidate if (candidate / "README.md").is_file() else None


def datasets_root() -> Path:
    """Where data files are stored: ``$GMAN_DATASETS_DIR``, else the checkout's ``datasets/``."""
    env = os.environ.get(ENV_DATASETS_DIR)
    if env:
        return Path(env).expanduser()
    checkout = checkout_datasets_dir()
    if checkout is None:
        raise ConfigError(f"{ENV_DATASETS_DIR}: not set, and gman is not running from a checkout with a datasets/ folder")
    return checkout


def _card_dirs() -> list[Path]:
    dirs = []
    env = os.environ.get(ENV_DATASETS_DIR)
    if env:
        dirs.append(Path(env).expanduser())
    checkout = checkout_datasets_dir()
    if checkout is not None and checkout not in dirs:
        dirs.append(checkout)
    return dirs


def card_names() -> list[str]:
    """Names of all cards that can be found, sorted."""
    names = set()
    for root in _card_dirs():
        if root.is_dir():
            # hidden folders are gman data import's staging and replaced copies, not cards
            names.update(p.parent.name for p in root.glob(f"*/{CARD_FILE}") if not p.parent.name.startswith("."))
    return sorted(names)


def _find_card_file(name: str) -> Path:
    for root in _card_dirs():
        path = root / name / CARD_FILE
        if path.is_file():
            return path
    known = ", ".join(card_names()) or "none"
    raise UnknownDatasetError(f"{name}: unknown dataset (known: {known})")


# ----------------------------------------------------------------------------- the card

@dataclass(frozen=True)
class FileEntry:
    """One file of a data set: name in the data folder, expected size and sha256 (None = unknown), sources."""

    name: str
    size: int | None = None
    sha256: str | None = None
    urls: tuple[str, ...] = ()
    page: str | None = None
    note: str | None = None


@dataclass
class DatasetCard:
    """A parsed, validated ``dataset.yaml``; ``data_dir`` is where its files are expected."""

    name: str
    card_path: Path
    data_dir: Path
    raw: dict = field(repr=False)
    files: list[FileEntry] = field(default_factory=list)

    @property
    def values(self) -> dict:
        return self.raw.get("values") or {}

    @property
    def graph(self) -> dict:
        return self.raw.get("graph") or {}

    def path_of(self, file_name: str | None) -> Path | None:
        return None if file_name is None else self.data_dir / file_name

    def missing_files(self) -> list[FileEntry]:
        return [f for f in self.files if not (self.data_dir / f.name).is_file()]


def load_card(name: str) -> DatasetCard:
    """Find and validate the card of ``name`` (DataError naming the card file on any problem)."""
    import yaml

    path = _find_card_file(name)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise DataError(f"{path}: not valid YAML ({first})") from None
    if not isinstance(raw, dict):
        raise DataError(f"{path}: a card must be a mapping of keys")
    _check_card(raw, name, path)
    files = [FileEntry(
        name=str(f["name"]),
        size=None if f.get("size") is None else int(f["size"]),
        sha256=None if f.get("sha256") is None else str(f["sha256"]).lower(),
        urls=tuple(str(u) for u in (f.get("urls") or ())),
        page=f.get("page"),
        note=f.get("note"),
    ) for f in raw.get("files") or []]
    return DatasetCard(name=name, card_path=path, data_dir=datasets_root() / name, raw=raw, files=files)


def _check_card(raw: dict, name: str, path: Path) -> None:
    def unknown(keys, allowed, where):
        extra = sorted(set(keys) - allowed)
        if extra:
            raise DataError(f"{path}: unknown key {extra[0]!r} in {where}; known: {', '.join(sorted(allowed))}")

    unknown(raw, _CARD_KEYS, "the card")
    if raw.get("name") != name:
        raise DataError(f"{path}: name {raw.get('name')!r} differs from its folder name {name!r}")
    values = raw.get("values")
    if not isinstance(values, dict) or not values.get("file"):
        raise DataError(f"{path}: needs 'values: {{file: ..., format: ...}}'")
    unknown(values, _VALUES_KEYS, "values")
    graph = raw.get("graph")
    if graph is not None:
        if not isinstance(graph, dict) or not graph.get("file"):
            raise DataError(f"{path}: 'graph' needs a 'file'")
        unknown(graph, _GRAPH_KEYS, "graph")
        if graph.get("unmatched_sensors", "error") not in ("error", "drop"):
            raise DataError(f"{path}: graph unmatched_sensors must be 'error' or 'drop', got {graph['unmatched_sensors']!r}")
    split = raw.get("split")
    if split is not None:
        if not (isinstance(split, list) and len(split) == 3 and all(isinstance(s, (int, float)) and s > 0 for s in split)
                and abs(sum(split) - 1) < 1e-6):  # training needs steps in every part
            raise DataError(f"{path}: split must be three positive fractions summing to 1, got {split!r}")
    files = raw.get("files") or []
    if not isinstance(files, list):
        raise DataError(f"{path}: 'files' must be a list")
    for entry in files:
        if not isinstance(entry, dict) or not entry.get("name"):
            raise DataError(f"{path}: every entry of 'files' needs a 'name'")
        unknown(entry, _FILE_KEYS, f"files entry {entry.get('name')!r}")
        sha = entry.get("sha256")
        if sha is not None and not (isinstance(sha, str) and len(sha) == 64 and all(c in "0123456789abcdef" for c in sha.lower())):
            raise DataError(f"{path}: sha256 of {entry['name']!r} is not 64 hex digits")
        if Path(str(entry["name"])).name != str(entry["name"]):
            raise DataError(f"{path}: file name {entry['name']!r} must not contain a folder")


# ----------------------------------------------------------------------------- reader options

def card_reader_options(name: str) -> dict[str, Any]:
    """Keyword options of ``gman.data.readers.load_dataset`` for the data set of card ``name``.

    Keys: values_path, format, graph_path, graph_format, graph_sensor_ids,
    graph_threshold, unmatched_sensors, start_time, interval, missing_value, feature, key,
    sensor_ids, name, units, split (unset ones are left out, except
    missing_value, whose None means "NaN only").  Raises DataError when the
    card is unknown or a file it names is not in its data folder.
    """
    card = load_card(name)
    values_path = card.data_dir / card.values["file"]
    graph_file = card.graph.get("file")
    graph_path = card.data_dir / graph_file if graph_file else None
    for path in (values_path, graph_path):
        if path is not None and not path.is_file():
            raise DataError(
                f"{path}: data file of dataset {name!r} is missing; run 'gman data fetch {name}' "
                f"or put the file there (set {ENV_DATASETS_DIR} to keep data elsewhere)"
            )
    options: dict[str, Any] = {
        "values_path": str(values_path),
        "format": card.values.get("format"),
        "key": card.values.get("key"),
        "feature": card.values.get("feature"),
        "header": card.values.get("header"),
        "sensor_ids": _data_file(card, card.values.get("sensor_ids")),
        "graph_path": None if graph_path is None else str(graph_path),
        "graph_format": card.graph.get("format"),
        "graph_sensor_ids": _data_file(card, card.graph.get("sensor_ids")),
        "graph_threshold": card.graph.get("threshold"),
        "unmatched_sensors": card.graph.get("unmatched_sensors"),
        "start_time": card.raw.get("start_time"),
        "interval": card.raw.get("interval"),
        "name": card.name,
        "units": card.raw.get("units"),
        "split": tuple(card.raw["split"]) if card.raw.get("split") else None,
    }
    options = {k: v for k, v in options.items() if v is not None}
    options["missing_value"] = card.raw.get("missing_value")
    if "start_time" in options:  # YAML reads an unquoted timestamp as a datetime
        options["start_time"] = str(options["start_time"])
    return options


def _data_file(card: DatasetCard, file_name: str | None) -> str | None:
    """A card option naming a file in the data folder (sensor id lists) -> its path."""
    return None if file_name is None else str(card.data_dir / file_name)


# ----------------------------------------------------------------------------- checksums and downloads

def sha256_of(path: Path, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(chunk_size), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify_file(path: Path, entry: FileEntry) -> None:
    """DataError when the size or sha256 of ``path`` differs from the card's."""
    if entry.size is not None and path.stat().st_size != entry.size:
        raise DataError(f"{path}: size {path.stat().st_size} bytes, the card says {entry.size}")
    if entry.sha256 is not None:
        actual = sha256_of(path)
        if actual != entry.sha256:
            raise DataError(f"{path}: sha256 {actual} differs from the card's {entry.sha256}")


def fetch(name: str, only: list[str] | None = None, progress: bool = True, timeout: float = 60.0,
          log: Callable[[str], None] | None = None) -> list[Path]:
    """Download the files of dataset ``name`` that are not there yet; returns the paths of all its files.

    Each file streams into ``<file>.part`` (resumed with an HTTP Range request
    when a ``.part`` is left from an interrupted run), is checked against the
    card's size and sha256, then renamed into place.  A checksum mismatch
    deletes the ``.part`` and raises DataError.  A file with no download URL
    raises DataError pointing at its web page.
    """
    log = log or (lambda message: print(message, file=sys.stderr))
    card = load_card(name)
    entries = card.files if not only else [f for f in card.files if f.name in only]
    if only:
        unknown = sorted(set(only) - {f.name for f in card.files})
        if unknown:
            raise DataError(f"{card.card_path}: no file {unknown[0]!r} in dataset {name!r}")
    if not timeout > 0:
        raise ConfigError(f"timeout: expected a number of seconds > 0, got {timeout!r}")
    created = not card.data_dir.exists()
    card.data_dir.mkdir(parents=True, exist_ok=True)
    manual = []
    try:
        for entry in entries:
            target = card.data_dir / entry.name
            if target.is_file():
                verify_file(target, entry)
                log(f"{entry.name}: present")
                continue
            if not entry.urls:
                manual.append(entry)
                continue
            download(entry, target, progress=progress, timeout=timeout, log=log)
    except BaseException:
        if created and not any(card.data_dir.iterdir()):  # a failed first fetch leaves no empty folder
            card.data_dir.rmdir()
        raise
    if manual:  # the folder stays: the message says to put the file there
        entry = manual[0]
        where = entry.page or "the source named in the card"
        raise DataError(
            f"{card.data_dir / entry.name}: no direct download for {entry.name}; get it from {where} and put it there"
            + (f" ({len(manual) - 1} more such file(s))" if len(manual) > 1 else "")
        )
    return [card.data_dir / f.name for f in card.files]


def download(entry: FileEntry, target: Path, progress: bool = True, timeout: float = 60.0,
             log: Callable[[str], None] | None = None) -> Path:
    """Fetch ``entry`` into ``target`` via ``target.part`` (resume, verify, atomic rename)."""
    log = log or (lambda message: print(message, file=sys.stderr))
    errors = []
    for url in entry.urls:
        try:
            _download_url(url, entry, target, progress, timeout, log)
            return target
        except _TryNextURL as err:
            errors.append(f"{url}: {err}")
    raise DataError(f"{target}: download failed from every URL ({'; '.join(errors)})")


class _TryNextURL(Exception):
    """This URL did not answer usefully; the next one may."""


def _download_url(url: str, entry: FileEntry, target: Path, progress: bool, timeout: float, log) -> None:
    import urllib.error
    import urllib.request
    from http.client import HTTPException

    partial = target.with_name(target.name + ".part")
    offset = partial.stat().st_size if partial.is_file() else 0
    if entry.size is not None and offset > entry.size:  # cannot be the start of this file
        partial.unlink()
        offset = 0
    request = urllib.request.Request(url, headers={"User-Agent": "gman-data-fetch"})
    if offset:
        request.add_header("Range", f"bytes={offset}-")
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as err:
        if err.code == 416 and offset:  # nothing left to send: the .part may already be complete
            _finish_download(partial, entry, target, log)
            return
        raise _TryNextURL(f"HTTP {err.code}") from None
    except (urllib.error.URLError, OSError, HTTPException) as err:
        raise _TryNextURL(str(getattr(err, "reason", err))) from None

    with response:
        resumed = offset and response.status == 206
        if offset and not resumed:
            log(f"{entry.name}: server ignored the resume request; starting again")
            offset = 0
        length = response.headers.get("Content-Length")
        total = entry.size or (offset + int(length) if length and length.isdigit() else None)
        from tqdm.auto import tqdm

        received = offset
        with open(partial, "ab" if resumed else "wb") as fh, tqdm(
            total=total, initial=offset, unit="B", unit_scale=True, desc=entry.name, disable=not progress, leave=False
        ) as bar:
            try:
                for chunk in iter(lambda: response.read(1 << 16), b""):
                    fh.write(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
            except (OSError, HTTPException) as err:
                fh.flush()
                raise DataError(
                    f"{partial}: download of {entry.name} interrupted after {received} bytes "
                    f"({type(err).__name__}); run the fetch again to resume"
                ) from None
        expected_here = int(length) + offset if length and length.isdigit() else None
        if expected_here is not None and received < expected_here:
            raise DataError(
                f"{partial}: download of {entry.name} interrupted after {received} of {expected_here} bytes; "
                "run the fetch again to resume"
            )
    _finish_download(partial, entry, target, log)


def _finish_download(partial: Path, entry: FileEntry, target: Path, log) -> None:
    """Verify the finished ``.part`` and rename it to ``target``; delete it on a mismatch."""
    size = partial.stat().st_size
    if entry.size is not None and size != entry.size:
        if size < entry.size:
            raise DataError(f"{partial}: {entry.name} is {size} of {entry.size} bytes; run the fetch again to resume")
        partial.unlink()
        raise DataError(f"{target}: downloaded {size} bytes but the card says {entry.size}; deleted the partial file")
    actual = sha256_of(partial)
    if entry.sha256 is not None and actual != entry.sha256:
        partial.unlink()
        raise DataError(
            f"{target}: checksum mismatch (sha256 {actual}, the card says {entry.sha256}); deleted the partial file"
        )
    if entry.sha256 is None:
        warnings.warn(f"{target}: the card has no sha256 for {entry.name} (got {actual}); only the size was checked",
                      stacklevel=2)
    os.replace(partial, target)
    log(f"{entry.name}: downloaded, {size} bytes, sha256 {actual[:12]}…")


# ----------------------------------------------------------------------------- writing cards

def write_card(folder: Path, card: dict) -> Path:
    """Write ``card`` as ``folder/dataset.yaml`` (temp name + rename)."""
    import yaml

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / CARD_FILE
    fd, tmp = tempfile.mkstemp(prefix=".dataset.", suffix=".yaml.tmp", dir=folder)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            yaml.safe_dump(card, fh, sort_keys=False, allow_unicode=True, width=100)
        give_usual_mode(tmp)  # mkstemp creates 0600
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
