"""Image recipe hashing and the cache: no real build here (that is tests/integration, mark vm)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from polydev.vm import build_steps, images
from tests.support.image_fakes import fake_built, fake_image


def test_hash_is_stable_and_covers_the_recipe() -> None:
    test, full = images.recipe_for("test"), images.recipe_for("full")
    assert test.hash == images.recipe_for("test").hash
    assert test.hash != full.hash
    assert set(images.FULL_PACKAGES) <= set(full.packages) and "chromium" not in test.packages
    assert replace(test, clis=(("@openai/codex", "0.0.1"),)).hash != test.hash
    assert replace(test, guest_digest="other").hash != test.hash
    # The base tree does not depend on the guest code, so editing the agent reuses it.
    assert images.base_hash(replace(test, guest_digest="other")) == images.base_hash(test)


def test_guest_digest_covers_protocol_and_guest_code() -> None:
    names = set(images.guest_sources())
    assert {"protocol.py", "guest/agent.py", "guest/init.py", "guest/execute.py", "guest/http.py"} <= names
    assert len(images.guest_digest()) == 64


def test_unknown_profile() -> None:
    with pytest.raises(ValueError, match="profile"):
        images.recipe_for("huge")


def test_ensure_reuses_a_cached_image_without_building(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    recipe = images.recipe_for("test")
    d = fake_image(tmp_path, recipe)

    def no_build(*args: object) -> None:
        raise AssertionError("must not build")

    monkeypatch.setattr(images, "build", no_build)
    image, built = images.ensure(tmp_path, "test")
    assert not built and image.dir == d and image.profile == "test"


def test_list_skips_incomplete_and_in_progress(tmp_path: Path) -> None:
    fake_image(tmp_path, images.recipe_for("test"))
    broken = images.images_dir(tmp_path) / "deadbeefdeadbeef"
    broken.mkdir()
    (broken / images.MANIFEST).write_text("{}")  # no rootfs: an interrupted copy
    (images.images_dir(tmp_path) / ".build-x-1").mkdir()
    assert [i.hash for i in images.list_images(tmp_path)] == [images.recipe_for("test").hash]
    assert images.remove(tmp_path, images.recipe_for("test").hash)
    assert images.list_images(tmp_path) == []


def test_failed_build_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken_kernel(work: Path, cache_dir: Path, progress: object) -> str:
        (work / "half-written").write_text("x")
        raise RuntimeError("no kernel")

    monkeypatch.setattr(build_steps, "host_tools", lambda progress: None)
    monkeypatch.setattr(build_steps, "kernel", broken_kernel)
    with pytest.raises(RuntimeError, match="no kernel"):
        images.ensure(tmp_path, "test")
    leftovers = [p.name for p in images.images_dir(tmp_path).iterdir() if not p.name.startswith(".lock-")]
    assert leftovers == []


def test_prune_keeps_current_recipes_only(tmp_path: Path) -> None:
    current = fake_image(tmp_path, images.recipe_for("test"))
    stale = fake_image(tmp_path, replace(images.recipe_for("test"), guest_digest="old"))
    base_now = tmp_path / "base" / images.base_hash(images.recipe_for("full"))
    base_old = tmp_path / "base" / "0123456789abcdef"
    base_now.mkdir(parents=True)
    base_old.mkdir(parents=True)
    removed = images.prune(tmp_path)
    assert sorted(removed) == sorted([f"images/{stale.name}", "base/0123456789abcdef"])
    assert current.is_dir() and base_now.is_dir() and not stale.exists() and not base_old.exists()


def test_cli_versions_override_the_tested_ones_and_latest_is_resolved_into_the_recipe() -> None:
    asked: list[str] = []

    def registry(package: str) -> str:
        asked.append(package)
        return "0.180.0"

    default = images.recipe_for("test")
    assert dict(default.clis) == dict(images.CLI_PACKAGES)
    pinned = images.recipe_for("test", {"claude_code": "2.1.210"}, resolve=registry)
    assert dict(pinned.clis)["@anthropic-ai/claude-code"] == "2.1.210" and asked == []
    assert dict(pinned.clis)["@openai/codex"] == dict(images.CLI_PACKAGES)["@openai/codex"]
    latest = images.recipe_for("test", {"codex": "latest"}, resolve=registry)
    assert asked == ["@openai/codex"] and dict(latest.clis)["@openai/codex"] == "0.180.0"
    # The hash covers the resolved version: `latest` today and the same version pinned are one image.
    assert latest.hash == images.recipe_for("test", {"codex": "0.180.0"}).hash != default.hash
    assert len({default.hash, pinned.hash, latest.hash}) == 3
    with pytest.raises(ValueError, match="unknown CLI provider"):
        images.recipe_for("test", {"cursor": "1.0.0"})


def test_a_latest_the_registry_cannot_resolve_says_why(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(build_steps.shutil, "which", lambda _name: None)
    with pytest.raises(images.VersionUnresolved, match="npm is not installed"):
        images.recipe_for("test", {"gemini_cli": "latest"})


def test_the_cli_versions_setting_and_option_parse_or_name_the_bad_item() -> None:
    from polydev.config import PROVIDERS
    from polydev.config.cli_versions import check_cli_versions, format_cli_versions, parse_cli_versions

    parsed = parse_cli_versions(" claude_code=2.1.210, codex=latest ,")
    assert parsed == {"claude_code": "2.1.210", "codex": "latest"}
    assert parse_cli_versions(["gemini_cli=0.62.0-preview.1"]) == {"gemini_cli": "0.62.0-preview.1"}
    assert format_cli_versions(parsed) == "claude_code=2.1.210,codex=latest"
    for bad in ("codex", "codex=", "codex=^1.2.0", "codex=1.2", "=1.2.3", "codex=1.2.3;rm"):
        with pytest.raises(ValueError, match="PROVIDER=VERSION"):
            parse_cli_versions(bad)
    with pytest.raises(ValueError, match="unknown provider"):
        check_cli_versions({"cursor": "1.0.0"}, PROVIDERS)


def test_image_build_refuses_a_bad_cli_option_before_building(monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from polydev.cli import app

    monkeypatch.setattr(images, "ensure", lambda *a, **k: pytest.fail("nothing may be built"))
    result = CliRunner().invoke(app, ["image", "build", "--cli", "codex=not-a-version"])
    assert result.exit_code == 2 and "PROVIDER=VERSION" in result.output


def test_the_active_image_is_used_unless_versions_are_pinned_and_prune_keeps_it(tmp_path: Path) -> None:
    from polydev.vm import image_updates

    tested = fake_built(tmp_path, images.recipe_for("test"))
    newer = fake_built(tmp_path, images.recipe_for("test", {"codex": "0.180.0"}))
    pinned = fake_built(tmp_path, images.recipe_for("test", {"gemini_cli": "0.62.0"}))
    assert image_updates.in_use(tmp_path, "test").dir == tested.dir  # type: ignore[union-attr]
    image_updates.activate(tmp_path, newer)
    assert image_updates.active(tmp_path, "test").dir == newer.dir  # type: ignore[union-attr]
    assert image_updates.active(tmp_path, "full") is None
    assert image_updates.in_use(tmp_path, "test").dir == newer.dir  # type: ignore[union-attr]
    # Explicit configuration wins over the active image.
    assert image_updates.in_use(tmp_path, "test", {"gemini_cli": "0.62.0"}).dir == pinned.dir  # type: ignore[union-attr]
    removed = images.prune(tmp_path, also_keep=(newer,))
    assert removed == [f"images/{pinned.hash}"] and tested.dir.is_dir() and newer.dir.is_dir()
    # A pointer to an image no longer in the cache (or a damaged one) is ignored, not followed.
    images.remove(tmp_path, newer.hash)
    assert image_updates.in_use(tmp_path, "test").dir == tested.dir  # type: ignore[union-attr]
    image_updates.pointer(tmp_path, "test").write_text('{"hash": "../../etc"}')
    assert image_updates.active(tmp_path, "test") is None


def test_updates_compare_the_image_with_the_registry() -> None:
    from polydev.vm import image_updates

    image = images.Image(dir=Path("/nonexistent"), manifest={"clis": dict(images.CLI_PACKAGES)})
    latest = {"@anthropic-ai/claude-code": "2.1.197", "@openai/codex": "0.180.0", "@google/gemini-cli": "0.61.0"}
    found = image_updates.updates(image, resolve=latest.__getitem__)
    assert [(u.provider, u.newer) for u in found] == [("claude_code", False), ("codex", True), ("gemini_cli", False)]
    assert image_updates.latest_versions(found) == {"claude_code": "2.1.197", "codex": "0.180.0",
                                                    "gemini_cli": "0.61.0"}
    assert all(u.newer for u in image_updates.updates(None, resolve=latest.__getitem__))


def test_image_update_check_reports_and_builds_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from polydev.cli import app
    from polydev.config import get_settings

    fake_built(tmp_path, images.recipe_for("test"))
    monkeypatch.setenv("POLYDEV_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("POLYDEV_CLI_VERSIONS", raising=False)
    get_settings.cache_clear()
    monkeypatch.setattr(images, "npm_latest", lambda package: "0.180.0" if package == "@openai/codex"
                        else dict(images.CLI_PACKAGES)[package])
    monkeypatch.setattr(images, "ensure", lambda *a, **k: pytest.fail("--check builds nothing"))
    try:
        result = CliRunner().invoke(app, ["image", "update", "--check", "--profile", "test"])
    finally:
        get_settings.cache_clear()
    assert result.exit_code == 0, result.output
    assert "0.180.0" in result.output and "newer" in result.output and "up to date" not in result.output


def test_a_new_cli_version_reuses_the_os_tree_and_leaves_it_as_it_was(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []

    def debootstrap(root: Path, recipe: images.Recipe, debs: Path, progress: object) -> None:
        calls.append("debootstrap")
        (root / "etc").mkdir(parents=True)
        (root / "etc/os-release").write_text("debian\n")

    def node(root: Path, recipe: images.Recipe, npm: Path, work: Path, progress: object) -> None:
        (root / "usr/local/bin").mkdir(parents=True)
        (root / "usr/local/bin/node").write_text("node\n")

    def clis(root: Path, recipe: images.Recipe, npm: Path, progress: object) -> None:
        calls.append("clis " + ",".join(v for _, v in recipe.clis))
        (root / "usr/local/lib").mkdir(parents=True)
        (root / "usr/local/lib/clis.txt").write_text(repr(recipe.clis))

    monkeypatch.setattr(build_steps, "debootstrap", debootstrap)
    monkeypatch.setattr(build_steps, "node", node)
    monkeypatch.setattr(build_steps, "clis", clis)
    monkeypatch.setattr(build_steps, "manifest", lambda root, recipe, kernel: {"clis": dict(recipe.clis)})
    tested, newer = images.recipe_for("test"), images.recipe_for("test", {"codex": "0.180.0"})
    assert images.os_hash(tested) == images.os_hash(newer) and images.base_hash(tested) != images.base_hash(newer)
    root_a, manifest_a = images._base_tree(tmp_path, tested, lambda *a: None)
    root_b, manifest_b = images._base_tree(tmp_path, newer, lambda *a: None)
    assert calls == ["debootstrap", f"clis {','.join(v for _, v in tested.clis)}",
                     f"clis {','.join(v for _, v in newer.clis)}"]  # Debian once, the CLIs per version
    assert manifest_b["clis"]["@openai/codex"] == "0.180.0" and manifest_a != manifest_b
    assert "0.180.0" in (root_b / "usr/local/lib/clis.txt").read_text()
    assert "0.180.0" not in (root_a / "usr/local/lib/clis.txt").read_text()
    os_root = tmp_path / "os" / images.os_hash(tested) / "rootfs"
    assert not (os_root / "usr/local/lib").exists() and (os_root / "usr/local/bin/node").is_file()
    assert images._base_tree(tmp_path, newer, lambda *a: None)[0] == root_b and len(calls) == 3  # cached


@pytest.mark.parametrize("passes", [True, False])
def test_image_update_activates_only_an_image_that_passed_its_test(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, passes: bool) -> None:
    from typer.testing import CliRunner

    from polydev.cli import app
    from polydev.cli import image as image_cli
    from polydev.config import get_settings
    from polydev.vm import image_updates

    current = fake_built(tmp_path, images.recipe_for("test"))
    image_updates.activate(tmp_path, current)
    monkeypatch.setenv("POLYDEV_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("POLYDEV_CLI_VERSIONS", raising=False)
    get_settings.cache_clear()
    monkeypatch.setattr(images, "npm_latest", lambda package: "0.180.0" if package == "@openai/codex"
                        else dict(images.CLI_PACKAGES)[package])
    built: list[dict[str, str] | None] = []

    def build(cache: Path, profile: str, progress: object, rebuild: bool = False,
              versions: dict[str, str] | None = None) -> tuple[images.Image, bool]:
        built.append(versions)
        return fake_built(tmp_path, images.recipe_for(profile, versions)), True

    monkeypatch.setattr(images, "ensure", build)
    monkeypatch.setattr(image_cli, "check_image", lambda image, accel="auto": passes)
    try:
        result = CliRunner().invoke(app, ["image", "update", "--profile", "test"])
    finally:
        get_settings.cache_clear()
    assert built and built[0]["codex"] == "0.180.0"  # type: ignore[index]
    active = image_updates.active(tmp_path, "test")
    assert active is not None
    if passes:
        assert result.exit_code == 0 and dict(active.manifest["clis"])["@openai/codex"] == "0.180.0"  # type: ignore[call-overload]
    else:
        assert result.exit_code == 1 and "failed its test" in result.output and active.hash == current.hash
