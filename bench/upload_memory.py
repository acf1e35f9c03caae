"""Peak memory and time of the API process while it checks one large NIfTI submission.

    python bench/upload_memory.py [--shape 700 700 500] [--repeats 2] [--code-dir DIR ...]

Writes four int16 volumes of ``--shape`` (mostly zeros with a noisy block: small when
compressed, large when decoded), starts ``omnet serve --no-worker`` in embedded mode on a
temporary storage folder, posts the four files once, and reads the API process's peak
resident memory (VmHWM) and the time until the answer. Each ``--code-dir`` (a checkout
of another version, e.g. made with ``git worktree add``) is measured the same way, runs
alternating, so that versions compare on the same machine in the same minutes.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import nibabel as nib
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
MODALITIES = ("t1", "t1ce", "t2", "flair")


def write_volumes(folder: Path, shape: tuple[int, int, int]) -> dict[str, Path]:
    data = np.zeros(shape, np.int16)
    rng = np.random.default_rng(0)
    block = tuple(slice(n // 4, 3 * n // 4) for n in shape)
    size = tuple(s.stop - s.start for s in block)
    data[block] = rng.integers(0, 1000, size, dtype=np.int16) // 64 * 64
    first = folder / "big_t1.nii.gz"
    nib.save(nib.Nifti1Image(data, np.eye(4)), first)
    paths = {"t1": first}
    for m in MODALITIES[1:]:
        paths[m] = folder / f"big_{m}.nii.gz"
        shutil.copy(first, paths[m])
    return paths


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def measure(code_dir: Path, paths: dict[str, Path]) -> tuple[int, float, float]:
    """(HTTP status, seconds to the answer, peak RSS in GB) of one submission."""
    port = _port()
    with tempfile.TemporaryDirectory() as store:
        env = {
            **os.environ,
            "OMNET_OPEN_MODE": "true",
            "OMNET_STORAGE_DIR": store,
            "PYTHONPATH": str(code_dir),
        }
        env.pop("OMNET_BROKER_URL", None)
        cmd = [sys.executable, "-m", "service.cli", "serve", "--no-worker", "--port", str(port)]
        proc = subprocess.Popen(
            cmd, cwd=code_dir, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        try:
            url = f"http://127.0.0.1:{port}"
            for _ in range(600):
                try:
                    if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(0.1)
            handles = {m: open(p, "rb") for m, p in paths.items()}  # noqa: SIM115
            try:
                files = {m: (p.name, handles[m], "application/gzip") for m, p in paths.items()}
                start = time.monotonic()
                response = httpx.post(f"{url}/v1/jobs", files=files, timeout=600)
                seconds = time.monotonic() - start
            finally:
                for h in handles.values():
                    h.close()
            status = Path(f"/proc/{proc.pid}/status").read_text()
            peak_kb = next(int(line.split()[1]) for line in status.splitlines() if "VmHWM" in line)
            return response.status_code, seconds, peak_kb / 2**20
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=3, default=(700, 700, 500))
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--code-dir", type=Path, action="append", default=[])
    args = parser.parse_args()
    versions = [ROOT, *args.code_dir]
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_volumes(Path(tmp), tuple(args.shape))
        mb = sum(p.stat().st_size for p in paths.values()) / 2**20
        print(f"four {'x'.join(map(str, args.shape))} int16 volumes, {mb:.0f} MB compressed")
        for r in range(args.repeats):
            for code_dir in versions:
                status, seconds, peak = measure(code_dir, paths)
                print(
                    f"run {r + 1} {code_dir}: HTTP {status} in {seconds:.1f} s, "
                    f"API peak RSS {peak:.2f} GB",
                    flush=True,
                )


if __name__ == "__main__":
    main()
