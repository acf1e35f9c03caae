"""Fetches the web page's third-party assets from npm into ``service/static/vendor``.

The pinned packages (:data:`PINS`) are installed with npm into a temporary folder; their
built bundles and licences are copied into the package, and ``assets.json`` records each
package's version, npm's integrity hash of its tarball and the SHA-256 of every file
copied (``tests/service/test_web_assets.py`` checks the files against it).

* NiiVue (``@niivue/niivue``, BSD-2-Clause): its self-contained UMD build
  (``dist/niivue.umd.js``, global ``niivue``). The npm package ships no LICENSE file, so
  ``vendor/niivue/LICENSE`` is the one of the NiiVue repository, kept as committed; the
  licences of the packages its bundle includes (its dependencies as npm installs them)
  are collected into ``THIRD_PARTY_LICENSES``.
* Swagger UI (``swagger-ui-dist``, Apache-2.0): the bundle, stylesheet and favicon that
  ``/docs`` loads, with its LICENSE and NOTICE.

Run it after changing a pin: ``python scripts/fetch_web_assets.py`` (needs node and npm),
then commit ``service/static/vendor``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VENDOR = ROOT / "service" / "static" / "vendor"

#: npm package -> exact version.
PINS = {"@niivue/niivue": "0.69.0", "swagger-ui-dist": "5.36.0"}

#: npm package -> (vendor folder, {file in the package: name in the folder}).
FILES = {
    "@niivue/niivue": ("niivue", {"dist/niivue.umd.js": "niivue.umd.js"}),
    "swagger-ui-dist": (
        "swagger-ui",
        {
            "swagger-ui-bundle.js": "swagger-ui-bundle.js",
            "swagger-ui.css": "swagger-ui.css",
            "favicon-32x32.png": "favicon-32x32.png",
            "LICENSE": "LICENSE",
            "NOTICE": "NOTICE",
        },
    ),
}

#: The licence each package declares (checked, so that a new version's change is seen).
LICENSES = {"@niivue/niivue": "BSD-2-Clause", "swagger-ui-dist": "Apache-2.0"}

LICENSE_NAMES = ("LICENSE", "LICENSE.md", "LICENSE.txt", "LICENCE", "license", "COPYING")


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def npm_install(folder: Path) -> dict[str, dict[str, str]]:
    """Installs :data:`PINS` into ``folder``; returns npm's lock entries by package path."""
    manifest = {"name": "omnet-web-assets", "private": True, "dependencies": PINS}
    (folder / "package.json").write_text(json.dumps(manifest, indent=2))
    subprocess.run(
        ["npm", "install", "--ignore-scripts", "--omit=dev", "--no-audit", "--no-fund"],
        cwd=folder,
        check=True,
        timeout=600,
    )
    lock = json.loads((folder / "package-lock.json").read_text())
    packages: dict[str, dict[str, str]] = lock["packages"]
    return packages


def dependency_tree(lock: dict[str, dict[str, str]], name: str) -> list[str]:
    """The lock's package paths of ``name``'s runtime dependencies, recursively."""
    seen: list[str] = []
    todo = list(lock[f"node_modules/{name}"].get("dependencies", {}))
    while todo:
        dep = todo.pop()
        path = f"node_modules/{dep}"
        if path in seen or path not in lock:
            continue
        seen.append(path)
        todo.extend(lock[path].get("dependencies", {}))
    return sorted(seen)


def third_party_licenses(folder: Path, lock: dict[str, dict[str, str]], name: str) -> str:
    """The licence texts of the packages ``name``'s bundle is built from."""
    parts = []
    for path in dependency_tree(lock, name):
        entry = lock[path]
        package = path.removeprefix("node_modules/")
        header = f"{package} {entry.get('version', '?')} ({entry.get('license', 'unknown')})"
        texts = [p for n in LICENSE_NAMES if (p := folder / path / n).is_file()]
        body = texts[0].read_text(errors="replace").strip() if texts else "(no licence file)"
        parts.append(f"{'=' * 78}\n{header}\n{'=' * 78}\n{body}\n")
    return "\n".join(parts)


def fetch(folder: Path) -> dict[str, object]:
    lock = npm_install(folder)
    record: dict[str, object] = {}
    for package, version in PINS.items():
        entry = lock[f"node_modules/{package}"]
        meta = json.loads((folder / "node_modules" / package / "package.json").read_text())
        if meta["version"] != version or meta.get("license") != LICENSES[package]:
            raise SystemExit(
                f"{package}: npm installed {meta['version']} ({meta.get('license')}); "
                f"expected {version} ({LICENSES[package]})"
            )
        name, files = FILES[package]
        target = VENDOR / name
        target.mkdir(parents=True, exist_ok=True)
        for source, dest in files.items():
            shutil.copyfile(folder / "node_modules" / package / source, target / dest)
        if package == "@niivue/niivue":
            notices = third_party_licenses(folder, lock, package)
            (target / "THIRD_PARTY_LICENSES").write_text(notices)
            if not (target / "LICENSE").is_file():
                raise SystemExit(f"{target / 'LICENSE'} is missing: restore it from git")
        record[package] = {
            "version": version,
            "license": LICENSES[package],
            "integrity": entry["integrity"],
            "files": {
                f"{name}/{p.name}": sha256(p) for p in sorted(target.iterdir()) if p.is_file()
            },
        }
    return record


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.parse_args()
    if shutil.which("npm") is None:
        print("fetch_web_assets: npm is not installed (install node and npm)", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory() as tmp:
        record = fetch(Path(tmp))
    (VENDOR / "assets.json").write_text(json.dumps(record, indent=2) + "\n")
    for package, info in record.items():
        print(f"{package} {info['version']}: {len(info['files'])} files")  # type: ignore[index]
    return 0


if __name__ == "__main__":
    sys.exit(main())
