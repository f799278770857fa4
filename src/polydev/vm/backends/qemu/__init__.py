"""The QEMU backend, one module per job:

- `machine`: `QemuVM`, one VM (its overlay, QEMU process, console and QMP socket; cold boot or restore);
- `snapshot`: what a snapshot holds, its key, and freezing a template's boot into one;
- `backend`: `QemuBackend`, the engine's `Backend` (snapshot once per size and network mode, restore per VM).
"""
