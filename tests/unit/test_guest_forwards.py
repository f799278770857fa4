"""VM_GUEST_FORWARDS: parsing and validation, and the QEMU option it becomes (no VM needed)."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from polydev.config import Settings, parse_guest_forwards
from polydev.vm.backends.qemu.machine import QemuVM
from polydev.vm.forwards import netdev_rule
from polydev.vm.images import Image


def test_a_list_of_forwards_parses_and_renders_back() -> None:
    text = "10.0.2.100:3128=127.0.0.1:8888, 10.0.2.101:80=[::1]:9999"
    forwards = parse_guest_forwards(text)
    assert [str(f) for f in forwards] == ["10.0.2.100:3128=127.0.0.1:8888", "10.0.2.101:80=[::1]:9999"]
    assert [netdev_rule(f, "/usr/bin/socat") for f in forwards] == [
        "guestfwd=tcp:10.0.2.100:3128-cmd:/usr/bin/socat - TCP4:127.0.0.1:8888",
        "guestfwd=tcp:10.0.2.101:80-cmd:/usr/bin/socat - TCP6:[::1]:9999",
    ]
    assert parse_guest_forwards("") == () and parse_guest_forwards(" , ") == ()


@pytest.mark.parametrize("text, why", [
    ("10.0.3.100:80=127.0.0.1:8888", "outside the user network"),
    ("10.0.2.2:80=127.0.0.1:8888", "host alias"),
    ("10.0.2.15:80=127.0.0.1:8888", "guest's own address"),
    ("10.0.2.3:53=127.0.0.1:53", "DNS"),
    ("10.0.2.100:80=192.168.1.1:8888", "not a loopback"),
    ("10.0.2.100:80=0.0.0.0:8888", "not a loopback"),
    ("10.0.2.100:0=127.0.0.1:8888", "outside 1-65535"),
    ("10.0.2.100:80=127.0.0.1:65536", "outside 1-65535"),
    ("10.0.2.100:80", "GUEST_IP:PORT=HOST_IP:PORT"),
    ("10.0.2.100=127.0.0.1:80", "not ADDRESS:PORT"),
    ("10.0.2.100:80=localhost:80", "does not appear to be"),
    ("10.0.2.100:80=127.0.0.1:80;rm:1", "does not appear to be"),
    ("10.0.2.100:80=127.0.0.1:1,10.0.2.100:80=127.0.0.1:2", "forwarded twice"),
])
def test_bad_forwards_are_refused(text: str, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        parse_guest_forwards(text)


def test_the_setting_is_read_from_the_environment_and_validated(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Settings().vm_guest_forwards == ()
    monkeypatch.setenv("VM_GUEST_FORWARDS", "10.0.2.100:3128=127.0.0.1:8888")
    settings = Settings()
    assert [str(f) for f in settings.vm_guest_forwards] == ["10.0.2.100:3128=127.0.0.1:8888"]
    assert settings.redacted()["VM_GUEST_FORWARDS"] == "10.0.2.100:3128=127.0.0.1:8888"
    monkeypatch.setenv("VM_GUEST_FORWARDS", "10.0.2.100:3128=10.0.0.1:8888")
    with pytest.raises(ValidationError, match="not a loopback"):
        Settings()


def test_a_relay_path_that_could_smuggle_arguments_is_refused() -> None:
    (fwd,) = parse_guest_forwards("10.0.2.100:80=127.0.0.1:8888")
    with pytest.raises(ValueError, match="relay path"):
        netdev_rule(fwd, "/usr/bin/socat -v")


def test_every_forward_goes_on_the_user_netdev_with_restrict(tmp_path: Path) -> None:
    image = Image(tmp_path)  # argv only names the files
    forwards = parse_guest_forwards("10.0.2.100:3128=127.0.0.1:8888,10.0.2.101:80=127.0.0.1:9999")
    vm = QemuVM(image, tmp_path / "vm", guest_forwards=forwards)
    argv = vm.argv("tcg")
    netdev = argv[argv.index("-netdev") + 1]
    assert netdev.startswith("user,id=net0,restrict=on,hostfwd=tcp:127.0.0.1:")
    assert ",guestfwd=tcp:10.0.2.100:3128-cmd:" in netdev and " - TCP4:127.0.0.1:8888" in netdev
    assert ",guestfwd=tcp:10.0.2.101:80-cmd:" in netdev and " - TCP4:127.0.0.1:9999" in netdev
    assert "guestfwd" not in " ".join(QemuVM(image, tmp_path / "plain").argv("tcg"))
