"""The web page in a real browser: headless Chromium (selenium and chromedriver) against a
real ``omnet serve`` with the bundled model.

A real BraTS case, cropped around its tumour (the phantom where the data is absent), is
uploaded through the page; the job list follows it to the end, the viewer shows the
segmentation over the FLAIR and a screenshot of its canvas must hold the label colours.
A second API process on the same storage runs in open mode, for the page without a key.
The tests skip, saying why, where Chromium, chromedriver or selenium are missing.
"""

from __future__ import annotations

import io
import os
import shutil
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from model.weights import BUNDLED_PATH
from tests.conftest import data_dir
from tests.nifti_corpus import crop_real_case
from tests.service.support import (
    API_KEYS,
    MODALITY_FIELDS,
    Api,
    Phantom,
    Stack,
    base_env,
    children_of,
    wait_until,
)
from tests.service.support import stack as make_stack

SELENIUM_ERRORS = pytest.importorskip(
    "selenium.common.exceptions", reason="selenium is not installed (the dev extra has it)"
)

#: Chromium's flags: no display, no sandbox (containers run as root), WebGL in software.
CHROMIUM_FLAGS = (
    "--headless=new",
    "--no-sandbox",
    "--enable-unsafe-swiftshader",
    "--use-angle=swiftshader",
    "--window-size=1280,1100",
)
BROWSERS = ("chromium", "chromium-browser", "google-chrome")
#: RGB of each label in the viewer (model/io/preview.py's LABEL_COLOURS).
LABEL_RGB = {"NCR/NET": (255, 0, 0), "edema": (0, 255, 0), "enhancing": (255, 255, 0)}
JOB_TIMEOUT_S = 300
#: How long the viewer may take to draw the labels once the page is ready.
RENDER_TIMEOUT_S = 60


# --------------------------------------------------------------------------- browser
def _browser_paths() -> tuple[str, str]:
    browser = next((p for name in BROWSERS if (p := shutil.which(name))), None)
    driver = shutil.which("chromedriver")
    if browser is None or driver is None:
        pytest.skip(
            "the browser tests need Chromium and chromedriver (apt-get install chromium "
            "chromium-driver); not found on PATH"
        )
    return browser, driver


@pytest.fixture(scope="module")
def downloads(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("downloads")


@pytest.fixture(scope="module")
def browser(downloads: Path) -> Iterator[Any]:
    webdriver = pytest.importorskip(
        "selenium.webdriver", reason="the browser tests need selenium (the dev extra)"
    )
    from selenium.webdriver.chrome.service import Service

    binary, driver_path = _browser_paths()
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    options.add_experimental_option(
        "prefs",
        {"download.default_directory": str(downloads), "download.prompt_for_download": False},
    )
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


def _state(driver: Any, states: tuple[str, ...], timeout: float = 60.0) -> str:
    """Waits until the page's ``body[data-state]`` is one of ``states``; fails with the
    page's message and console when it ends elsewhere."""
    deadline = time.monotonic() + timeout
    while True:
        state = driver.execute_script("return document.body && document.body.dataset.state")
        if state in states:
            return str(state)
        if state == "error" or time.monotonic() > deadline:
            text = driver.find_element("tag name", "main").text
            raise AssertionError(
                f"page {driver.current_url} is {state!r}, not {states}:\n{text}\n"
                f"console: {_console(driver)}"
            )
        time.sleep(0.2)


def _drawn(driver: Any, done: Callable[[dict[str, int]], bool]) -> dict[str, int]:
    """The viewer canvas's label pixels once ``done`` holds for them, or the last seen
    after RENDER_TIMEOUT_S: a change reaches the screen some frames after the page
    state says ready, later on a loaded machine."""
    deadline = time.monotonic() + RENDER_TIMEOUT_S
    while True:
        colours = label_pixels(driver.find_element("id", "gl").screenshot_as_png)
        if done(colours) or time.monotonic() > deadline:
            return colours
        time.sleep(0.3)


def _console(driver: Any) -> list[str]:
    return [entry["message"] for entry in driver.get_log("browser")]


def _errors(console: list[str]) -> list[str]:
    return [m for m in console if "error" in m.lower() or "content security policy" in m.lower()]


def _resources(driver: Any) -> list[str]:
    """Every URL the page loaded (scripts, styles, fetches)."""
    return list(
        driver.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    )


def _rows(driver: Any) -> dict[str, str | None]:
    """Job id -> state of the job list's rows, read in one script: the page redraws the
    list every poll, so elements found one call earlier may be gone."""
    return dict(
        driver.execute_script(
            "return Array.from(document.querySelectorAll('#jobs tbody tr'))"
            ".map(r => [r.dataset.job, r.getAttribute('data-state')])"
        )
    )


def _worker_of(api: Api) -> int:
    """The pid of the worker process that ``omnet serve`` runs (its one live child)."""

    found = wait_until(lambda: children_of(api.proc.pid), 60, "omnet serve to run its worker")
    assert len(found) == 1, f"omnet serve has {len(found)} child processes: {found}"
    return found[0]


def _enter_key(driver: Any, key: str) -> None:
    field = driver.find_element("id", "key-input")
    field.clear()
    field.send_keys(key)
    driver.find_element("id", "key-save").click()


def _tiles(driver: Any) -> list[bytes]:
    """The canvas's screenshot cut into NiiVue's slice tiles (axial, coronal, sagittal)."""
    canvas = driver.find_element("id", "gl")
    shot = Image.open(io.BytesIO(canvas.screenshot_as_png))
    width = driver.execute_script("return arguments[0].width", canvas)
    rects = driver.execute_script("return omnetViewer.screenSlices.map(s => s.leftTopWidthHeight)")
    scale = shot.width / width
    tiles = []
    for left, top, w, h in rects:
        box = tuple(round(v * scale) for v in (left, top, left + w, top + h))
        buffer = io.BytesIO()
        shot.crop(box).save(buffer, format="PNG")
        tiles.append(buffer.getvalue())
    return tiles


def label_pixels(png: bytes) -> dict[str, int]:
    """Pixels of a screenshot in each label's hue (blended with grey at any opacity): the
    label's channels stand clearly above the others; grey, the blue cross and text do not."""
    rgb = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    margin = 40
    return {
        "NCR/NET": int(((r > g + margin) & (r > b + margin)).sum()),
        "edema": int(((g > r + margin) & (g > b + margin)).sum()),
        "enhancing": int(((r > b + margin) & (g > b + margin) & (abs(r - g) < margin)).sum()),
    }


# --------------------------------------------------------------------------- service
@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """``omnet serve`` (keys required, the bundled model) and an open-mode API beside it."""
    _browser_paths()
    if not BUNDLED_PATH.is_file():
        pytest.skip("no bundled model in model/weights: the viewer test needs real labels")
    env = base_env(BUNDLED_PATH, OMNET_TILING="wide")  # the tiling the bundled model suits
    with make_stack("web", tmp_path_factory.mktemp("web"), env) as s:
        s.start_serve()
        s.start_api("open-api", OMNET_OPEN_MODE="true")
        for api in s.apis:
            s.wait_api(api)
        yield s


@pytest.fixture(scope="module")
def keyed(deployment: Stack) -> Api:
    return deployment.apis[0]


@pytest.fixture(scope="module")
def open_api(deployment: Stack) -> Api:
    return deployment.apis[1]


@pytest.fixture(scope="module")
def case_files(tmp_path_factory: pytest.TempPathFactory, phantom: Phantom) -> list[Path]:
    """A real case cropped around its tumour as BraTS-named files; the phantom without data."""
    folder = tmp_path_factory.mktemp("web-case")
    root = data_dir() / "brats2018"
    cases = sorted(p for p in root.glob("*") if any(p.glob("*_t1.nii*"))) if root.is_dir() else []
    if not cases:
        paths = [folder / f"phantom_{m}.nii.gz" for m in MODALITY_FIELDS]
        for path, m in zip(paths, MODALITY_FIELDS, strict=True):
            path.write_bytes(phantom.data[m])
        return paths
    case = crop_real_case(cases[0])
    paths = []
    for m in MODALITY_FIELDS:
        path = folder / f"{case.name}_{m}.nii.gz"
        nib.save(nib.Nifti1Image(case.images[m], case.affine), path)
        paths.append(path)
    return paths


# --------------------------------------------------------------------------- tests
def test_upload_follow_and_view_a_case(
    browser: Any, keyed: Api, case_files: list[Path], downloads: Path, tmp_path: Path
) -> None:
    """Through the page only: key, upload, the job's live state, the viewer's overlay."""
    browser.get(f"{keyed.url}/")
    browser.execute_script("sessionStorage.clear()")
    browser.refresh()
    _state(browser, ("needs-key",))
    _enter_key(browser, API_KEYS["alice"])
    _state(browser, ("ready",))

    browser.find_element("id", "files").send_keys("\n".join(str(p) for p in case_files))
    slots = {m: browser.find_element("id", f"slot-{m}") for m in MODALITY_FIELDS}
    for m, path in zip(MODALITY_FIELDS, case_files, strict=True):  # assigned by file name
        assert browser.execute_script("return arguments[0].files[0].name", slots[m]) == path.name
    # The worker is held (SIGSTOP) until the list shows the job queued: on a fast machine a
    # cropped case is done before the page's first poll, and the live list would go unseen.
    # The owner's other jobs (another test's, in any order) are listed too: follow the
    # row the upload added.
    listed_before = set(_rows(browser))
    worker = _worker_of(keyed)
    os.kill(worker, signal.SIGSTOP)
    try:
        browser.find_element("id", "submit").click()
        started = time.monotonic()
        job_id: str | None = None
        seen: set[str | None] = set()
        while "queued" not in seen and time.monotonic() - started < JOB_TIMEOUT_S:
            added = {j: state for j, state in _rows(browser).items() if j not in listed_before}
            assert len(added) <= 1, added
            if added:
                [(job_id, state)] = added.items()
                seen.add(state)
            time.sleep(0.2)
    finally:
        os.kill(worker, signal.SIGCONT)
    assert job_id is not None and "queued" in seen, seen

    started = time.monotonic()
    while time.monotonic() - started < JOB_TIMEOUT_S:
        state = _rows(browser).get(job_id)
        seen.add(state)
        if state == "succeeded":
            break
        assert state != "failed", browser.find_element("id", "jobs").text
        time.sleep(0.3)
    else:
        raise AssertionError(f"job {job_id} did not succeed in {JOB_TIMEOUT_S} s: {seen}")
    assert seen & {"queued", "running"}, seen  # the list followed the job while it ran
    # The list is redrawn every poll: find the link again until a click lands.
    for _ in range(20):
        try:
            browser.find_element(
                "css selector", f"#jobs tbody tr[data-job='{job_id}'] a.view"
            ).click()
            break
        except SELENIUM_ERRORS.StaleElementReferenceException:
            time.sleep(0.1)

    _state(browser, ("ready",), timeout=120)
    assert browser.current_url == f"{keyed.url}/view/{job_id}"
    colours = _drawn(browser, lambda c: sum(c.values()) > 200)
    browser.save_screenshot(str(tmp_path / "viewer.png"))
    print(f"viewer screenshot: {tmp_path / 'viewer.png'}; label pixels {colours}")
    assert sum(colours.values()) > 200, colours
    assert colours["edema"] > 0, colours  # the whole tumour is mostly edema
    for plane, tile in zip(("axial", "coronal", "sagittal"), _tiles(browser), strict=True):
        assert sum(label_pixels(tile).values()) > 20, f"no tumour in the {plane} plane"

    volumes = browser.find_element("id", "volumes").text
    assert "whole tumour (WT)" in volumes and " ml" in volumes, volumes
    assert browser.find_element("id", "quality").text
    legend = browser.find_element("id", "legend").text
    assert all(name in legend for name in LABEL_RGB), legend

    # The opacity control and another modality keep the overlay; opacity 0 hides it.
    browser.execute_script(
        "const o = document.getElementById('opacity'); o.value = 0;"
        "o.dispatchEvent(new Event('input'))"
    )
    hidden = _drawn(browser, lambda c: sum(c.values()) < sum(colours.values()) / 10)
    assert sum(hidden.values()) < sum(colours.values()) / 10, (hidden, colours)
    browser.execute_script(
        "const o = document.getElementById('opacity'); o.value = 0.6;"
        "o.dispatchEvent(new Event('input'));"
        "const s = document.getElementById('modality'); s.value = 't1';"
        "document.body.dataset.state = 'loading'; s.dispatchEvent(new Event('change'))"
    )
    _state(browser, ("ready",))
    shown = _drawn(browser, lambda c: sum(c.values()) > 200)
    assert sum(shown.values()) > 200, shown

    # A download goes through the page with the key: the same bytes as the API's.
    browser.find_element("css selector", f"button[data-download='{job_id}_seg.nii.gz']").click()
    target = downloads / f"{job_id}_seg.nii.gz"
    deadline = time.monotonic() + 30
    while not target.is_file() and time.monotonic() < deadline:
        time.sleep(0.2)
    expected = keyed.client("alice").get(f"/v1/jobs/{job_id}/segmentation").content
    assert target.read_bytes() == expected

    resources = _resources(browser)
    assert all(url.startswith((keyed.url, "blob:", "data:")) for url in resources), resources
    assert not _errors(_console(browser))


def test_open_mode_keys_and_another_tenants_job(
    browser: Any, keyed: Api, open_api: Api, phantom: Phantom
) -> None:
    # Jobs of two owners on the keyed API, and one sent without a key in open mode.
    mine = keyed.client("alice").post("/v1/jobs", files=phantom.files()).json()["id"]
    theirs = keyed.client("bob").post("/v1/jobs", files=phantom.files()).json()["id"]
    anonymous = open_api.client(None).post("/v1/jobs", files=phantom.files()).json()["id"]

    # Open mode: no key asked for; the anonymous job is listed.
    browser.get(f"{open_api.url}/")
    browser.execute_script("sessionStorage.clear()")
    browser.refresh()
    _state(browser, ("ready",))
    assert "open mode" in browser.find_element("id", "key-status").text
    browser.find_element("css selector", f"#jobs tr[data-job='{anonymous}']")
    assert not browser.find_elements("css selector", f"#jobs tr[data-job='{mine}']")

    # Keys required: the page asks for one, says when it is wrong, then lists the owner's.
    browser.get(f"{keyed.url}/")
    browser.execute_script("sessionStorage.clear()")
    browser.refresh()
    _state(browser, ("needs-key",))
    assert "needs an API key" in browser.find_element("id", "key-status").text
    _enter_key(browser, "not-a-key")
    time.sleep(0.5)
    _state(browser, ("needs-key",))
    assert "not known" in browser.find_element("id", "key-status").text
    _enter_key(browser, API_KEYS["alice"])
    _state(browser, ("ready",))
    browser.find_element("css selector", f"#jobs tr[data-job='{mine}']")
    assert not browser.find_elements("css selector", f"#jobs tr[data-job='{theirs}']")
    browser.refresh()  # the key stays for the tab
    _state(browser, ("ready",))
    browser.find_element("css selector", f"#jobs tr[data-job='{mine}']")

    # Another tenant's job id: the viewer's not-found message, nothing of the job shown.
    browser.get(f"{keyed.url}/view/{theirs}")
    _state(browser, ("not-found",))
    message = browser.find_element("id", "message").text
    assert f"Job {theirs} was not found for this API key" in message
    assert not browser.find_element("id", "result").is_displayed()
    browser.get(f"{keyed.url}/view/{mine}")
    assert _state(browser, ("waiting", "ready"), timeout=120) in ("waiting", "ready")

    # Swagger UI from this server only.
    browser.get(f"{keyed.url}/docs")
    deadline = time.monotonic() + 30
    while not browser.find_elements("css selector", ".swagger-ui .info .title"):
        assert time.monotonic() < deadline, "Swagger UI did not render"
        time.sleep(0.2)
    assert "omnet" in browser.find_element("css selector", ".swagger-ui .info .title").text
    resources = _resources(browser)
    assert all(url.startswith(keyed.url) for url in resources), resources
