"""The `duomo` command: thin wrappers that parse arguments, call one function below, and print."""

from __future__ import annotations

import importlib
import logging
import sys

import typer
from rich.console import Console

from duomo.errors import DuomoError

app = typer.Typer(
    name="duomo",
    help="duomo (多模): image+text foundation models as infrastructure.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
err_console = Console(stderr=True, soft_wrap=True)

# Each command group lives in its own module with a `register(app)` function.
COMMAND_MODULES = [
    "duomo.cli.core",
    "duomo.cli.data",
    "duomo.cli.index",
    "duomo.cli.serve",
    "duomo.cli.train",
    "duomo.cli.eval",
    "duomo.cli.beit3",
    "duomo.cli.generate",
    "duomo.cli.chat",
    "duomo.cli.collection",
]
for _name in COMMAND_MODULES:
    try:
        importlib.import_module(_name).register(app)
    except ModuleNotFoundError as exc:  # a command group still being written: skip only that module
        if exc.name != _name:
            raise


def main(argv: list[str] | None = None) -> int:
    """Entry point: runs the app; duomo errors and OS errors (a missing folder, a full or read-only disk)
    become one red line and exit code 1, an interrupt exit code 130, a command's own exit code is kept."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        code = app(args=argv, standalone_mode=False)  # a command's typer.Exit(n) comes back as n
    except DuomoError as exc:
        err_console.print(f"[red]error:[/red] {exc}", highlight=False)
        return 1
    except OSError as exc:
        where = f": {exc.filename}" if getattr(exc, "filename", None) else ""
        err_console.print(f"[red]error:[/red] {exc.strerror or exc}{where}", highlight=False)
        return 1
    except (typer.Exit, SystemExit) as exc:
        return int(getattr(exc, "exit_code", getattr(exc, "code", 0)) or 0)
    except typer.Abort:
        err_console.print("aborted")
        return 130
    except KeyboardInterrupt:
        err_console.print("interrupted")
        return 130
    except Exception as exc:
        # usage errors: click's ClickException, or the copy of it that newer typer versions vendor
        if hasattr(exc, "show") and hasattr(exc, "exit_code"):
            exc.show()
            return int(exc.exit_code)
        raise
    return code if isinstance(code, int) else 0


if __name__ == "__main__":
    sys.exit(main())
