"""noVNC for the dashboard's login view, installed from its npm package at install time.

Not committed (it is someone else's release) and never fetched by the browser from a CDN: `polydev web
vendor` (run by scripts/run.sh and scripts/test.sh) asks npm for the pinned tarball, checks it against the
pinned integrity, and unpacks it under the vendor directory, which the server serves at /app/vendor/novnc/.
Its `core/` is plain ES modules with relative `.js` imports (pako included under `vendor/`), so the browser
loads `core/rfb.js` with a module import and no bundler.
"""

from __future__ import annotations

import base64
import hashlib
import os
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

from polydev.config import Settings

NOVNC_PACKAGE = "@novnc/novnc"
NOVNC_VERSION = "1.7.0"
# npm's `dist.integrity` of that version: a different tarball (a re-published or tampered one) is refused.
NOVNC_INTEGRITY = "sha512-ucEJOx4T2avIRCleodk7YobZj5O2Ga2AeLfQ69A/yjG9HHba2+PDgwSkN3FttrmG+70ZGx21sElNFouK13RzyA=="
# What the page needs from the package; the rest (docs, README) is left out of what is served.
_KEEP = ("core/", "vendor/", "LICENSE.txt", "AUTHORS")
_MARKER = ".polydev-integrity"


class VendorError(Exception):
    pass


def vendor_root(settings: Settings) -> Path:
    return settings.web_vendor_dir or settings.cache_dir / "web"


def novnc_dir(settings: Settings) -> Path:
    return vendor_root(settings) / f"novnc-{NOVNC_VERSION}"


def novnc_installed(settings: Settings) -> bool:
    """True when the pinned version was unpacked completely (the marker is written last)."""
    marker = novnc_dir(settings) / _MARKER
    try:
        return marker.read_text().strip() == NOVNC_INTEGRITY
    except OSError:
        return False


def _sri(path: Path) -> str:
    digest = hashlib.sha512()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 16), b""):
            digest.update(chunk)
    return "sha512-" + base64.b64encode(digest.digest()).decode()


def _npm_pack(dest: Path, npm: str) -> Path:
    exe = shutil.which(npm)
    if exe is None:
        raise VendorError(f"{npm} is not installed: install npm (Debian: apt-get install npm), or pass "
                          f"--tarball with {NOVNC_PACKAGE}-{NOVNC_VERSION}.tgz")
    proc = subprocess.run([exe, "pack", f"{NOVNC_PACKAGE}@{NOVNC_VERSION}", "--pack-destination", str(dest),
                           "--silent"], cwd=dest, capture_output=True, text=True, timeout=300, check=False)
    tarballs = sorted(dest.glob("*.tgz"))
    if proc.returncode != 0 or len(tarballs) != 1:
        raise VendorError(f"npm pack {NOVNC_PACKAGE}@{NOVNC_VERSION} failed: {proc.stderr.strip()[-500:]}")
    return tarballs[0]


def _unpack(tarball: Path, dest: Path) -> None:
    with tarfile.open(tarball, "r:gz") as tar:
        members = []
        for m in tar.getmembers():
            rel = m.name.removeprefix("package/")
            if rel == m.name or not rel.startswith(_KEEP) or not (m.isfile() or m.isdir()) \
                    or ".." in Path(rel).parts:
                continue  # only the package's own regular files and folders, inside the tree
            m.name = rel
            m.mode = 0o755 if m.isdir() else 0o644
            members.append(m)
        # Where Python has it (3.11.4+), the "data" filter checks the same again.
        extra = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
        tar.extractall(dest, members=members, **extra)


def install_novnc(settings: Settings, *, tarball: Path | None = None, npm: str = "npm") -> Path:
    """Unpack the pinned noVNC into the vendor directory (nothing to do when it is there already)."""
    final = novnc_dir(settings)
    if novnc_installed(settings):
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=final.parent, prefix=".novnc-") as tmp:
        work = Path(tmp)
        if tarball is None:
            fetched = work / "npm"
            fetched.mkdir()
            tarball = _npm_pack(fetched, npm)
        got = _sri(tarball)
        if got != NOVNC_INTEGRITY:
            raise VendorError(f"{tarball.name} is not {NOVNC_PACKAGE}@{NOVNC_VERSION}: integrity {got}, "
                              f"expected {NOVNC_INTEGRITY}")
        unpacked = work / "novnc"
        _unpack(tarball, unpacked)
        if not (unpacked / "core" / "rfb.js").is_file():
            raise VendorError(f"{tarball.name} has no core/rfb.js")
        (unpacked / _MARKER).write_text(NOVNC_INTEGRITY + "\n")
        # Swap in whole: the server never serves a half-unpacked copy.
        if final.exists():
            shutil.rmtree(final)
        os.replace(unpacked, final)
    return final
