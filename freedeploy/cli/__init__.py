"""The ``freedeploy`` command line (click).

Every command that reports numbers takes ``--json``; progress bars and stage messages go to
stderr so stdout stays machine-readable. User errors print one line, ``error: ...``, and exit with
the code of their class (``runtimes.errors``); ``--debug`` shows the traceback instead. Heavy
packages are imported inside the commands, so ``freedeploy --help`` and the runtime commands work
on a box without torch.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
from typing import Any, Iterator, Sequence

import click

from freedeploy import __version__
from runtimes.errors import FreedeployError

__all__ = ["cli", "main"]

INTERRUPTED_EXIT = 130
TERMINATED_EXIT = 143  # 128 + SIGTERM, as a shell reports a terminated process


class Terminated(BaseException):
    """SIGTERM, raised where the program is, so that every cleanup runs as for Ctrl-C (a
    half-written output is removed, a lock released) before the process exits."""


def _on_sigterm(signum: int, frame: Any) -> None:
    raise Terminated()


@contextlib.contextmanager
def _sigterm_as_exception() -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield
        return
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class FreedeployGroup(click.Group):
    """Turns every user error into one line on stderr and a stable exit code."""

    def main(self, args: Sequence[str] | None = None, prog_name: str | None = None, **extra: Any) -> Any:
        args = list(sys.argv[1:] if args is None else args)
        debug = "--debug" in args or os.environ.get("FREEDEPLOY_DEBUG") == "1"
        try:
            with _sigterm_as_exception():
                rv = super().main(args=args, prog_name=prog_name or "freedeploy", standalone_mode=False, **extra)
            if isinstance(rv, int) and not isinstance(rv, bool):  # click returns Exit codes when not standalone
                sys.exit(rv)
            return rv
        except Terminated:
            if debug:
                raise
            click.echo("error: terminated", err=True)
            sys.exit(TERMINATED_EXIT)
        except click.exceptions.Exit as exc:
            sys.exit(exc.exit_code)
        except click.exceptions.Abort:
            click.echo("error: aborted", err=True)
            sys.exit(INTERRUPTED_EXIT)
        except KeyboardInterrupt:
            if debug:
                raise
            click.echo("error: interrupted", err=True)
            sys.exit(INTERRUPTED_EXIT)
        except click.ClickException as exc:
            if debug:
                raise
            hint = f" (see '{exc.ctx.command_path} --help')" if isinstance(exc, click.UsageError) and exc.ctx else ""
            click.echo(f"error: {_one_line(exc.format_message())}{hint}", err=True)
            sys.exit(exc.exit_code)
        except FreedeployError as exc:
            if debug:
                raise
            click.echo(f"error: {_one_line(str(exc))}", err=True)
            sys.exit(exc.exit_code)


def _one_line(message: str) -> str:
    return " ".join(part.strip() for part in message.splitlines() if part.strip())


@click.group(cls=FreedeployGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="freedeploy")
@click.option("--debug", is_flag=True, help="Show full tracebacks instead of one-line errors.")
@click.option("-v", "--verbose", count=True, help="More log output (-v info, -vv debug).")
def cli(debug: bool, verbose: int) -> None:
    """Train, export, calibrate and run early-exit transformers."""
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    if verbose == 0:  # transformers and torch speak up on their own otherwise
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def main() -> None:
    cli.main()


def _register() -> None:
    from freedeploy.cli import (bench_cmd, calibrate_cmd, export_cmd, inspect_cmd, repo_cmd, run_cmd, serve_cmd,
                                train_cmd)

    cli.add_command(train_cmd.train)
    cli.add_command(export_cmd.export)
    cli.add_command(export_cmd.build)
    cli.add_command(inspect_cmd.inspect)
    cli.add_command(run_cmd.run)
    cli.add_command(calibrate_cmd.calibrate)
    cli.add_command(calibrate_cmd.eval_)
    cli.add_command(bench_cmd.bench)
    cli.add_command(serve_cmd.serve)
    cli.add_command(repo_cmd.triton_repo)


_register()
