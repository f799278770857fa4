"""E2B compatibility: the control plane at the SDK's paths (control.py), envd's runtime protocol
(envd_process.py, envd_fs.py, envd_files.py over connect.py's framing), and the routing that sends envd's
requests there (routing.py). Logic lives in core/sandboxes.py and core/sandbox_procs.py."""
