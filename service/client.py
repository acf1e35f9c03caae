"""A client of the omnet HTTP API for pipelines: submit a case, wait for it, download.

    from service.client import OmnetClient

    with OmnetClient("https://omnet.example.org", api_key=key) as client:
        created = client.submit("cases/Brats18_X")  # folder, 4D NIfTI, DICOM zip or folder
        status = client.wait(created.id)
        if status.state == "succeeded":
            files = client.download(status, "out/Brats18_X")

Answers 503 (queue or database briefly unavailable) and 429 are retried after their
``Retry-After`` (else after 1, 2, 4, ... s), as are connections that fail; a submission
carries an ``Idempotency-Key``, so retrying it never makes a second job. Other errors
raise :class:`ClientError` with the API's stable ``code`` and its ``message``.
"""

from __future__ import annotations

import email.utils
import logging
import os
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from datetime import datetime, timezone
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO

import httpx

from service.db import JobState
from service.schemas import JobCreated, JobPage, JobStatus
from service.storage import OUTPUT_FILES

logger = logging.getLogger(__name__)

#: Job states after which nothing changes.
FINAL_STATES = (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)
#: Answers that say "try again shortly".
RETRY_STATUSES = (429, 503)
#: Result links of a job's status -> the file each is saved as (the worker's names).
DOWNLOADS = dict(OUTPUT_FILES)

Files = list[tuple[str, tuple[str, BinaryIO, str]]]


class ClientError(Exception):
    """A request the API refused or could not answer: HTTP status (0: no answer), the
    API's error code and message."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}" if status else message)
        self.status = status
        self.code = code
        self.message = message


class WaitTimeoutError(ClientError):
    """:meth:`OmnetClient.wait` gave up before the job finished."""


def case_files(case: str | os.PathLike[str]) -> list[tuple[str, Path]]:
    """The multipart fields that send ``case``: a BraTS case folder (four NIfTI files
    named by modality), a 4D NIfTI file (``image``), a DICOM study zip (``study``) or a
    folder of DICOM files (``dicom``, each file of it).

    Raises:
        ClientError: ``not_found`` or ``not_a_case`` (status 0: nothing was sent).
    """
    from model.io.nifti.files import find_case_files, nifti_stem
    from model.io.volumes import MODALITIES, InputError

    path = Path(case)
    if path.is_file():
        if path.suffix.lower() == ".zip":
            return [("study", path)]
        if nifti_stem(path) is not None:
            return [("image", path)]
        raise ClientError(
            0, "not_a_case", f"{path} is neither a NIfTI file (.nii, .nii.gz) nor a zip"
        )
    if not path.is_dir():
        raise ClientError(0, "not_found", f"{path} does not exist")
    files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
    if any(nifti_stem(p) is not None for p in files):
        try:
            found = find_case_files(path)
        except InputError as exc:
            raise ClientError(0, exc.code, str(exc)) from exc
        return [(m, found[m]) for m in MODALITIES]
    if not files:
        raise ClientError(0, "not_a_case", f"{path} holds no files")
    return [("dicom", p) for p in files]


def _retry_after(response: httpx.Response) -> float | None:
    """Seconds from a Retry-After header (seconds or an HTTP date); None without one."""
    value = response.headers.get("Retry-After")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, (when - datetime.now(timezone.utc)).total_seconds())


def _error(response: httpx.Response) -> ClientError:
    try:
        body = response.json()["error"]
        return ClientError(response.status_code, str(body["code"]), str(body["message"]))
    except (ValueError, KeyError, TypeError):
        text = response.text.strip()[:200] or response.reason_phrase
        return ClientError(response.status_code, "http_error", text)


class OmnetClient:
    """Talks to one omnet server with one API key (none for a server in open mode).

    Args:
        server: the server's root URL, e.g. ``http://127.0.0.1:8000``.
        api_key: sent as ``X-API-Key``.
        timeout_s: connect and read timeout of each request.
        upload_timeout_s: write timeout of a submission's upload.
        retries: how many times a 503/429 or a failed connection is retried.
        max_retry_wait_s: longest wait before a retry (a longer Retry-After is cut).
        transport: an httpx transport (tests); default: a real connection.
        sleep: how to wait (tests).
    """

    def __init__(
        self,
        server: str,
        api_key: str | None = None,
        *,
        timeout_s: float = 60.0,
        upload_timeout_s: float = 600.0,
        retries: int = 5,
        max_retry_wait_s: float = 60.0,
        transport: httpx.BaseTransport | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if retries < 0:
            raise ValueError(f"retries must be >= 0, got {retries!r}")
        headers = {"X-API-Key": api_key} if api_key else {}
        self.server = server.rstrip("/")
        self.retries = retries
        self.max_retry_wait_s = max_retry_wait_s
        self._upload_timeout = httpx.Timeout(timeout_s, write=upload_timeout_s)
        self._sleep = sleep
        self._http = httpx.Client(
            base_url=self.server,
            headers=headers,
            timeout=httpx.Timeout(timeout_s),
            transport=transport,
            follow_redirects=False,
        )

    def __enter__(self) -> OmnetClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    # ------------------------------------------------------------------ requests
    @contextmanager
    def _send(
        self,
        method: str,
        url: str,
        *,
        files: Callable[[ExitStack], Files] | None = None,
        **kwargs: Any,
    ) -> Iterator[httpx.Response]:
        """One request, retried on 503/429 and on failed connections; yields the 2xx
        response (streamed: read it inside the block)."""
        attempt = 0
        while True:
            attempt += 1
            wait: float | None = None
            with ExitStack() as opened:
                if files is not None:
                    kwargs["files"] = files(opened)  # fresh file objects per attempt
                try:
                    request = self._http.build_request(method, url, **kwargs)
                    response = self._http.send(request, stream=True)
                except httpx.TransportError as exc:
                    if attempt > self.retries:
                        raise ClientError(
                            0, "unreachable", f"{method} {self.server}{url} failed: {exc}"
                        ) from exc
                    logger.info("%s %s failed (%s); retrying", method, url, exc)
                else:
                    try:
                        if response.status_code < 400:
                            yield response
                            return
                        response.read()
                        if response.status_code not in RETRY_STATUSES or attempt > self.retries:
                            raise _error(response)
                        wait = _retry_after(response)
                        logger.info(
                            "%s %s answered %d; retrying", method, url, response.status_code
                        )
                    finally:
                        response.close()
            backoff = 2.0 ** (attempt - 1)
            self._sleep(min(backoff if wait is None else wait, self.max_retry_wait_s))

    def _json(self, method: str, url: str, **kwargs: Any) -> Any:
        with self._send(method, url, **kwargs) as response:
            response.read()
            if response.status_code == 204:
                return None
            return response.json()

    # ------------------------------------------------------------------ jobs
    def submit(
        self,
        case: str | os.PathLike[str],
        options: Mapping[str, str | bool | int] | None = None,
        *,
        idempotency_key: str | None = None,
    ) -> JobCreated:
        """Submits ``case`` (see :func:`case_files`) with the job ``options`` of POST
        /v1/jobs (``postprocess``, ``label_convention``, ``probabilities``, ``preview``,
        ...); retries reuse one Idempotency-Key (default: a new random one)."""
        fields = case_files(case)
        data = {
            name: str(value).lower() if isinstance(value, bool) else str(value)
            for name, value in (options or {}).items()
        }
        key = idempotency_key or uuid.uuid4().hex

        def files(opened: ExitStack) -> Files:
            return [
                (
                    name,
                    (path.name, opened.enter_context(path.open("rb")), "application/octet-stream"),
                )
                for name, path in fields
            ]

        body = self._json(
            "POST",
            "/v1/jobs",
            files=files,
            data=data,
            headers={"Idempotency-Key": key},
            timeout=self._upload_timeout,
        )
        return JobCreated.model_validate(body)

    def status(self, job_id: str) -> JobStatus:
        return JobStatus.model_validate(self._json("GET", f"/v1/jobs/{job_id}"))

    def jobs(self, limit: int = 20, offset: int = 0) -> JobPage:
        """The key's jobs, newest first."""
        body = self._json("GET", "/v1/jobs", params={"limit": limit, "offset": offset})
        return JobPage.model_validate(body)

    def cancel(self, job_id: str) -> None:
        """Cancels a queued or running job, or deletes a finished one with its files."""
        self._json("DELETE", f"/v1/jobs/{job_id}")

    def wait(
        self,
        job_id: str,
        *,
        timeout_s: float | None = None,
        poll_s: float = 1.0,
        max_poll_s: float = 15.0,
        on_status: Callable[[JobStatus], None] | None = None,
    ) -> JobStatus:
        """Polls the job until it succeeded, failed or was cancelled, and returns that
        status; the wait between polls grows from ``poll_s`` by half each time up to
        ``max_poll_s``. ``on_status`` sees every status polled.

        Raises:
            WaitTimeoutError: the job had not finished after ``timeout_s``.
        """
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        interval = poll_s
        while True:
            status = self.status(job_id)
            if on_status is not None:
                on_status(status)
            if status.state in FINAL_STATES:
                return status
            if deadline is not None and time.monotonic() + interval > deadline:
                raise WaitTimeoutError(
                    0,
                    "wait_timeout",
                    f"job {job_id} is still {status.state} after {timeout_s:.0f} s",
                )
            self._sleep(interval)
            interval = min(interval * 1.5, max_poll_s)

    def download(self, status: JobStatus, out_dir: str | os.PathLike[str]) -> dict[str, Path]:
        """Saves every result the job's status links to into ``out_dir`` (created), under
        the worker's names (``segmentation.nii.gz``, ``metrics.json``, ``preview.png``,
        ``segmentation.dcm``, ...); returns the files by kind.

        Raises:
            ClientError: the job has no results (``no_result``), or a download failed.
        """
        if status.state != JobState.SUCCEEDED:
            raise ClientError(0, "no_result", f"job {status.id} is {status.state}: no results")
        folder = Path(out_dir)
        folder.mkdir(parents=True, exist_ok=True)
        links = status.links.model_dump()
        saved = {}
        for kind, filename in DOWNLOADS.items():
            url = links.get(kind)
            if not url:
                continue
            path = httpx.URL(url)
            target = folder / filename
            self._download(path.raw_path.decode(), target)
            saved[kind] = target
        return saved

    def _download(self, url: str, target: Path) -> None:
        """Streams ``url`` into ``target``, replacing it only once complete."""
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
        try:
            with os.fdopen(fd, "wb") as out, self._send("GET", url) as response:
                for chunk in response.iter_bytes():
                    out.write(chunk)
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
