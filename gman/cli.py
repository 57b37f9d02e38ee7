"""The ``gman`` console script: a thin dispatcher over the sub-commands.

Each sub-command lives next to the code it drives and is imported only when
it is called, so ``gman predict`` does not pay for Lightning and ``gman data
list`` does not pay for torch.
"""
from __future__ import annotations

import errno
import importlib
import sys
import warnings
from pathlib import Path

from gman.errors import GmanError

# sub-command -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("gman.training.cli", "train GMAN on a dataset (built-in synthetic network by default)"),
    "evaluate": ("gman.training.cli", "re-evaluate a checkpoint or MLflow run on a test split"),
    "data": ("gman.data.cli", "list, fetch, import and check datasets"),
    "predict": ("gman.serving.cli", "forecast from a history file or over a dataset split"),
    "serve": ("gman.serving.cli", "serve a packaged model over REST (MLflow scoring server)"),
    "export": ("gman.serving.cli", "export a model to ONNX or torch.export"),
}


def _usage() -> str:
    lines = ["usage: gman <command> [options]", "", "commands:"]
    lines += [f"  {name:<9} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "Run 'gman <command> --help' for a command's options."]
    return "\n".join(lines)


_PACKAGE_DIR = Path(__file__).resolve().parent
_python_format_warning = warnings.formatwarning


def _format_warning(message, category, filename, lineno, line=None) -> str:
    """gman's own warnings as one line (``gman: warning: ...``); other libraries' as Python prints them."""
    if Path(filename).resolve().is_relative_to(_PACKAGE_DIR):
        return f"gman: warning: {message}\n"
    return _python_format_warning(message, category, filename, lineno, line)


_FILE_SYSTEM_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR,
                       errno.EISDIR, errno.ENOENT, errno.EEXIST}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in {"-h", "--help"}:
        print(_usage())
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"gman: error: unknown command {command!r}; choose from {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[command][0])
    previous_format, warnings.formatwarning = warnings.formatwarning, _format_warning
    try:
        return int(module.main(command, rest) or 0)
    except GmanError as err:
        print(f"gman: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        if err.errno not in _FILE_SYSTEM_ERRORS:
            raise
        # a full disk, a read-only or missing folder: what the user must fix, in one line, not a traceback
        where = f"{err.filename}: " if err.filename else ""
        print(f"gman: error: {where}{err.strerror or err}", file=sys.stderr)
        return 1
    finally:
        warnings.formatwarning = previous_format


if __name__ == "__main__":
    sys.exit(main())
