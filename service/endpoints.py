"""DICOMweb endpoints as the settings name them: a root URL with optional credentials."""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit, urlunsplit


@dataclass(frozen=True)
class DicomWebEndpoint:
    """A DICOMweb server: its root URL (without credentials) and its HTTP basic
    credentials, if any."""

    name: str
    url: str
    username: str | None = None
    password: str | None = None

    def __repr__(self) -> str:  # never the password
        return f"DicomWebEndpoint({self.name!r}, {self.url!r})"


_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def parse_endpoint(name: str, text: str) -> DicomWebEndpoint:
    """The endpoint of a DICOMweb root URL, ``http(s)://[user:password@]host[:port]/path``.

    Raises:
        ValueError: not an http(s) URL with a host (the message names ``name``, never
            the URL, which may hold a password).
    """
    parts = urlsplit(text.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"DICOMweb endpoint {name!r} must be an http(s) URL with a host")
    if parts.query or parts.fragment:
        raise ValueError(f"DICOMweb endpoint {name!r} must have no query or fragment")
    host = parts.hostname if ":" not in parts.hostname else f"[{parts.hostname}]"
    netloc = f"{host}:{parts.port}" if parts.port else host
    url = urlunsplit((parts.scheme, netloc, parts.path.rstrip("/"), "", ""))
    username = unquote(parts.username) if parts.username else None
    password = unquote(parts.password) if parts.password else None
    return DicomWebEndpoint(name, url, username, password)


def parse_destinations(value: str) -> dict[str, DicomWebEndpoint]:
    """Name -> endpoint from ``name=url`` items separated by commas.

    Raises:
        ValueError: an item without a name or with a bad URL, or a name given twice.
    """
    out: dict[str, DicomWebEndpoint] = {}
    for item in value.split(","):
        item = item.strip()
        if not item:
            continue
        name, _, url = item.partition("=")
        name = name.strip()
        if not _NAME.fullmatch(name) or not url.strip():
            raise ValueError(
                "dicomweb_destinations items are 'name=url', names of letters, digits, "
                "'_', '.' and '-'"
            )
        if name in out:
            raise ValueError(f"DICOMweb destination {name!r} is named twice")
        out[name] = parse_endpoint(name, url)
    return out
