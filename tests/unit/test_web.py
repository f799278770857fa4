"""The dashboard's serving: pages and their headers, its static files, and noVNC's vendor step (integrity
check, what is unpacked, the message when it is missing)."""

from __future__ import annotations

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


def _tarball(path: Path) -> Path:
    """A stand-in @novnc/novnc tarball, with entries the vendor step must leave out."""
    with tarfile.open(path, "w:gz") as tar:
        def add(name: str, data: bytes = b"", kind: bytes = tarfile.REGTYPE, link: str = "") -> None:
            info = tarfile.TarInfo(name)
            info.type, info.linkname, info.size = kind, link, len(data)
            tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)
        add("package/core/rfb.js", b"export default class RFB {}\n")
        add("package/vendor/pako/lib/zlib/inflate.js", b"export const inflate = 1;\n")
        add("package/LICENSE.txt", b"MPL-2.0\n")
        add("package/docs/API.md", b"# docs\n")
        add("package/core/../../escape.js", b"bad\n")
        add("package/core/link.js", kind=tarfile.SYMTYPE, link="/etc/passwd")
    return path


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
        vendor.install_novnc(settings, tarball=tgz)  # not the pinned release
    assert not vendor.novnc_installed(settings)

    monkeypatch.setattr(vendor, "NOVNC_INTEGRITY", vendor._sri(tgz))
    path = vendor.install_novnc(settings, tarball=tgz)
    assert vendor.novnc_installed(settings)
    files = sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file() or p.is_symlink())
    assert files == [".polydev-integrity", "LICENSE.txt", "core/rfb.js", "vendor/pako/lib/zlib/inflate.js"]
    assert not (tmp_path / "cache" / "escape.js").exists()

    # The running server picks it up without a restart.
    r = await client.get("/app/vendor/novnc/core/rfb.js")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/javascript")
    assert "class RFB" in r.text
