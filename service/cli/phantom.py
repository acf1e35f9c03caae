"""``omnet phantom``: write a synthetic BraTS-like case."""

from __future__ import annotations

import argparse

NAME = "phantom"
HELP = "write a synthetic BraTS-like case (four modalities and its label map)"


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("out", metavar="OUT", help="parent folder; the case goes to OUT/NAME/")
    p.add_argument("--name", default="phantom", help="case name (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default %(default)s)")
    p.add_argument(
        "--shape",
        type=int,
        nargs=3,
        metavar=("X", "Y", "Z"),
        help="grid size in voxels, each at least 16 (default 64 64 40)",
    )


def run(args: argparse.Namespace) -> int:
    from model.io.phantom import write_phantom

    kwargs: dict[str, object] = {"seed": args.seed}
    if args.shape is not None:
        kwargs["shape"] = tuple(args.shape)
    paths = write_phantom(args.out, name=args.name, **kwargs)
    for path in paths.values():
        print(path)
    return 0
