"""service/config.py: owners of API keys, settings refused at start-up, secrets kept out of
what prints settings."""

from __future__ import annotations

import base64
import os
import subprocess

import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from service.app import create_app
from service.cli import serve as serve_command
from service.config import Settings, key_owner
from service.redact import masked_url
from tests.service.support import OMNET, free_port


def test_keys_without_owner_with_a_common_prefix_get_different_owners():
    keys = Settings(api_keys="hospital-A-9f8e7d, hospital-B-1a2b3c ,k1:alice").keys()
    assert keys["k1"] == "alice"
    a, b = keys["hospital-A-9f8e7d"], keys["hospital-B-1a2b3c"]
    assert a != b
    assert a == key_owner("hospital-A-9f8e7d") and a.startswith("key-") and len(a) == 20
    assert "hospit" not in a and "9f8e7d" not in a  # the name does not show the key


def test_key_owner_is_stable_and_whole_key_dependent():
    assert key_owner("abc") == key_owner("abc")
    owners = {key_owner(f"same-prefix-{i}") for i in range(1000)}
    assert len(owners) == 1000


def test_a_stale_interval_of_fewer_than_three_heartbeats_is_refused():
    with pytest.raises(ValidationError) as info:
        Settings(worker_heartbeat_s=300, stale_after_s=120)
    message = str(info.value)
    assert "OMNET_STALE_AFTER_S (120 s) must be at least 3 x OMNET_WORKER_HEARTBEAT_S" in message
    with pytest.raises(ValidationError):
        Settings(worker_heartbeat_s=10, stale_after_s=29.9)
    # Three heartbeats exactly, the defaults, and the fast settings of the service tests.
    assert Settings(worker_heartbeat_s=10, stale_after_s=30).stale_after_s == 30
    assert (Settings().worker_heartbeat_s, Settings().stale_after_s) == (10, 120)
    assert Settings(**{"worker_heartbeat_s": 1, "stale_after_s": 3}).stale_after_s == 3


@pytest.mark.parametrize("command", [["worker", "--pool", "solo"], ["serve", "--no-worker"]])
def test_commands_refuse_such_settings_at_start_up(command, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("OMNET_")}
    env.update(
        OMNET_STORAGE_DIR=str(tmp_path / "storage"),
        OMNET_WORKER_HEARTBEAT_S="300",
        OMNET_STALE_AFTER_S="120",
    )
    if command[0] == "serve":
        command = [*command, "--port", str(free_port())]
    # A command that starts anyway runs until the timeout: the test then fails.
    done = subprocess.run(
        [*OMNET, *command], env=env, capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 1, (done.returncode, done.stderr[-2000:])
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith(f"omnet {command[0]}: error: invalid Settings: ")
    assert "OMNET_STALE_AFTER_S (120 s) must be at least 3 x OMNET_WORKER_HEARTBEAT_S" in lines[0]


#: Secrets in the settings of the test below; none may show in what prints settings.
SECRETS = {
    "api_keys": "key-secret-1:alice,key-secret-2",
    "database_url": "postgresql+psycopg://omnet:db-secret-3@db.internal:5432/omnet",
    "broker_url": "redis://:broker-secret-4@redis.internal:6379/0",
    "result_backend": "redis://omnet:backend-secret-5@redis.internal:6379/1?password=q-secret-6",
    "webhook_secrets": "alice:whsec_" + base64.b64encode(b"webhook-secret-7" * 2).decode(),
    "dicomweb_source": "http://pacs:dicom-secret-8@pacs.internal/dicom-web",
    "dicomweb_destinations": "archive=https://pacs:dicom-secret-9@archive.internal/dicom-web",
}
SECRET_WORDS = [f"secret-{n}" for n in range(1, 10)]


def test_repr_and_str_of_settings_hold_no_secret():
    settings = Settings(**SECRETS)  # type: ignore[arg-type]
    for text in (repr(settings), str(settings), f"{settings!r}"):
        assert [w for w in SECRET_WORDS if w in text] == [], text
        assert "whsec_" not in text
    # What is not secret still shows: hosts, users, the settings' names.
    shown = repr(settings)
    assert "postgresql+psycopg://omnet:***@db.internal:5432/omnet" in shown
    assert "redis://:***@redis.internal:6379/0" in shown
    assert "password=***" in shown and "api_keys=SecretStr('**********')" in shown
    # The values themselves are unchanged for the code that uses them.
    assert settings.keys() == {"key-secret-1": "alice", "key-secret-2": key_owner("key-secret-2")}
    assert settings.database == SECRETS["database_url"]
    assert settings.broker_url == SECRETS["broker_url"]
    source = settings.dicomweb_source_endpoint()
    assert source is not None and source.password == "dicom-secret-8"


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://redis:6379/0", "redis://redis:6379/0"),
        ("sqlite:////srv/omnet data/jobs.sqlite", "sqlite:////srv/omnet data/jobs.sqlite"),
        ("amqp://guest:p@ss@rabbit//", "amqp://guest:***@rabbit//"),
        (
            "sentinel://:a-1@s1:26379;sentinel://:a-2@s2:26379",
            "sentinel://:***@s1:26379;sentinel://:***@s2:26379",
        ),
        (
            "postgresql://u@h/db?sslmode=require&Password=x#f",
            "postgresql://u@h/db?sslmode=require&Password=***#f",
        ),
        ("http://[::1/broken", "***"),
    ],
)
def test_masked_url(url, shown):
    assert masked_url(url) == shown


def test_the_start_up_lines_of_omnet_serve_hold_no_secret(tmp_path):
    settings = Settings(storage_dir=tmp_path, **SECRETS)  # type: ignore[arg-type]
    lines = serve_command._where("0.0.0.0", 8000, settings) + serve_command._mode(settings)
    assert [w for w in SECRET_WORDS if w in lines] == [], lines
    assert "broker redis://:***@redis.internal:6379/0" in lines


def test_readyz_names_no_secret_of_what_failed(tmp_path):
    broker = f"redis://:broker-secret-4@127.0.0.1:{free_port()}/0"  # nothing listens
    settings = Settings(storage_dir=tmp_path / "storage", broker_url=broker, broker_timeout_s=1)
    with TestClient(create_app(settings)) as client:
        ready = client.get("/readyz")
    assert ready.status_code == 503, ready.text
    assert ready.json()["checks"]["broker"].startswith("failed: ")
    assert "secret" not in ready.text
