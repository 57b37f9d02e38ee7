"""The permissions of files and folders that gman makes under temporary names.

``tempfile.mkstemp`` / ``mkdtemp`` create 0600 files and 0700 folders; an output renamed into place
from one should get what a plain ``open`` / ``mkdir`` would have given it (0666 / 0777 less the umask),
so that a shared model, data set or cache is readable by the others who use it.
"""
from __future__ import annotations

import os


def _umask() -> int:
    mask = os.umask(0)  # the only way to read it is to set it
    os.umask(mask)
    return mask


def give_usual_mode(path: str | os.PathLike, folder: bool = False) -> None:
    """chmod ``path`` to 0777 (a folder) or 0666 (a file) less the process's umask."""
    os.chmod(path, (0o777 if folder else 0o666) & ~_umask())
