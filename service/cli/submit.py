"""``omnet submit``: send a case to an omnet server, optionally wait and download.

Built on :class:`service.client.OmnetClient`. Prints the job id on stdout; with
``--wait`` (or ``--out``) follows the job, printing its state changes on stderr, and
with ``--out`` saves its results there. Exit status 0 when the job was submitted (and,
when waited for, succeeded), 1 when it failed or was cancelled or a request failed.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING

from service.cli.common import EXIT_FAILURE, CommandError

if TYPE_CHECKING:
    from service.schemas import JobStatus

NAME = "submit"
HELP = "send a case to an omnet server (and wait for its results)"

#: Environment variables the command reads its server and key from.
SERVER_ENV = "OMNET_SERVER"
KEY_ENV = "OMNET_API_KEY"


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "case",
        metavar="CASE",
        help="a BraTS case folder (four NIfTI files), a 4D NIfTI file, a DICOM study zip "
        "or a folder of DICOM files",
    )
    p.add_argument(
        "--server",
        default=os.environ.get(SERVER_ENV),
        help=f"the server's URL, e.g. http://127.0.0.1:8000 (default: ${SERVER_ENV})",
    )
    p.add_argument(
        "--api-key",
        default=os.environ.get(KEY_ENV),
        help=f"API key (default: ${KEY_ENV}; none for a server in open mode)",
    )
    p.add_argument("--wait", action="store_true", help="wait until the job has finished")
    p.add_argument(
        "--out", metavar="DIR", help="save the results in DIR (implies --wait)", default=None
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=None,
        metavar="S",
        help="give up waiting after S seconds (default: wait as long as it takes)",
    )
    p.add_argument(
        "--no-postprocess",
        action="store_true",
        help="no post-processing, the network's fused output (default: the service's "
        "OMNET_POSTPROCESS)",
    )
    p.add_argument("--probabilities", action="store_true", help="also the probability maps")
    p.add_argument("--no-preview", action="store_true", help="no preview image")
    p.add_argument(
        "--label-convention",
        choices=("4", "3"),
        default="4",
        help="the label of the enhancing tumour: 4 (BraTS 2018-2021) or 3 (BraTS 2023)",
    )


def _progress() -> Callable[[JobStatus], None]:
    """Prints a job's state on stderr each time it changes."""
    last = [""]

    def show(status: JobStatus) -> None:
        line = f"{status.state}"
        if status.stage:
            line += f" ({status.stage}, {round(100 * status.progress)}%)"
        elif status.queue_position is not None:
            line += f" (position {status.queue_position} in the queue)"
        if line != last[0]:
            print(f"job {status.id}: {line}", file=sys.stderr)
            last[0] = line

    return show


def run(args: argparse.Namespace) -> int:
    from service.client import ClientError, OmnetClient

    if not args.server:
        raise CommandError(f"say which server: --server URL (or set {SERVER_ENV})")
    options = {
        "postprocess": not args.no_postprocess,
        "probabilities": args.probabilities,
        "preview": not args.no_preview,
        "label_convention": args.label_convention,
    }
    try:
        with OmnetClient(args.server, args.api_key) as client:
            created = client.submit(args.case, options)
            print(created.id)
            if not (args.wait or args.out):
                return 0
            status = client.wait(
                created.id,
                timeout_s=args.timeout,
                on_status=_progress(),
            )
            if status.state != "succeeded":
                why = f": {status.error.code}: {status.error.message}" if status.error else ""
                print(f"omnet submit: job {created.id} {status.state}{why}", file=sys.stderr)
                return EXIT_FAILURE
            for warning in status.warnings:
                print(f"job {created.id}: warning: {warning}", file=sys.stderr)
            if args.out:
                for path in client.download(status, args.out).values():
                    print(path)
    except ClientError as exc:
        raise CommandError(str(exc)) from exc
    return 0
