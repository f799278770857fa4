"""The steps of an image build, in order. Each takes the root file system directory and reports progress.

Everything runs as child processes with argument lists (polydev.vm.proc), on the host: no chroot mounts,
no loop devices. The one chroot (byte-compiling and warming Node's compile cache) needs no mounts.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

from polydev.vm import images as im
from polydev.vm import initramfs
from polydev.vm.proc import run

Progress = Callable[[str, str], None]
DEFAULT_MIRROR = "http://deb.debian.org/debian"
# Host commands the build needs, and the Debian package that brings each.
# QEMU is not needed to build, but an image is no use without it (`image test`, the tests).
HOST_TOOLS = {"debootstrap": "debootstrap", "mkfs.ext4": "e2fsprogs", "npm": "npm", "dpkg-query": "dpkg",
              "modprobe": "kmod", "qemu-system-x86_64": "qemu-system-x86", "qemu-img": "qemu-utils"}
GUEST_INIT = f"""#!/usr/bin/python3 -IS
# PID 1 of a Polydev VM (kernel command line: init={im.INIT_PATH}). -I -S: no site, no environment, fast start.
import sys
sys.path.insert(0, "{im.GUEST_ROOT}")
from polydev.guest.init import main
main()
"""


def _apt_install(packages: list[str], progress: Progress) -> None:
    if os.geteuid() != 0:
        raise RuntimeError(f"missing on this host: {', '.join(packages)}; install them (as root: apt-get install "
                           f"{' '.join(packages)}) or run the build as root")
    env = {"DEBIAN_FRONTEND": "noninteractive"}
    sink = lambda line: progress("host packages", line)  # noqa: E731
    try:
        run(["apt-get", "install", "-y", "-q", "--no-install-recommends", *packages], on_line=sink, env=env)
    except Exception:  # a machine fresh from its image may have no package lists yet
        run(["apt-get", "update", "-q"], on_line=sink, env=env)
        run(["apt-get", "install", "-y", "-q", "--no-install-recommends", *packages], on_line=sink, env=env)


def host_tools(progress: Progress) -> None:
    missing = sorted({pkg for tool, pkg in HOST_TOOLS.items() if shutil.which(tool) is None})
    if missing:
        progress("host packages", f"installing {' '.join(missing)}")
        _apt_install(missing, progress)


def _version_key(text: str) -> list[object]:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def kernel(work: Path, cache_dir: Path, progress: Progress) -> str:
    """Copy Debian's cloud kernel into `work` and build the small initramfs that loads its virtio modules."""
    def installed() -> list[str]:
        return sorted((p.name[len("vmlinuz-"):] for p in Path("/boot").glob("vmlinuz-*-cloud-amd64")
                       if (Path("/lib/modules") / p.name[len("vmlinuz-"):]).is_dir()), key=_version_key)

    versions = installed()
    if not versions:
        progress("kernel", f"installing {im.KERNEL_PACKAGE} on the host")
        _apt_install([im.KERNEL_PACKAGE], progress)
        versions = installed()
    if not versions:
        raise RuntimeError(f"{im.KERNEL_PACKAGE} installed but no /boot/vmlinuz-*-cloud-amd64 with its modules")
    version = versions[-1]
    shutil.copyfile(f"/boot/vmlinuz-{version}", work / im.KERNEL)
    initramfs.build(version, work / im.INITRD, cache_dir)
    progress("kernel", f"{version}, initramfs {(work / im.INITRD).stat().st_size >> 10} KiB")
    return version


def debootstrap(root: Path, recipe: im.Recipe, deb_cache: Path, progress: Progress) -> None:
    deb_cache.mkdir(parents=True, exist_ok=True)
    mirror = os.environ.get("POLYDEV_DEBIAN_MIRROR", DEFAULT_MIRROR)
    run(["debootstrap", "--variant=minbase", f"--include={','.join(recipe.packages)}", "--components=main",
         f"--cache-dir={deb_cache}", recipe.suite, root, mirror],
        on_line=lambda line: progress("debootstrap", line))
    # debootstrap copies the host's identity; the guest gets its own.
    (root / "etc/hostname").write_text("polydev\n")
    (root / "etc/hosts").write_text("127.0.0.1 localhost\n127.0.1.1 polydev\n::1 localhost\n")
    (root / "etc/resolv.conf").unlink(missing_ok=True)
    (root / "etc/resolv.conf").write_text("# no DNS: the VM reaches only what the host forwards\n")


def _npm_env(npm_cache: Path) -> dict[str, str]:
    return {"npm_config_cache": str(npm_cache), "npm_config_update_notifier": "false",
            "npm_config_fund": "false", "npm_config_audit": "false"}


def npm_view_version(package: str, tag: str, timeout: float) -> str:
    """The version a dist-tag (`latest`) of `package` names in the npm registry now; VersionUnresolved saying
    why when npm cannot tell."""
    if shutil.which("npm") is None:
        raise im.VersionUnresolved(f"{package}@{tag}: npm is not installed (Debian: apt-get install npm)")
    try:
        out = subprocess.run(["npm", "view", f"{package}@{tag}", "version", "--json"], capture_output=True,
                             text=True, timeout=timeout, check=False, env={**os.environ, **_npm_env_base()})
    except subprocess.TimeoutExpired:
        raise im.VersionUnresolved(f"{package}@{tag}: the npm registry did not answer in {timeout:.0f} s") from None
    try:
        version = json.loads(out.stdout or "null")
    except ValueError:
        version = None
    if isinstance(version, list):  # a range answers a list; a tag answers one
        version = version[-1] if version else None
    if out.returncode != 0 or not isinstance(version, str) or not re.match(r"^\d+\.\d+\.\d+", version):
        said = [line.removeprefix("npm error").strip() for line in out.stderr.splitlines()
                if line.strip() and "complete log" not in line]
        detail = " / ".join(said[:2]) or "no version in its answer"
        raise im.VersionUnresolved(f"{package}@{tag}: npm view failed: {detail[:300]}")
    return version


def _npm_env_base() -> dict[str, str]:
    return {"npm_config_update_notifier": "false", "npm_config_fund": "false", "npm_config_audit": "false"}


def node(root: Path, recipe: im.Recipe, npm_cache: Path, work: Path, progress: Progress) -> None:
    name, version = recipe.node
    run(["npm", "pack", f"{name}@{version}", "--pack-destination", work], env=_npm_env(npm_cache), cwd=work,
        on_line=lambda line: progress("node", line))
    tgz = next(work.glob(f"{name}-{version}.tgz"))
    im.extract_member(tgz, "package/bin/node", root / "usr/local/bin/node")
    tgz.unlink()
    out = subprocess.run([root / "usr/local/bin/node", "--version"], capture_output=True, text=True, check=True)
    progress("node", f"node {out.stdout.strip()}")


def clis(root: Path, recipe: im.Recipe, npm_cache: Path, progress: Progress) -> None:
    # --ignore-scripts: install scripts would build native add-ons against the host's Node, not the guest's.
    # The one script that matters, Claude Code's (it puts the native binary in place of a stub), runs below
    # with the guest's own Node binary, which also runs on the host.
    specs = [f"{pkg}@{version}" for pkg, version in recipe.clis]
    run(["npm", "install", "--global", "--prefix", root / "usr/local", "--ignore-scripts", "--omit=dev", *specs],
        env=_npm_env(npm_cache), on_line=lambda line: progress("CLIs", line))
    claude = root / "usr/local/lib/node_modules/@anthropic-ai/claude-code"
    if (claude / "install.cjs").is_file():
        run([root / "usr/local/bin/node", "install.cjs"], cwd=claude, on_line=lambda line: progress("CLIs", line))


def guest(root: Path, sources: dict[str, Path], progress: Progress) -> None:
    pkg = root / im.GUEST_ROOT.lstrip("/") / "polydev"
    (pkg / "guest").mkdir(parents=True, exist_ok=True)
    # Only protocol.py and guest/ go in: the host package's __init__ could import host-only code.
    (pkg / "__init__.py").write_text('"""Polydev guest side: the agent and the wire protocol."""\n')
    for name, path in sources.items():
        shutil.copyfile(path, pkg / name)
    init = root / im.INIT_PATH.lstrip("/")
    init.write_text(GUEST_INIT)
    init.chmod(0o755)
    login_shell(root)
    sandbox_user(root)
    # Byte-compile with the guest's own Python so the first boot does not pay for it.
    run(["chroot", root, "/usr/bin/python3", "-m", "compileall", "-q", im.GUEST_ROOT])
    progress("guest agent", f"installed in {im.GUEST_ROOT}")


def login_shell(root: Path) -> None:
    """E2B's SDK runs every command as `/bin/bash -l -c CMD`. Debian's login files fork `id -u` (twice) and
    `mesg n` for it: under TCG each fork and exec costs ~80 ms, more than most commands (measured: `bash -l -c
    true` 308 ms, `bash -c true` 137 ms). Same behaviour without them: bash knows its EUID, and `mesg` only
    matters on a terminal. The files are replaced, not written in place: the tree's files are hard links to
    the cached base."""
    for rel, old, new in (("etc/profile", '"$(id -u)"', '"${EUID:-$(id -u)}"'),
                          ("root/.profile", "mesg n 2> /dev/null || true",
                           "if [ -t 0 ]; then mesg n 2> /dev/null || true; fi")):
        path = root / rel
        if not path.exists():
            continue
        text = path.read_text()
        tmp = path.with_name(path.name + ".polydev")
        tmp.write_text(text.replace(old, new))
        shutil.copymode(path, tmp)
        os.replace(tmp, path)


def sandbox_user(root: Path, name: str = "user", uid: int = 1000) -> None:
    """E2B's sandboxes run commands as `user` (uid 1000, home /home/user) unless a call asks for root, and its
    users' scripts write to /home/user: the image has that account, with sudo and no password as in E2B (the
    VM is the boundary, not the account). The account files are replaced, not appended to: the tree's files are
    hard links to the cached base."""
    entries = {"etc/passwd": f"{name}:x:{uid}:{uid}::/home/{name}:/bin/bash",
               "etc/shadow": f"{name}:*:20000:0:99999:7:::", "etc/group": f"{name}:x:{uid}:",
               "etc/gshadow": f"{name}:!::"}
    for rel, line in entries.items():
        path = root / rel
        text = path.read_text() if path.exists() else ""
        if any(row.split(":", 1)[0] == name for row in text.splitlines()):
            continue
        tmp = path.with_name(path.name + ".polydev")
        tmp.write_text(text + ("" if text.endswith("\n") or not text else "\n") + line + "\n")
        if path.exists():
            shutil.copystat(path, tmp)
            os.chown(tmp, path.stat().st_uid, path.stat().st_gid)
        os.replace(tmp, path)
    if (root / "etc/sudoers.d").is_dir():
        rule = root / "etc/sudoers.d" / f".{name}.polydev"  # sudo skips names with a dot until the rename
        rule.write_text(f"{name} ALL=(ALL:ALL) NOPASSWD: ALL\n")
        rule.chmod(0o440)  # sudo ignores a rule file others may write
        os.replace(rule, rule.with_name(name))
    home = root / "home" / name
    home.mkdir(parents=True, exist_ok=True)
    if (root / "etc/skel").is_dir():
        shutil.copytree(root / "etc/skel", home, symlinks=True, dirs_exist_ok=True)
    for path in [home, *home.rglob("*")]:
        os.lchown(path, uid, uid)
    home.chmod(0o750)


def compile_cache_dir(root: Path) -> None:
    """Node's on-disk compile cache (NODE_COMPILE_CACHE, set by the agent when this directory exists).

    It is not warmed here: V8 keys the cache by a hash of its flags, which follow the CPU's features, so a
    cache written on the host CPU is ignored by the same Node under TCG (measured: directory
    v22.23.3-x64-9ac5647c-0 on the host, -9de703df-0 in the VM). The first run inside a VM fills it; a VM
    snapshot taken after that run keeps it."""
    (root / im.NODE_COMPILE_CACHE.lstrip("/")).mkdir(parents=True, exist_ok=True)


def manifest(root: Path, recipe: im.Recipe, kernel_version: str) -> dict[str, object]:
    out = subprocess.run(["dpkg-query", f"--admindir={root / 'var/lib/dpkg'}", "-W",
                          "-f=${Package}\t${Version}\t${Architecture}\t${db:Status-Abbrev}\n"],
                         capture_output=True, text=True, check=True).stdout
    debs = {}
    for line in out.splitlines():
        name, version, arch, status = line.split("\t")
        if status.startswith("ii"):
            debs[name] = {"version": version, "arch": arch}
    clis = {}
    for pkg, _ in recipe.clis:
        meta = json.loads((root / "usr/local/lib/node_modules" / pkg / "package.json").read_text())
        clis[pkg] = meta["version"]
    node_version = subprocess.run([root / "usr/local/bin/node", "--version"], capture_output=True, text=True,
                                  check=True).stdout.strip()
    tree = int(subprocess.run(["du", "-sb", root], capture_output=True, text=True, check=True).stdout.split()[0])
    return {"recipe": recipe.to_json(), "kernel": kernel_version, "node": node_version, "clis": clis,
            "debian_packages": debs, "tree_bytes": tree, "init": im.INIT_PATH}


def trim(root: Path, paths: tuple[str, ...], progress: Progress) -> None:
    for rel in paths:
        target = root / rel
        if target.is_dir():
            shutil.rmtree(target)
            target.mkdir()
        elif target.exists():
            target.unlink()
    (root / "var/cache/apt/archives/partial").mkdir(parents=True, exist_ok=True)
    (root / "var/lib/apt/lists/partial").mkdir(parents=True, exist_ok=True)
    progress("trim", "dropped docs, man pages, locales, apt caches")


def ext4(root: Path, out: Path, progress: Progress) -> int:
    """mkfs.ext4 -d writes the tree straight into a new file system: no loop mount, nothing to fsck."""
    tree = int(subprocess.run(["du", "-sb", root], capture_output=True, text=True, check=True).stdout.split()[0])
    # Room for what runs in the VM (workspaces, npm caches); the raw file is sparse, so it costs no disk.
    size_mib = (tree * 12 // 10) // (1 << 20) + 2048
    run(["mkfs.ext4", "-q", "-F", "-L", "polydev-root", "-m", "0", "-E", "root_owner=0:0", "-d", root,
         out, f"{size_mib}M"], on_line=lambda line: progress("ext4", line))
    progress("ext4", f"{size_mib} MiB file system from {tree / (1 << 20):.0f} MiB of files")
    return out.stat().st_size
