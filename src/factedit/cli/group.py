"""The command group behind ``factedit``: ``-v`` anywhere on the command line, every error as one line.

typer draws usage errors (unknown option, missing value) as a framed panel, and an uncaught exception
as rich's traceback panel wrapped to 80 columns; scripts and CI logs need one greppable line on
stderr: exit status 2 for bad input (a :class:`FactEditError`, a usage error, a file the system
refused), 1 for a bug (``-v`` shows its traceback), 130 for Ctrl-C.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

import typer
from typer.core import TyperGroup

from factedit.cli.options import VERBOSE_FLAGS, error_line, is_verbose, setup_logging
from factedit.errors import FactEditError


def split_verbose(args: Sequence[str]) -> tuple[list[str], bool]:
    """Remove ``-v``/``--verbose`` wherever they stand (up to a ``--``): logging is global, so the flag
    belongs to no single command and works before or after the sub-command."""
    rest, verbose = [], False
    for i, arg in enumerate(args):
        if arg == "--":
            rest.extend(args[i:])
            break
        if arg in VERBOSE_FLAGS:
            verbose = True
        else:
            rest.append(arg)
    return rest, verbose


class FactEditGroup(TyperGroup):
    """Root group: ``-v`` before or after the sub-command; one-line errors with exit status 2."""

    def main(
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
        from factedit.paths import set_data_dir

        args, verbose = split_verbose(sys.argv[1:] if args is None else args)
        set_data_dir(None)  # an earlier in-process invocation (tests) must not leak its --data-dir
        setup_logging(verbose)
        if verbose and any(param.name == "verbose" for param in self.params):
            args = ["--verbose", *args]  # the root option, so the root callback sees it too
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            result = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except typer.TyperException as exc:  # click's exceptions (typer vendors click)
            if type(exc).__name__ == "NoArgsIsHelpError":  # the help text itself
                typer.echo(exc.format_message())
                sys.exit(exc.exit_code)
            ctx = getattr(exc, "ctx", None)
            hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
            error_line(exc.format_message() + hint)
            sys.exit(exc.exit_code)
        except FactEditError as exc:  # bad input a command did not catch itself
            error_line(str(exc))
            sys.exit(2)
        except typer.Abort:
            error_line("aborted")
            sys.exit(1)
        except KeyboardInterrupt:
            error_line("interrupted")
            sys.exit(130)
        except OSError as exc:  # the system refused a file or folder (permissions, disk full, ...)
            if verbose:
                raise
            where = f": {exc.filename}" if getattr(exc, "filename", None) else ""
            error_line(f"{exc.strerror or exc}{where} (run again with -v for details)")
            sys.exit(2)
        except Exception as exc:  # a bug: still one line, the traceback with -v
            if verbose or is_verbose():
                raise
            error_line(
                f"internal error ({type(exc).__name__}: {exc}); please report it with the output of the same "
                "command run with -v"
            )
            sys.exit(1)
        sys.exit(result if isinstance(result, int) else 0)
