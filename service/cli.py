"""The ``omnet`` command line: batch segmentation, evaluation, training and serving.

Every sub-command reports failures as one readable line on stderr and a non-zero exit
status; tracebacks are shown only with ``--debug``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence

logger = logging.getLogger(__name__)

EXIT_USAGE = 2
EXIT_FAILURE = 1


class CommandError(Exception):
    """A failure to report to the user as one line."""


Handler = Callable[[argparse.Namespace], int]
_COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Handler]] = {}


def command(name: str, help_text: str, configure: Callable[[argparse.ArgumentParser], None]):
    def register(handler: Handler) -> Handler:
        _COMMANDS[name] = (help_text, configure, handler)
        return handler

    return register


# --------------------------------------------------------------------------- model-info
def _configure_model_info(p: argparse.ArgumentParser) -> None:
    from model.network import VARIANTS

    p.add_argument("--variant", default="omnet_cga", choices=VARIANTS)
    p.add_argument("--width", type=int, default=32, help="base width (32 in the paper)")
    p.add_argument("--classes", type=int, default=5, help="classes of a single 'mc' network")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")


@command("model-info", "parameter count and FLOPs of an architecture", _configure_model_info)
def _model_info(args: argparse.Namespace) -> int:
    from model.network import ArchConfig, build_model, count_flops, count_parameters

    config = ArchConfig(variant=args.variant, width=args.width, num_classes=args.classes)
    model = build_model(config)
    info = {
        "variant": config.variant,
        "width": config.width,
        "parameters": count_parameters(model),
        "flops_per_patch": count_flops(model),
        "patch": [32, 32, 16],
    }
    if args.json:
        print(json.dumps(info))
    else:
        print(f"variant     {info['variant']} (width {info['width']})")
        print(f"parameters  {info['parameters']:,} ({info['parameters'] / 1e6:.3f} M)")
        print(f"FLOPs       {info['flops_per_patch'] / 1e9:.2f} G per 32x32x16 patch")
    return 0


# --------------------------------------------------------------------------- entry point
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="omnet", description="OM-Net + CGA brain-tumour segmentation"
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (help_text, configure, handler) in _COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        configure(p)
        p.set_defaults(handler=handler)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
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
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        print(f"omnet {args.command}: error: {message}", file=sys.stderr)
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
