"""The web page's routes over HTTP (a real API process; test_web.py drives them in a
browser): the pages need no key, carry a Content-Security-Policy that keeps them on this
server, and /docs loads Swagger UI from /static, not from a CDN."""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest

from tests.service.support import Api, base_env
from tests.service.support import stack as make_stack


@pytest.fixture(scope="module")
def api(tmp_path_factory, tiny_checkpoint) -> Iterator[Api]:
    env = base_env(tiny_checkpoint)
    with make_stack("pages", tmp_path_factory.mktemp("pages"), env) as s:
        yield s.wait_api(s.start_api())


def _local_urls(html: str) -> list[str]:
    urls = re.findall(r"""(?:src|href)=["']([^"']+)["']""", html)
    assert urls
    return urls


@pytest.mark.parametrize("path", ["/", "/view/not-a-job"])
def test_pages_answer_without_a_key_and_stay_on_this_server(api: Api, path: str) -> None:
    response = api.client(None).get(path)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    policy = response.headers["content-security-policy"]
    assert "default-src 'self'" in policy and "script-src 'self'" in policy
    for url in _local_urls(response.text):
        assert url.startswith("/") or url.startswith("data:"), url
        if url.startswith("/static/"):
            assert api.client(None).get(url).status_code == 200, url


def test_docs_load_swagger_ui_from_this_server(api: Api) -> None:
    client = api.client(None)
    page = client.get("/docs")
    assert page.status_code == 200
    urls = _local_urls(page.text)
    assert "/static/vendor/swagger-ui/swagger-ui-bundle.js" in urls
    assert not [u for u in urls if "://" in u], urls
    for url in urls:
        assert client.get(url).status_code == 200, url
    assert client.get("/openapi.json").status_code == 200
    assert client.get("/redoc").status_code == 404  # it would load from a CDN
    missing = client.get("/static/web/nothing.js")
    assert missing.status_code == 404
