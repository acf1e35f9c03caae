"""DICOMweb settings, DICOM submission options and the store deliveries' bookkeeping
(no network: tests/service/test_api_dicom.py runs them against a real Orthanc)."""

from __future__ import annotations

import json
from datetime import timedelta

import pydicom
import pytest
from pydantic import ValidationError
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from model.io.dicom.classify import DEFAULT_RULES, SeriesRule, parse_series_rules
from service.config import Settings, parse_destinations, parse_endpoint
from service.db import DeliveryStatus, JobState, JobStore
from service.deliveries import deliver
from service.dicom_uploads import (
    check_study_on_source,
    check_uid,
    job_destinations,
    parse_series,
    series_rules,
)
from service.dicomweb import STORE_EVENT, DicomWebError, store_deliveries, store_files
from service.errors import ApiError
from tests.service.support import status_server


def test_endpoint_keeps_credentials_out_of_its_url():
    endpoint = parse_endpoint("pacs", "https://omnet:p%40ss@pacs.example.org:8443/dicom-web/")
    assert endpoint.url == "https://pacs.example.org:8443/dicom-web"
    assert (endpoint.username, endpoint.password) == ("omnet", "p@ss")
    assert "p@ss" not in repr(endpoint) and "p%40ss" not in repr(endpoint)
    assert parse_endpoint("x", "http://[::1]:8042/dw").url == "http://[::1]:8042/dw"


@pytest.mark.parametrize(
    "url", ["ftp://host/dw", "http:///dw", "pacs.example.org/dw", "http://h/dw?token=1"]
)
def test_bad_endpoints(url):
    with pytest.raises(ValueError, match="'pacs'") as info:
        parse_endpoint("pacs", url)
    assert url not in str(info.value)  # a URL may hold a password: never echoed


def test_destinations():
    parsed = parse_destinations(" a=http://h1/dw , b.2=https://u:p@h2/dw,")
    assert list(parsed) == ["a", "b.2"]
    assert parsed["b.2"].url == "https://h2/dw" and parsed["b.2"].password == "p"
    for bad in ("http://h/dw", "a=http://h/dw,a=http://h2/dw", "a b=http://h/dw", "=http://h"):
        with pytest.raises(ValueError):
            parse_destinations(bad)


def test_settings_refuse_bad_dicomweb_values_without_echoing_them():
    with pytest.raises(ValidationError) as info:
        Settings(dicomweb_destinations="pacs=ftp://user:secret@h/dw")
    assert "secret" not in str(info.value)
    with pytest.raises(ValidationError):
        Settings(dicom_series_rules='[{"modality": "dwi", "include": "x"}]')
    settings = Settings(dicom_series_rules='[{"modality": "t1ce", "include": "mprage km"}]')
    rules = series_rules(settings)
    assert rules[0] == SeriesRule("t1ce", "mprage km") and rules[1:] == DEFAULT_RULES


@pytest.mark.parametrize(
    "text",
    [
        "{}",
        "[1]",
        '[{"modality": "t1"}]',
        '[{"modality": "t1", "include": "(", "contrast": null}]',
        '[{"modality": "t1", "include": "x", "contrast": "yes"}]',
        '[{"modality": "t1", "include": "x", "colour": 1}]',
        "not json",
    ],
)
def test_bad_series_rules(text):
    with pytest.raises(ValueError):
        parse_series_rules(text)


def test_uid_and_series_options():
    assert check_uid("study_uid", " 1.2.840.10008.1 ") == "1.2.840.10008.1"
    for bad in ("", "1..2", "1.02", "1.2.a", "1." * 40 + "1"):
        with pytest.raises(ApiError) as info:
            check_uid("study_uid", bad)
        assert info.value.code == "bad_option"
    assert parse_series(" T1CE=1.2.3 , flair=7") == "t1ce=1.2.3,flair=7"
    for bad in ("t1ce", "dwi=1.2", "t1=1.2,t1=1.3"):
        with pytest.raises(ApiError):
            parse_series(bad)


def test_job_destinations():
    settings = Settings(dicomweb_destinations="a=http://h1/dw,b=http://h2/dw")
    assert list(job_destinations({"destinations": None}, settings)) == ["a", "b"]
    assert list(job_destinations({"destinations": "b"}, settings)) == ["b"]
    assert job_destinations({"destinations": ""}, settings) == {}


def _succeeded_job(store: JobStore, destinations: dict) -> str:
    job, _ = store.create("alice", {}, {"study": "jobs/x/inputs/study.zip"}, "q")
    claimed = store.claim(job.id, "w", 60)
    assert claimed is not None
    stores = store_deliveries(job.id, "alice", destinations, ["jobs/x/outputs/seg.dcm"])
    assert store.finish(job.id, "w", JobState.SUCCEEDED, timedelta(hours=1), deliveries=stores)
    return job.id


def test_store_deliveries_fail_clearly_and_can_be_retried(tmp_path):
    settings = Settings(storage_dir=tmp_path, dicomweb_destinations="pacs=http://127.0.0.1:9/dw")
    store = JobStore(f"sqlite:///{tmp_path / 'jobs.sqlite'}")
    job_id = _succeeded_job(store, settings.dicomweb_destination_endpoints())
    (delivery,) = store.deliveries(job_id)
    assert delivery.event == f"{STORE_EVENT}pacs" and delivery.url == "http://127.0.0.1:9/dw"
    assert json.loads(delivery.body) == {"files": ["jobs/x/outputs/seg.dcm"]}

    (claimed,) = store.claim_deliveries(5, 60)
    # The files are gone (the job was deleted): another attempt cannot help.
    assert deliver(claimed, settings, store) == DeliveryStatus.FAILED
    (failed,) = store.deliveries(job_id)
    assert failed.attempts == 1 and "no longer stored" in (failed.last_error or "")

    assert store.retry_deliveries(job_id, STORE_EVENT) == 1
    (again,) = store.deliveries(job_id)
    assert again.status == DeliveryStatus.PENDING and again.attempts == 0
    assert store.retry_deliveries(job_id, STORE_EVENT) == 0  # nothing failed any more
    (claimed,) = store.claim_deliveries(5, 60)
    gone = Settings(storage_dir=tmp_path)  # the destination was removed from the settings
    assert deliver(claimed, gone, store) == DeliveryStatus.FAILED
    assert "no longer configured" in (store.deliveries(job_id)[0].last_error or "")


def test_an_unreachable_source_is_answered_503(tmp_path):
    settings = Settings(storage_dir=tmp_path, dicomweb_source="http://127.0.0.1:9/dicom-web")
    with pytest.raises(ApiError) as info:
        check_study_on_source(settings, "1.2.3", {})
    assert (info.value.status, info.value.code) == (503, "dicomweb_unavailable")
    assert "try again later" in info.value.message


def _tiny_instance(path):
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = (
        meta.MediaStorageSOPClassUID,
        meta.MediaStorageSOPInstanceUID,
    )
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.mark.parametrize("status", [503, 429])
def test_a_busy_source_is_answered_503_and_a_busy_destination_is_retried(tmp_path, status):
    """dicomweb-client gives up on these statuses with its own RetryError; it is told
    apart from the service's own failures (no 500, no internal_error)."""
    with status_server(status) as (url, _server):
        settings = Settings(storage_dir=tmp_path, dicomweb_source=url)
        with pytest.raises(ApiError) as info:
            check_study_on_source(settings, "1.2.3", {})
        assert (info.value.status, info.value.code) == (503, "dicomweb_unavailable")
        assert f"HTTP {status}" in info.value.message

        seg = _tiny_instance(tmp_path / "seg.dcm")
        with pytest.raises(DicomWebError) as stored:
            store_files(parse_endpoint("pacs", url), [seg], 5)
        assert stored.value.code == "dicomweb_unavailable" and stored.value.transient
