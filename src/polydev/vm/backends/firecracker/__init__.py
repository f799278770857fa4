"""The Firecracker backend, one module per job:

- `api`: the request bodies (pydantic, shaped after the published Swagger specification) and
  `FirecrackerClient`, one typed method per call of Firecracker's REST API on its Unix socket (and that socket's
  short alias when its path is too long);
- `config`: what a VM boots from (`VMConfig`, `DriveSpec`) and where a snapshot's files go (`SnapshotFiles`);
- `checks`: why a machine cannot run Firecracker (binary, KVM, kernel format), in one sentence;
- `jailer`: running Firecracker under the jailer (its flags, files linked into the jail);
- `process`: `FirecrackerProcess`, one Firecracker process and the VM in it (spawn, boot, snapshot, restore,
  stop);
- `console`: its stdout, the guest's serial console, copied to a file with secrets redacted and watched;
- `backend`: `FirecrackerBackend`, the engine's `Backend` (snapshot once per size, restore per VM);
- `errors`: what all of them raise.
"""
