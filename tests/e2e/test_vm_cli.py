"""`polydev doctor` (local) and `polydev vm ...` (against a live server), in subprocesses as an operator runs them."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from polydev.vm import images
from tests.e2e.test_cli import polydev
from tests.support.live_server import LiveServer
from tests.support.required import unmet

CHECK_NAMES = {"backend", "kvm", "image", "network", "firecracker", "data dir", "cache dir"}


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    import os

    drop = ("DATABASE_URL", "REDIS_URL", "CREDENTIAL_ENCRYPTION_KEY", "VM_BACKEND", "NETWORK_MODE", "VM_IMAGE_PROFILE",
            "FIRECRACKER_BINARY", "POLYDEV_URL", "POLYDEV_TOKEN")
    base = {k: v for k, v in os.environ.items() if k not in drop}
    return {**base, "POLYDEV_DATA_DIR": str(tmp_path / "data"), "POLYDEV_CACHE_DIR": str(tmp_path / "cache")}


def doctor(env: dict[str, str]) -> tuple[int, dict]:  # type: ignore[type-arg]
    result = polydev("doctor", "--json", env=env, check=False)
    assert result.returncode in (0, 1), result.stderr
    return result.returncode, json.loads(result.stdout)


def by_name(report: dict) -> dict[str, dict[str, str]]:  # type: ignore[type-arg]
    return {c["name"]: c for c in report["checks"]}


def fake_image(cache: Path, profile: str) -> Path:
    """An image directory as `polydev image build` leaves it (contents do not matter to the doctor)."""
    directory = images.images_dir(cache) / images.recipe_for(profile).hash
    directory.mkdir(parents=True)
    (directory / images.MANIFEST).write_text(json.dumps({"recipe": {"profile": profile}}))
    for name in (images.ROOTFS, images.KERNEL, images.INITRD):
        (directory / name).write_bytes(b"x")
    return directory


def test_doctor_without_an_image_fails_and_says_how_to_build_it(env: dict[str, str]) -> None:
    code, report = doctor(env)
    assert code == 1 and report["ok"] is False
    assert report["backend"] == "qemu" and report["network_mode"] == "user" and report["image_profile"] == "full"
    checks = by_name(report)
    assert CHECK_NAMES <= set(checks)
    assert all(c["status"] in ("ok", "warn", "fail") and c["detail"] for c in report["checks"])
    assert checks["image"]["status"] == "fail" and "polydev image build --profile full" in checks["image"]["detail"]
    assert checks["backend"]["status"] == "fail"
    assert checks["network"]["status"] == "ok" and checks["data dir"]["status"] == "ok"
    # Firecracker is not the configured backend: its absence is a warning at most.
    assert checks["firecracker"]["status"] in ("ok", "warn")
    table = polydev("doctor", env=env, check=False)
    assert table.returncode == 1 and "cannot run VMs" in table.stdout and "image" in table.stdout


def test_doctor_passes_with_qemu_and_the_configured_image(env: dict[str, str], tmp_path: Path) -> None:
    if shutil.which("qemu-system-x86_64") is None or shutil.which("qemu-img") is None:
        unmet("QEMU is not installed (scripts/test.sh installs it)")
    image = fake_image(tmp_path / "cache", "test")
    code, report = doctor(env | {"VM_IMAGE_PROFILE": "test"})
    checks = by_name(report)
    assert code == 0 and report["ok"] is True, report
    assert checks["image"]["status"] == "ok" and image.name in checks["image"]["detail"]
    assert checks["backend"]["status"] == "ok" and checks["kvm"]["status"] in ("ok", "warn")
    # The other profile's image is not the configured one.
    code, report = doctor(env | {"VM_IMAGE_PROFILE": "full"})
    assert code == 1 and f"test {image.name}" in by_name(report)["image"]["detail"]


def test_doctor_names_what_the_firecracker_backend_lacks(env: dict[str, str], tmp_path: Path) -> None:
    code, report = doctor(env | {"VM_BACKEND": "firecracker", "FIRECRACKER_BINARY": str(tmp_path / "nope")})
    checks = by_name(report)
    assert code == 1 and checks["firecracker"]["status"] == "fail"
    assert str(tmp_path / "nope") in checks["firecracker"]["detail"]
    assert "FIRECRACKER_GOLDEN_ROOTFS" in checks["image"]["detail"]
    assert checks["network"]["status"] == "fail" and "NETWORK_MODE=tap" in checks["network"]["detail"]


def test_doctor_checks_the_tap_modes_needs(env: dict[str, str]) -> None:
    code, report = doctor(env | {"NETWORK_MODE": "tap", "NETWORK_IP_POOL_START": "10.9.0.9",
                                 "NETWORK_IP_POOL_END": "10.9.0.2"})
    checks = by_name(report)
    assert code == 1 and {"root", "/dev/net/tun", "nft", "ip"} <= set(checks)
    assert checks["network"]["status"] == "fail" and "NETWORK_IP_POOL" in checks["network"]["detail"]
    # In tap mode each slot reaches the gateway at its own gateway address (no socat relay needed).
    assert checks["egress"]["status"] == "ok" and "169.254.0.22:3128" in checks["egress"]["detail"]


def test_doctor_reports_the_egress_gateway(env: dict[str, str]) -> None:
    _, report = doctor(env | {"EGRESS_ADDRESS_POOL": "203.0.113.8/30,2001:db8:7::/64"})
    egress = by_name(report)["egress"]
    assert egress["status"] == "ok" and "10.0.2.99:3128" in egress["detail"]
    assert "203.0.113.8/30,2001:db8:7::/64" in egress["detail"]
    _, report = doctor(env | {"EGRESS_GATEWAY": "off"})
    assert by_name(report)["egress"]["status"] == "warn"


def test_vm_commands_when_the_server_cannot_run_vms(live_server: LiveServer, env: dict[str, str]) -> None:
    env = env | {"POLYDEV_URL": live_server.url, "POLYDEV_TOKEN": live_server.admin_token}
    health = httpx.get(f"{live_server.url}/health").json()
    assert health["status"] == "ok" and health["vm"]["available"] is False
    for args in (["vm", "ls"], ["vm", "create"]):
        result = polydev(*args, env=env, check=False)
        assert result.returncode == 1, result
        assert "VMs are unavailable on this server" in result.stderr and "vm_unavailable" in result.stderr
        assert "polydev image build" in result.stderr  # the reason, with what to do about it
        assert "Traceback" not in result.stderr


def test_vm_commands_against_a_server_with_an_engine(fake_vm_server: LiveServer, env: dict[str, str]) -> None:
    env = env | {"POLYDEV_URL": fake_vm_server.url, "POLYDEV_TOKEN": fake_vm_server.admin_token}
    created = polydev("vm", "create", "--purpose", "cli", "--ttl", "300", env=env)
    vm_id = created.stdout.strip()
    assert len(vm_id) == 36 and "running on agent" in created.stderr
    assert vm_id in polydev("vm", "ls", env=env).stdout
    # Options before `--` are polydev's; everything after it is the command, option-like words included.
    ran = polydev("vm", "exec", vm_id, "-e", "WHO=world", "--cwd", "/tmp", "--", "sh", "-c",
                  'echo "hello $WHO in $(pwd)"; echo --not-an-option; echo oops >&2; exit 3', env=env, check=False)
    assert (ran.returncode, ran.stdout, ran.stderr) == (3, "hello world in /tmp\n--not-an-option\n", "oops\n")
    piped = subprocess.run([sys.executable, "-m", "polydev", "vm", "exec", "--stdin", vm_id, "--", "cat"], env=env,
                           input="from stdin", capture_output=True, text=True, timeout=60, check=False)
    assert piped.returncode == 0 and piped.stdout == "from stdin"
    slow = polydev("vm", "exec", vm_id, "--timeout", "0.5", "--", "sleep", "30", env=env, check=False)
    assert slow.returncode == 124 and "timed out" in slow.stderr
    missing = polydev("vm", "exec", vm_id, "--", "no-such-program-xyz", env=env, check=False)
    assert missing.returncode == 1 and "exec_rejected" in missing.stderr and "Traceback" not in missing.stderr
    bad = polydev("vm", "exec", "not-a-uuid", "--", "true", env=env, check=False)
    assert bad.returncode == 1 and "malformed_id" in bad.stderr
    assert polydev("vm", "rm", vm_id, env=env).stdout.strip() == f"destroyed {vm_id}"
    again = polydev("vm", "rm", vm_id, env=env, check=False)
    assert again.returncode == 1 and "not_found" in again.stderr
    assert vm_id not in polydev("vm", "ls", env=env).stdout
    assert "destroyed" in polydev("vm", "ls", "--all", env=env).stdout
    with httpx.Client(base_url=fake_vm_server.url,
                      headers={"Authorization": f"Bearer {fake_vm_server.admin_token}"}) as admin:
        uid = admin.post("/api/users", json={"name": "vmcli-user"}).json()["id"]
        token = admin.post(f"/api/users/{uid}/tokens", json={"name": "t"}).json()["token"]
    denied = polydev("vm", "ls", env=env | {"POLYDEV_TOKEN": token}, check=False)
    assert denied.returncode == 1 and "forbidden" in denied.stderr
