"""Showing connection URLs without the secrets they may hold."""

from __future__ import annotations

from urllib.parse import unquote, urlsplit

#: What stands in for a hidden secret.
HIDDEN = "***"
#: Query parameters whose values are hidden (a database driver or a broker may take a
#: password there): those whose names contain one of these.
SECRET_PARAMETERS = ("pass", "secret", "token", "key", "auth")


def _secret_parameter(item: str) -> bool:
    name = unquote(item.partition("=")[0]).lower()
    return any(s in name for s in SECRET_PARAMETERS)


def _mask(url: str) -> str:
    try:
        parts = urlsplit(url)
        has_password = parts.password is not None
    except ValueError:  # not a URL that can be taken apart: show none of it
        return HIDDEN
    start = url.find("//") + 2 if parts.netloc else 0
    if has_password:  # user:password@host -> user:***@host
        user, _, host = parts.netloc.rpartition("@")
        netloc = f"{user.partition(':')[0]}:{HIDDEN}@{host}"
        url = url[:start] + netloc + url[start + len(parts.netloc) :]
        start += len(netloc)
    query_at = url.find("?", start)
    if query_at < 0:
        return url
    query, hash_, fragment = url[query_at + 1 :].partition("#")
    items = [
        f"{item.partition('=')[0]}={HIDDEN}" if _secret_parameter(item) else item
        for item in query.split("&")
    ]
    return f"{url[: query_at + 1]}{'&'.join(items)}{hash_}{fragment}"


def masked_url(text: str) -> str:
    """``text``, a URL (or several separated by ``;``, as Celery takes its brokers), with
    each password replaced by ``***``: the one before the host, and the values of query
    parameters that look like secrets (``?password=...``)."""
    return ";".join(_mask(part) for part in text.split(";"))
