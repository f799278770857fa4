"""The dashboard's third-party browser code (noVNC for the login view, xterm.js for the workspace terminal),
installed from their npm packages at install time.

Not committed (they are someone else's releases) and never fetched by the browser from a CDN: `polydev web
vendor` (run by scripts/run.sh and scripts/test.sh) asks npm for each pinned tarball, checks it against the
pinned integrity, and unpacks what the page needs under the vendor directory, which the server serves at
/app/vendor/<key>/. Every package here ships plain ES modules the browser imports with no bundler: noVNC's
`core/` (relative `.js` imports, pako included under `vendor/`), xterm's and its fit addon's `lib/*.mjs`.
"""

from __future__ import annotations

import base64
import hashlib
import os
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from polydev.config import Settings


@dataclass(frozen=True)
class Package:
    key: str  # its folder, and where it is served: /app/vendor/<key>/
    title: str  # as messages name it
    name: str  # on npm
    version: str
    # npm's `dist.integrity` of that version: a different tarball (a re-published or tampered one) is refused.
    integrity: str
    # What the page needs from the package (folders end in "/"); the rest (docs, sources, maps) is left out.
    keep: tuple[str, ...]
    entry: str  # the file the page loads: an unpacked package without it is refused


PACKAGES: dict[str, Package] = {p.key: p for p in (
    Package("novnc", "noVNC", "@novnc/novnc", "1.7.0",
            "sha512-ucEJOx4T2avIRCleodk7YobZj5O2Ga2AeLfQ69A/yjG9HHba2+PDgwSkN3FttrmG+70ZGx21sElNFouK13RzyA==",
            ("core/", "vendor/", "LICENSE.txt", "AUTHORS"), "core/rfb.js"),
    Package("xterm", "xterm.js", "@xterm/xterm", "6.0.0",
            "sha512-TQwDdQGtwwDt+2cgKDLn0IRaSxYu1tSUjgKarSDkUM0ZNiSRXFpjxEsvc/Zgc5kq5omJ+V0a8/kIM2WD3sMOYg==",
            ("lib/xterm.mjs", "css/xterm.css", "LICENSE"), "lib/xterm.mjs"),
    Package("xterm-addon-fit", "xterm.js's fit addon", "@xterm/addon-fit", "0.11.0",
            "sha512-jYcgT6xtVYhnhgxh3QgYDnnNMYTcf8ElbxxFzX0IZo+vabQqSPAjC3c1wJrKB5E19VwQei89QCiZZP86DCPF7g==",
            ("lib/addon-fit.mjs", "LICENSE"), "lib/addon-fit.mjs"),
)}
_MARKER = ".polydev-integrity"


class VendorError(Exception):
    pass


def vendor_root(settings: Settings) -> Path:
    return settings.web_vendor_dir or settings.cache_dir / "web"


def package_dir(settings: Settings, key: str) -> Path:
    pkg = PACKAGES[key]
    return vendor_root(settings) / f"{pkg.key}-{pkg.version}"


def installed(settings: Settings, key: str) -> bool:
    """True when the pinned version was unpacked completely (the marker is written last)."""
    marker = package_dir(settings, key) / _MARKER
    try:
        return marker.read_text().strip() == PACKAGES[key].integrity
    except OSError:
        return False


def _sri(path: Path) -> str:
    digest = hashlib.sha512()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 16), b""):
            digest.update(chunk)
    return "sha512-" + base64.b64encode(digest.digest()).decode()


def _npm_pack(pkg: Package, dest: Path, npm: str) -> Path:
    spec = f"{pkg.name}@{pkg.version}"
    exe = shutil.which(npm)
    if exe is None:
        raise VendorError(f"{npm} is not installed: install npm (Debian: apt-get install npm), or pass "
                          f"--tarball with {spec}'s .tgz")
    proc = subprocess.run([exe, "pack", spec, "--pack-destination", str(dest), "--silent"], cwd=dest,
                          capture_output=True, text=True, timeout=300, check=False)
    tarballs = sorted(dest.glob("*.tgz"))
    if proc.returncode != 0 or len(tarballs) != 1:
        raise VendorError(f"npm pack {spec} failed: {proc.stderr.strip()[-500:]}")
    return tarballs[0]


def _wanted(pkg: Package, rel: str) -> bool:
    return any(rel.startswith(k) if k.endswith("/") else rel == k for k in pkg.keep)


def _unpack(pkg: Package, tarball: Path, dest: Path) -> None:
    with tarfile.open(tarball, "r:gz") as tar:
        members = []
        for m in tar.getmembers():
            rel = m.name.removeprefix("package/")
            if rel == m.name or not _wanted(pkg, rel) or not (m.isfile() or m.isdir()) \
                    or ".." in Path(rel).parts:
                continue  # only the package's own regular files and folders, inside the tree
            m.name = rel
            m.mode = 0o755 if m.isdir() else 0o644
            members.append(m)
        # Where Python has it (3.11.4+), the "data" filter checks the same again.
        extra = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
        tar.extractall(dest, members=members, **extra)


def install(settings: Settings, key: str, *, tarball: Path | None = None, npm: str = "npm") -> Path:
    """Unpack the pinned package into the vendor directory (nothing to do when it is there already)."""
    pkg = PACKAGES[key]
    final = package_dir(settings, key)
    if installed(settings, key):
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=final.parent, prefix=f".{pkg.key}-") as tmp:
        work = Path(tmp)
        if tarball is None:
            fetched = work / "npm"
            fetched.mkdir()
            tarball = _npm_pack(pkg, fetched, npm)
        got = _sri(tarball)
        if got != pkg.integrity:
            raise VendorError(f"{tarball.name} is not {pkg.name}@{pkg.version}: integrity {got}, "
                              f"expected {pkg.integrity}")
        unpacked = work / "package"
        _unpack(pkg, tarball, unpacked)
        if not (unpacked / pkg.entry).is_file():
            raise VendorError(f"{tarball.name} has no {pkg.entry}")
        (unpacked / _MARKER).write_text(pkg.integrity + "\n")
        # Swap in whole: the server never serves a half-unpacked copy.
        if final.exists():
            shutil.rmtree(final)
        os.replace(unpacked, final)
    return final


def install_all(settings: Settings, *, tarballs: Iterable[Path] = (), npm: str = "npm"
                ) -> list[tuple[Package, Path]]:
    """Every pinned package; a given tarball (offline installs) stands in for npm for the package whose
    integrity it has, and one that is none of them is refused."""
    given: dict[str, Path] = {}
    for tarball in tarballs:
        got = _sri(tarball)
        pkg = next((p for p in PACKAGES.values() if p.integrity == got), None)
        if pkg is None:
            pinned = ", ".join(f"{p.name}@{p.version}" for p in PACKAGES.values())
            raise VendorError(f"{tarball.name} is none of the pinned packages ({pinned}): integrity {got}")
        given[pkg.key] = tarball
    return [(p, install(settings, p.key, tarball=given.get(p.key), npm=npm)) for p in PACKAGES.values()]
