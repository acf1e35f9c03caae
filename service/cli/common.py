"""What every sub-command shares: the one-line error, exit codes, argument types."""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Iterator

from model import defaults

EXIT_USAGE = 2
EXIT_FAILURE = 1


class CommandError(Exception):
    """A failure to report to the user as one line."""


class LazyChoices:
    """The ``choices`` of an option, read from a module attribute on first use.

    Building the parser then imports nothing heavy: the module is only imported when
    an option value is checked or the sub-command's help is shown. Options using it
    need an explicit ``metavar`` (argparse lists the choices in usage otherwise).
    """

    def __init__(self, module: str, attribute: str) -> None:
        self._module = module
        self._attribute = attribute

    def _values(self) -> tuple[str, ...]:
        return tuple(getattr(importlib.import_module(self._module), self._attribute))

    def __contains__(self, value: object) -> bool:
        return value in self._values()

    def __iter__(self) -> Iterator[str]:
        return iter(self._values())


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def tiling_name(text: str) -> str:
    """argparse type: a tiling the product offers (a withdrawn one is refused with why)."""
    try:
        return defaults.tiling_name(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def one_line(exc: BaseException) -> str:
    """The first line of an exception's message, or its type when it has none; for
    settings that do not validate, what is wrong with each (its first line is only a
    count of the errors)."""
    from pydantic import ValidationError

    if isinstance(exc, ValidationError) and exc.errors():
        problems = []
        for error in exc.errors(include_url=False, include_input=False):
            field = ".".join(str(part) for part in error["loc"])
            if field and exc.title == "Settings":
                field = f"OMNET_{field.upper()}"
            message = str(error["msg"]).removeprefix("Value error, ")
            problems.append(f"{field}: {message}" if field else message)
        return f"invalid {exc.title}: " + "; ".join(problems)
    text = str(exc)
    return text.splitlines()[0] if text else type(exc).__name__


def describe_database(url: str) -> str:
    """A job database in words, without its password: ``PostgreSQL at db:5432, database
    omnet``, ``SQLite file /srv/omnet/jobs.sqlite``."""
    import sqlalchemy as sa

    parsed = sa.engine.make_url(url)
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        return f"SQLite file {parsed.database}" if parsed.database else "SQLite in memory"
    kind = {"postgresql": "PostgreSQL"}.get(backend, backend)
    where = f"{parsed.host or 'localhost'}{f':{parsed.port}' if parsed.port else ''}"
    return f"{kind} at {where}, database {parsed.database}"


def database_problem(url: str, timeout_s: float, exc: BaseException, waited_s: float) -> str:
    """One line saying that the job database at ``url`` could not be used at start-up,
    after ``waited_s`` seconds, and what to check; ``exc`` is the driver's error."""
    what = f"the job database ({describe_database(url)})"
    if waited_s >= 0.9 * timeout_s:
        return (
            f"{what} did not answer within {timeout_s:g} s (OMNET_DATABASE_TIMEOUT_S): check "
            "that its server is running and answers from this machine (a firewall, proxy or "
            "connection pooler in between may hold the connection), and OMNET_DATABASE_URL"
        )
    cause = getattr(exc, "orig", None) or exc
    return (
        f"{what} cannot be used: {one_line(cause)}; check OMNET_DATABASE_URL (host, port, "
        "user, password, database) and that its server is running and reachable from here"
    )
