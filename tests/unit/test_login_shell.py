"""vm/build_steps.login_shell: the image's login files stop forking for every `bash -l`, without touching the
cached base tree the image's files are hard links to."""

from __future__ import annotations

import os
from pathlib import Path

from polydev.vm.build_steps import login_shell

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
