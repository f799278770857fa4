"""What kind of KVM this host has, for the messages that say why a VM runs under TCG.

A host without hardware virtualisation may still offer /dev/kvm through PVM (the kvm_pvm module), which runs
only guest kernels built for it: a stock kernel gets past its decompressor and hangs, and QEMU with
`-cpu host` stops on an MSR first. QEMU still tries KVM (the try is what proves it), but the fallback's log
line and `polydev doctor` name the reason instead of leaving a bare hang or MSR error to decode.
"""

from __future__ import annotations

from pathlib import Path

HARDWARE_MODULES = ("kvm_intel", "kvm_amd")
PVM_ONLY = ("this host's KVM is PVM (kvm_pvm, without kvm_intel or kvm_amd): it runs only guest kernels "
            "built for PVM, not the image's stock Debian kernel")


def pvm_only(modules: Path = Path("/sys/module")) -> bool:
    """Whether the loaded KVM is PVM alone (no hardware-assisted module beside it)."""
    return (modules / "kvm_pvm").is_dir() and not any((modules / m).is_dir() for m in HARDWARE_MODULES)
