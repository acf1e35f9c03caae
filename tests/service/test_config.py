"""service/config.py: owners of API keys, settings refused at start-up."""

from __future__ import annotations

import os
import subprocess

import pytest
from pydantic import ValidationError

from service.config import Settings, key_owner
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
