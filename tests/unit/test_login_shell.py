"""vm/build_steps.login_shell: the image's login files stop forking for every `bash -l`, without touching the
cached base tree the image's files are hard links to."""

from __future__ import annotations

import os
from pathlib import Path

from polydev.vm.build_steps import login_shell, sandbox_user

PROFILE = 'if [ "$(id -u)" -eq 0 ]; then\n  PATH=/root\nfi\nif [ "$(id -u)" -eq 0 ]; then\n  PS1="# "\nfi\n'
DOT_PROFILE = "if [ -f ~/.bashrc ]; then . ~/.bashrc; fi\n\nmesg n 2> /dev/null || true\n"


def test_login_files_are_replaced_and_the_base_they_link_to_is_not(tmp_path: Path) -> None:
    base, root = tmp_path / "base", tmp_path / "root"
    for tree in (base, root):
        (tree / "etc").mkdir(parents=True)
        (tree / "root").mkdir()
    (base / "etc/profile").write_text(PROFILE)
    (base / "root/.profile").write_text(DOT_PROFILE)
    (base / "root/.profile").chmod(0o600)
    for rel in ("etc/profile", "root/.profile"):
        os.link(base / rel, root / rel)  # as the image build links the cached base
    login_shell(root)
    assert "$(id -u)" not in (root / "etc/profile").read_text().replace("${EUID:-$(id -u)}", "")
    assert (root / "etc/profile").read_text().count('"${EUID:-$(id -u)}"') == 2
    assert "if [ -t 0 ]; then mesg n" in (root / "root/.profile").read_text()
    assert (root / "root/.profile").stat().st_mode & 0o777 == 0o600
    assert (base / "etc/profile").read_text() == PROFILE and (base / "root/.profile").read_text() == DOT_PROFILE
    login_shell(tmp_path / "empty")  # a tree without them: nothing to do, no error


def test_the_sandbox_account_is_added_once_without_touching_the_base(tmp_path: Path) -> None:
    base, root = tmp_path / "base", tmp_path / "root"
    for tree in (base, root):
        (tree / "etc/skel").mkdir(parents=True)
    accounts = {"passwd": "root:x:0:0:root:/root:/bin/bash\n", "group": "root:x:0:\n",
                "shadow": "root:*:20000:0:99999:7:::\n", "gshadow": "root:*::\n"}
    for name, text in accounts.items():
        (base / "etc" / name).write_text(text)
        os.link(base / "etc" / name, root / "etc" / name)
    (root / "etc/shadow").chmod(0o640)
    (root / "etc/skel/.profile").write_text("# skel\n")
    (root / "etc/sudoers.d").mkdir()  # the image's sudo package made it
    sandbox_user(root)
    sandbox_user(root)  # again: still one entry each
    passwd = (root / "etc/passwd").read_text().splitlines()
    assert passwd == ["root:x:0:0:root:/root:/bin/bash", "user:x:1000:1000::/home/user:/bin/bash"]
    for name in ("group", "shadow", "gshadow"):
        assert [line.split(":")[0] for line in (root / "etc" / name).read_text().splitlines()] == ["root", "user"]
    assert (root / "etc/shadow").stat().st_mode & 0o777 == 0o640
    assert {n: (base / "etc" / n).read_text() for n in accounts} == accounts  # the cached base is unchanged
    home = root / "home/user"
    assert (home / ".profile").read_text() == "# skel\n"
    assert (home.stat().st_uid, (home / ".profile").stat().st_gid) == (1000, 1000)
    rule = root / "etc/sudoers.d/user"
    assert rule.read_text() == "user ALL=(ALL:ALL) NOPASSWD: ALL\n" and rule.stat().st_mode & 0o777 == 0o440
    assert os.listdir(root / "etc/sudoers.d") == ["user"]
