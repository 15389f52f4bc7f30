"""The ``reidx`` command line: a thin click layer over the Python API (``api.py``) and the stages.

One vocabulary across commands (docs/cli.md): the same option means the same thing everywhere
(``--weights`` is always the ReID embedder, ``--detector`` the person detector, ``--batch-size``
items per forward pass, ``--out`` what the command creates), and ``--json`` prints exactly one
JSON object on stdout whose keys follow one naming (``images``, ``images_failed``, ``persons``,
``failures``, ``wall_s``, …). Progress and warnings go to stderr.

Exit status: 0 done; 1 a user error (one ``Error: ...`` line on stderr; ``REIDX_DEBUG=1`` shows
the traceback); 2 some inputs failed; 3 a source failed (missing, unmounted, unreadable); 130
interrupted (Ctrl-C or SIGTERM; what was committed is kept). Only click is imported at
start-up: ``reidx --help`` and argument errors answer at once. Outside a terminal, long commands
log progress lines and a final ``summary {json}`` line through the ``reidx`` logger (stderr,
and ``--log-file``).
"""

from __future__ import annotations

import logging
import os
import signal
import sys

import click

from reidx.commands.common import DEFAULT_MAX_PIXELS, LOG  # noqa: F401  (checked against the stages by a test)
from reidx.commands.models import (BASE_SHARE, DISTILL_WEIGHT, HEAD_INIT, LOSS_NAMES, RECOMPUTE_BN,  # noqa: F401
                                   WISE_ALPHA)

EXIT_USER_ERROR, EXIT_INTERRUPTED = 1, 130


def _user_error_types() -> tuple[type, ...]:
    """Failures a user can fix, shown as one line (imported only when something failed)."""
    from reidx.pipeline.datasets import DatasetError
    from reidx.pipeline.lock import GalleryLockedError
    from reidx.pipeline.models.weights import WeightsError
    from reidx.pipeline.training.checkpoint import RunExistsError

    return WeightsError, DatasetError, ValueError, ImportError, FileNotFoundError, RunExistsError, GalleryLockedError


class Interrupted(Exception):
    """Ctrl-C or SIGTERM during a command; ``summary`` is what a job had committed, when it says."""

    def __init__(self, summary: dict | None = None, rerun: str | None = None):
        super().__init__("interrupted")
        self.summary, self.rerun = summary, rerun  # rerun: how to go on, when it is not the same command


class ReidxGroup(click.Group):
    """Every error is one ``Error:`` line and exit status 1 — usage errors too (click's default is 2,
    which reidx keeps for "some inputs failed")."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except click.ClickException:
            raise
        except KeyboardInterrupt as exc:  # before click turns it into Abort and prints a blank line
            raise Interrupted(getattr(exc, "summary", None), getattr(exc, "rerun", None)) from None
        except Exception as exc:
            if os.environ.get("REIDX_DEBUG") or not isinstance(exc, _user_error_types()):
                raise
            raise click.ClickException(str(exc)) from None

    def main(self, args=None, prog_name=None, **extra):
        extra.pop("standalone_mode", None)
        _setup_logging()
        previous = signal.signal(signal.SIGTERM, _terminate)  # a service manager's stop: as Ctrl-C
        try:
            code = super().main(args=args, prog_name=prog_name or "reidx", standalone_mode=False, **extra)
        except click.ClickException as exc:
            hint = ""
            if isinstance(exc, click.UsageError) and exc.ctx is not None:
                hint = f" (see '{exc.ctx.command_path} --help')"
            click.echo(f"Error: {exc.format_message()}{hint}", err=True)
            sys.exit(EXIT_USER_ERROR)
        except (Interrupted, click.Abort, KeyboardInterrupt) as exc:
            done = getattr(exc, "summary", None)
            committed = (f"{done['images_new']} images ({done['persons']} persons) were committed; "
                         if done else "everything committed so far is kept; ")
            rerun = getattr(exc, "rerun", None) or "rerun the same command to resume"
            click.echo(f"Interrupted: {committed}{rerun}.", err=True)
            sys.exit(EXIT_INTERRUPTED)
        finally:
            signal.signal(signal.SIGTERM, previous)
        sys.exit(code if isinstance(code, int) else 0)


def _terminate(signum, frame):
    raise KeyboardInterrupt


def _setup_logging() -> None:
    """Progress and summary lines go to stderr when no one watches a terminal (cron, systemd, CI)."""
    LOG.setLevel(logging.INFO)
    LOG.propagate = False
    if not sys.stderr.isatty() and not any(getattr(h, "reidx_stderr", False) for h in LOG.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s reidx %(message)s", "%Y-%m-%dT%H:%M:%S"))
        handler.reidx_stderr = True
        LOG.addHandler(handler)


@click.group(cls=ReidxGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="reidx")
def main():
    """reidx: find people in large image archives and ask where else they appear.

    Weights are given by file path or known name (e.g. osnet_x0_25_msmt17); names are looked
    up in $REIDX_MODEL_DIR, then ~/.cache/reidx/models. Exit status: 0 done, 1 user error,
    2 some inputs failed (--strict), 130 interrupted. Option and JSON names: docs/cli.md.
    """


def _register() -> None:
    """Every command of ``commands/`` (their modules import only click at start-up)."""
    from reidx.commands import models, nightly, retrieval

    for command in (models.embed, models.evaluate, models.detect, models.evaluate_detections_command,
                    models.train, nightly.index, nightly.ledger, nightly.verify, nightly.build_index_command,
                    nightly.nightly, retrieval.query, retrieval.export):
        main.add_command(command)


_register()


if __name__ == "__main__":
    main()
