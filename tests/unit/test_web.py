"""The dashboard's serving: pages and their headers, its static files, and the vendor step of noVNC and xterm.js
(integrity check, what is unpacked, the message when it is missing)."""

from __future__ import annotations

import dataclasses
import io
import tarfile
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from polydev.api.app import create_app
from polydev.web import vendor
from tests.support.app import make_settings


@pytest.fixture
async def client(tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(make_settings(tmp_path))  # no lifespan: these routes need no services
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://polydev.test") as c:
        yield c


def _package(path: Path, files: dict[str, bytes], links: tuple[str, ...] = ()) -> Path:
    """A stand-in npm tarball: `files` under package/, plus symlinks the vendor step must leave out."""
    with tarfile.open(path, "w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for name in links:
            info = tarfile.TarInfo(name)
            info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
            tar.addfile(info)
    return path


def _tarball(path: Path) -> Path:
    """A stand-in @novnc/novnc tarball, with entries the vendor step must leave out."""
    return _package(path, {
        "package/core/rfb.js": b"export default class RFB {}\n",
        "package/vendor/pako/lib/zlib/inflate.js": b"export const inflate = 1;\n",
        "package/LICENSE.txt": b"MPL-2.0\n",
        "package/docs/API.md": b"# docs\n",
        "package/core/../../escape.js": b"bad\n",
    }, links=("package/core/link.js",))


def _xterm_tarball(path: Path) -> Path:
    """A stand-in @xterm/xterm tarball: the ES module and the stylesheet are kept; the UMD build, source maps,
    sources and docs are not."""
    return _package(path, {
        "package/lib/xterm.mjs": b"export class Terminal {}\n",
        "package/lib/xterm.mjs.map": b"{}\n",
        "package/lib/xterm.js": b"(function(){})()\n",
        "package/css/xterm.css": b".xterm { position: relative; }\n",
        "package/src/browser/Terminal.ts": b"export {}\n",
        "package/LICENSE": b"MIT\n",
        "package/README.md": b"# xterm\n",
    }, links=("package/lib/evil.mjs",))


def _pin(monkeypatch: pytest.MonkeyPatch, key: str, tarball: Path) -> None:
    """Pin `key` to this stand-in tarball, as if it were the release."""
    monkeypatch.setitem(vendor.PACKAGES, key, dataclasses.replace(vendor.PACKAGES[key], integrity=vendor._sri(tarball)))


async def test_root_redirects_and_every_view_is_the_page(client: httpx.AsyncClient) -> None:
    r = await client.get("/")
    assert r.status_code == 307 and r.headers["location"] == "/app"
    for path in ("/app", "/app/providers", "/app/runs/0b7a4c9e-0000-4000-8000-000000000000"):
        r = await client.get(path)
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
        assert '<script type="module" src="/app/static/js/app.js">' in r.text
        assert r.headers["cache-control"] == "no-store"
        csp = r.headers["content-security-policy"]
        assert "script-src 'self';" in csp and "connect-src 'self' ws://polydev.test wss://polydev.test;" in csp


async def test_a_strange_host_adds_nothing_to_the_policy(client: httpx.AsyncClient) -> None:
    r = await client.get("/app", headers={"Host": "x; script-src *"})
    assert "script-src *" not in r.headers["content-security-policy"]
    assert "connect-src 'self' ;" in r.headers["content-security-policy"]


async def test_api_routes_are_not_shadowed(client: httpx.AsyncClient) -> None:
    r = await client.get("/api/no-such-route")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    assert (await client.get("/openapi.json")).json()["info"]["title"] == "Polydev"


async def test_static_modules_are_served_as_javascript(client: httpx.AsyncClient) -> None:
    r = await client.get("/app/static/js/app.js")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/javascript")
    assert (await client.get("/app/static/js/nothing.js")).status_code == 404


async def test_missing_novnc_says_how_to_install_it(client: httpx.AsyncClient) -> None:
    r = await client.get("/app/vendor/novnc/core/rfb.js")
    assert r.status_code == 404
    assert r.json()["error"]["code"] == "novnc_missing" and "polydev web vendor" in r.json()["error"]["message"]


async def test_vendor_checks_integrity_and_unpacks_only_the_package(
        client: httpx.AsyncClient, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = make_settings(tmp_path)
    tgz = _tarball(tmp_path / "novnc.tgz")
    with pytest.raises(vendor.VendorError, match="integrity"):
        vendor.install(settings, "novnc", tarball=tgz)  # not the pinned release
    assert not vendor.installed(settings, "novnc")

    _pin(monkeypatch, "novnc", tgz)
    path = vendor.install(settings, "novnc", tarball=tgz)
    assert vendor.installed(settings, "novnc")
    files = sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file() or p.is_symlink())
    assert files == [".polydev-integrity", "LICENSE.txt", "core/rfb.js", "vendor/pako/lib/zlib/inflate.js"]
    assert not (tmp_path / "cache" / "escape.js").exists()

    # The running server picks it up without a restart.
    r = await client.get("/app/vendor/novnc/core/rfb.js")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/javascript")
    assert "class RFB" in r.text


async def test_xterm_is_refused_unless_it_is_the_pinned_release_then_served(
        client: httpx.AsyncClient, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = make_settings(tmp_path)
    r = await client.get("/app/vendor/xterm/lib/xterm.mjs")
    assert r.status_code == 404
    assert r.json()["error"]["code"] == "xterm_missing" and "polydev web vendor" in r.json()["error"]["message"]
    assert (await client.get("/app/vendor/xterm-addon-fit/lib/addon-fit.mjs")).json()["error"]["code"] == \
        "xterm_addon_fit_missing"

    tgz = _xterm_tarball(tmp_path / "xterm.tgz")
    with pytest.raises(vendor.VendorError, match="is not @xterm/xterm@6.0.0: integrity"):
        vendor.install(settings, "xterm", tarball=tgz)
    assert not vendor.installed(settings, "xterm")
    assert not vendor.package_dir(settings, "xterm").exists()  # nothing of the wrong tarball is kept

    _pin(monkeypatch, "xterm", tgz)
    path = vendor.install(settings, "xterm", tarball=tgz)
    files = sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file() or p.is_symlink())
    assert files == [".polydev-integrity", "LICENSE", "css/xterm.css", "lib/xterm.mjs"]
    r = await client.get("/app/vendor/xterm/lib/xterm.mjs")
    assert r.status_code == 200 and "javascript" in r.headers["content-type"]  # an ES module the page imports
    assert "class Terminal" in r.text
    r = await client.get("/app/vendor/xterm/css/xterm.css")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/css")


def test_install_all_takes_given_tarballs_by_their_integrity(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = make_settings(tmp_path)
    novnc, xterm = _tarball(tmp_path / "a.tgz"), _xterm_tarball(tmp_path / "b.tgz")
    fit = _package(tmp_path / "c.tgz", {"package/lib/addon-fit.mjs": b"export class FitAddon {}\n"})
    junk = _package(tmp_path / "junk.tgz", {"package/lib/xterm.mjs": b"alert(1)\n"})
    for key, tgz in (("novnc", novnc), ("xterm", xterm), ("xterm-addon-fit", fit)):
        _pin(monkeypatch, key, tgz)
    with pytest.raises(vendor.VendorError, match="junk.tgz is none of the pinned packages"):
        vendor.install_all(settings, tarballs=[xterm, junk], npm="no-such-npm")
    assert not any(vendor.installed(settings, key) for key in vendor.PACKAGES)

    # In any order; npm is not asked (it is not there).
    done = vendor.install_all(settings, tarballs=[fit, novnc, xterm], npm="no-such-npm")
    assert [pkg.key for pkg, _ in done] == ["novnc", "xterm", "xterm-addon-fit"]
    assert all(vendor.installed(settings, key) for key in vendor.PACKAGES)
    assert (vendor.package_dir(settings, "xterm-addon-fit") / "lib" / "addon-fit.mjs").is_file()
