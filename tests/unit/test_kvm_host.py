"""vm/backends/kvm_host: a PVM-only /dev/kvm is named as the reason VMs run under TCG (doctor, fallback log)."""

from __future__ import annotations

from pathlib import Path

import pytest

from polydev.config import Settings
from polydev.vm import doctor
from polydev.vm.backends import kvm_host


@pytest.mark.parametrize("loaded, pvm_only", [
    (["kvm", "kvm_pvm"], True), (["kvm", "kvm_pvm", "kvm_intel"], False), (["kvm", "kvm_amd"], False),
    (["kvm", "kvm_intel"], False), ([], False),
])
def test_pvm_only_when_no_hardware_module_is_beside_it(tmp_path: Path, loaded: list[str], pvm_only: bool) -> None:
    for name in loaded:
        (tmp_path / name).mkdir()
    assert kvm_host.pvm_only(tmp_path) is pvm_only


def test_doctor_names_pvm_instead_of_promising_kvm(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from polydev.vm.backends.firecracker import checks

    monkeypatch.setattr(checks, "kvm_problem", lambda device: None)  # the device answers, as PVM's does
    monkeypatch.setattr(kvm_host, "pvm_only", lambda: True)
    check = doctor.accel_check(Settings(_env_file=None, POLYDEV_DATA_DIR=str(tmp_path)))  # type: ignore[call-arg]
    assert (check.status, check.detail.startswith(kvm_host.PVM_ONLY)) == ("warn", True)
    monkeypatch.setattr(kvm_host, "pvm_only", lambda: False)
    assert doctor.accel_check(Settings(_env_file=None, POLYDEV_DATA_DIR=str(tmp_path))).status == "ok"  # type: ignore[call-arg]
