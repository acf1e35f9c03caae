"""service/openmp.py: the processes that run inference wait passively between parallel
regions, unless the user's environment says otherwise.

The effective policy is read from the OpenMP runtime itself: with
``OMP_DISPLAY_ENV=VERBOSE`` libgomp prints its settings when torch loads it, and
``GOMP_SPINCOUNT`` is 0 for passive waits, 300,000 when no policy is set and 3e10 for
active ones. A policy set after torch was imported would leave it at 300,000.
"""

from __future__ import annotations

import os
import re
import subprocess
import uuid
from pathlib import Path

import pytest

from service.openmp import (
    DEFAULT_WAIT_POLICY,
    WAIT_POLICY_ENV,
    LateWaitPolicyWarning,
    prefer_passive_waits,
)
from tests.service.support import (
    OMNET,
    PYTHON,
    Phantom,
    Stack,
    base_env,
    redis_env,
    stack,
)

PASSIVE_SPINS, UNSET_SPINS, ACTIVE_SPINS = 0, 300_000, 30_000_000_000
SPIN_COUNT = re.compile(r"GOMP_SPINCOUNT = '(\d+)'")


def _spin_counts(output: str) -> list[int]:
    """The spin counts that the OpenMP runtimes of a process's output reported when they
    loaded (one per runtime and process); skips unless they are libgomp's."""
    counts = [int(n) for n in SPIN_COUNT.findall(output)]
    if not counts:
        pytest.skip(
            "the OpenMP runtime printed no GOMP_SPINCOUNT with OMP_DISPLAY_ENV=VERBOSE "
            f"(not libgomp?); output:\n{output[-2000:]}"
        )
    return counts


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """This environment without any OpenMP wait setting, plus ``extra``."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in (WAIT_POLICY_ENV, "GOMP_SPINCOUNT") and not k.startswith("OMNET_")
    }
    return {**env, "OMP_DISPLAY_ENV": "VERBOSE", "OMNET_STORAGE_DIR": str(tmp_path), **extra}


# --------------------------------------------------------------------------- the policy
def test_an_unset_policy_becomes_passive():
    env: dict[str, str] = {"PATH": "/bin"}
    assert prefer_passive_waits(env) == DEFAULT_WAIT_POLICY == "PASSIVE"
    assert env == {"PATH": "/bin", WAIT_POLICY_ENV: "PASSIVE"}
    env = {WAIT_POLICY_ENV: ""}  # set but empty: as unset (libgomp would reject it)
    assert prefer_passive_waits(env) == "PASSIVE"
    assert env == {WAIT_POLICY_ENV: "PASSIVE"}


@pytest.mark.parametrize("users", ["ACTIVE", "active", "PASSIVE"])
def test_the_users_policy_wins(users):
    env = {WAIT_POLICY_ENV: users}
    assert prefer_passive_waits(env) == users
    assert env == {WAIT_POLICY_ENV: users}


def test_setting_it_after_torch_loaded_warns(monkeypatch):
    import torch  # noqa: F401  (loaded in this process, as the conftests load it)

    monkeypatch.delenv(WAIT_POLICY_ENV, raising=False)
    with pytest.warns(LateWaitPolicyWarning, match="after torch was imported"):
        assert prefer_passive_waits() == "PASSIVE"
    assert os.environ[WAIT_POLICY_ENV] == "PASSIVE"


def test_a_late_policy_has_no_effect(tmp_path):
    """The check below can fail: set after ``import torch``, the runtime keeps spinning."""
    code = "import torch; from service.openmp import prefer_passive_waits; prefer_passive_waits()"
    done = subprocess.run(
        [PYTHON, "-c", code], env=_env(tmp_path), capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert set(_spin_counts(done.stderr)) == {UNSET_SPINS}
    assert "LateWaitPolicyWarning" in done.stderr


# --------------------------------------------------------------------------- entry points
#: Process entry points that load torch, and so the OpenMP runtime, right after starting:
#: ``omnet`` (console script; also ``omnet segment``, ``serve``, ``worker``) and the
#: Celery worker's own (``python -m worker``; ``--help`` builds the worker app first).
ENTRY_POINTS = {
    "omnet": [*OMNET, "model-info", "--width", "4"],
    "python -m service.cli": [PYTHON, "-m", "service.cli", "model-info", "--width", "4"],
    "python -m worker": [PYTHON, "-m", "worker", "--help"],
}


@pytest.mark.parametrize("entry", sorted(ENTRY_POINTS))
@pytest.mark.parametrize(
    ("users", "spins"), [(None, PASSIVE_SPINS), ("ACTIVE", ACTIVE_SPINS)], ids=["unset", "active"]
)
def test_entry_points_set_the_policy_before_torch_loads(tmp_path, entry, users, spins):
    env = _env(tmp_path) if users is None else _env(tmp_path, **{WAIT_POLICY_ENV: users})
    done = subprocess.run(ENTRY_POINTS[entry], env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    assert set(_spin_counts(done.stderr)) == {spins}
    assert "LateWaitPolicyWarning" not in done.stderr


# --------------------------------------------------------------------------- real workers
def _environ(pid: int) -> dict[str, str]:
    """The environment that process ``pid`` started with (exec'd or forked), from /proc."""
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    return dict(item.split("=", 1) for item in raw.decode(errors="replace").split("\0") if item)


def _parent(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def _run_a_job(deployment: Stack, phantom: Phantom) -> int:
    """Submits the phantom, waits for success; the pid of the process that segmented it."""
    api = deployment.apis[0]
    client = api.client("alice")
    response = client.post("/v1/jobs", files=phantom.files(), data={"preview": "false"})
    assert response.status_code == 202, response.text
    job_id = response.json()["id"]
    deployment.wait_state(client, job_id, ("succeeded",), timeout=180)
    record = deployment.record(job_id)
    assert record is not None and record.worker
    return int(record.worker.rsplit(":", 1)[1])


def _no_wait_setting(deployment: Stack) -> None:
    for name in (WAIT_POLICY_ENV, "GOMP_SPINCOUNT"):
        deployment.env.pop(name, None)
    deployment.env["OMP_DISPLAY_ENV"] = "VERBOSE"


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="needs Linux's /proc")
def test_the_prefork_child_that_runs_a_job_waits_passively(
    tmp_path, redis_url, tiny_checkpoint, phantom
):
    """``omnet worker --pool prefork``: the pool child that segments the job was forked
    from a worker whose OpenMP runtime loaded with passive waits, and has the setting in
    its environment."""
    prefix = f"omnet-openmp-{uuid.uuid4().hex[:8]}"
    with stack("openmp", tmp_path, redis_env(redis_url, prefix, tiny_checkpoint)) as deployment:
        _no_wait_setting(deployment)
        deployment.wait_api(deployment.start_api("api"))
        worker = deployment.start_worker("prefork", pool="prefork")
        deployment.wait_worker(worker)
        child = _run_a_job(deployment, phantom)
        assert child != worker.pid and _parent(child) == worker.pid, "not a pool child"
        assert _environ(child).get(WAIT_POLICY_ENV) == "PASSIVE"
        # The omnet process before its exec, and the Celery worker that forks the child.
        assert set(_spin_counts(worker.output())) == {PASSIVE_SPINS}


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="needs Linux's /proc")
def test_the_embedded_worker_of_serve_waits_passively(tmp_path, tiny_checkpoint, phantom):
    """``omnet serve``: its worker process, which segments the job, has the setting."""
    with stack("openmp-serve", tmp_path, base_env(tiny_checkpoint)) as deployment:
        _no_wait_setting(deployment)
        serve = deployment.wait_api(deployment.start_serve())
        segmenter = _run_a_job(deployment, phantom)
        # The omnet processes before their exec (serve's loads no torch) and the worker.
        assert _parent(segmenter) == serve.proc.pid, "not the embedded worker"
        assert _environ(segmenter).get(WAIT_POLICY_ENV) == "PASSIVE"
        assert set(_spin_counts(serve.proc.output())) == {PASSIVE_SPINS}
