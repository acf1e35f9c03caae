"""The ``omnet`` command line: batch segmentation, evaluation, training and serving.

One module per sub-command, each with ``NAME``, ``HELP``, ``configure(parser)`` and
``run(args) -> exit status``; :data:`COMMANDS` lists them in the order ``--help`` shows.
Every sub-command reports failures as one readable line on stderr and a non-zero exit
status; tracebacks are shown only with ``--debug``.

Sub-commands import the science (``model``, and with it PyTorch) inside ``run``, so
that ``omnet --help`` and a usage error stay fast, and so that the ``omnet`` process
sets its OpenMP wait policy (:mod:`service.openmp`) before PyTorch loads.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from service.cli import (
    db,
    evaluate,
    export,
    model_info,
    phantom,
    segment,
    serve,
    submit,
    train,
    worker,
)
from service.cli.common import EXIT_FAILURE, EXIT_USAGE, one_line
from service.openmp import prefer_passive_waits

COMMANDS = (model_info, phantom, segment, evaluate, train, serve, worker, db, submit, export)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="omnet", description="OM-Net + CGA brain-tumour segmentation"
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command in COMMANDS:
        p = sub.add_parser(command.NAME, help=command.HELP, description=command.HELP)
        command.configure(p)
        p.set_defaults(handler=command.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command line ``argv``; without ``argv`` (the ``omnet`` script, ``python -m
    service.cli``) that of this process, which then first prefers passive OpenMP waits
    (:func:`service.openmp.prefer_passive_waits`; the worker processes it starts inherit
    the setting). Returns the exit status."""
    if argv is None:
        prefer_passive_waits()
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    if not getattr(args, "handler", None):
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        return int(args.handler(args) or 0)
    except KeyboardInterrupt:
        print("omnet: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # the one place that turns any failure into one line
        if args.debug:
            raise
        print(f"omnet {args.command}: error: {one_line(exc)}", file=sys.stderr)
        return EXIT_FAILURE
