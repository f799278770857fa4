"""The QEMU backend, one module per job:

- `command`: `QemuCommand`, what one VM is made of, where its files are, and its kernel and QEMU command lines;
- `machine`: `QemuVM`, that VM running (its overlay, QEMU process, console and QMP socket; cold boot or
  restore);
- `snapshot`: what a snapshot holds, its key, and freezing a template's boot into one;
- `backend`: `QemuBackend`, the engine's `Backend` (snapshot once per size and network mode, restore per VM);
- `errors`: what all of them raise.
"""
