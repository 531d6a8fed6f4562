"""Local stand-ins for the template's base images, for machines that cannot pull them.

The vendored python3-http template builds ``FROM python:3.11-slim-bookworm`` and copies
of-watchdog from ``ghcr.io/openfaas/of-watchdog:0.11.6``. Where no registry is reachable (an
air-gapped lab, CI here), these recipes make images with the same names from Debian's
packages (mmdebstrap) and a local ``fwatchdog`` binary, and keep them as ``podman save``
archives in the cache so a machine pays for them once. Debian's Python and pip differ from
the official image's source build; a cluster that can pull the real images never needs these.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from emnist.paths import cache_dir

__all__ = ["BASE_IMAGES", "BaseImageError", "container_env", "ensure_base_images"]

PYTHON_IMAGE = "docker.io/library/python:3.11-slim-bookworm"
WATCHDOG_IMAGE = "ghcr.io/openfaas/of-watchdog:0.11.6"
BASE_IMAGES = (PYTHON_IMAGE, WATCHDOG_IMAGE)
SUITES = ("bookworm", "bookworm-updates")
PACKAGES = ("python3", "python3-pip", "python3-venv", "ca-certificates", "netbase", "tzdata",
            "adduser")
# what the official image's pip does (install system-wide) and has (`python`); the host's
# extra CAs (an intercepting proxy's) so pip (and apt over https) inside a build reaches the
# index; the official Debian image's apt settings, so a build's `apt-get install` (the
# template's ADDITIONAL_PACKAGE) leaves no .deb files or package caches in its layer (without
# them dataset-fashion-mnist's 30 MB made a 143 MB layer) and fetches no translations.
# Changing the recipe: give its archive a new name in RECIPES (-r2: these apt settings), or
# machines keep loading the old stand-in from their cache.
APT_CONF = {
    "docker-clean": 'DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb '
                    '/var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };\n'
                    'APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb '
                    '/var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };\n'
                    'Dir::Cache::pkgcache ""; Dir::Cache::srcpkgcache "";\n',
    "docker-no-languages": 'Acquire::Languages "none";\n',
    "docker-gzip-indexes": 'Acquire::GzipIndexes "true"; Acquire::CompressionTypes::Order:: '
                           '"gz";\n',
    "docker-autoremove-suggests": 'Apt::AutoRemove::SuggestsImportant "false";\n',
}
CUSTOMIZE = ('cp /usr/local/share/ca-certificates/*.crt "$1/usr/local/share/ca-certificates/" '
             '2>/dev/null; chroot "$1" update-ca-certificates >/dev/null; '
             'rm -f "$1"/usr/lib/python3*/EXTERNALLY-MANAGED; ln -sf python3 "$1/usr/bin/python"; '
             + "".join(f"printf '%s' {shlex.quote(text)} > \"$1/etc/apt/apt.conf.d/{name}\"; "
                       for name, text in APT_CONF.items())
             + 'rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*')
PYTHON_CHANGES = ("ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                  "ENV LANG=C.UTF-8", 'CMD ["python3"]')
CONTAINERS_CONF = Path(__file__).resolve().parent / "containers.conf"


def _sources_hook(sources: list[str]) -> str:
    """A customize hook that gives the image apt sources when mmdebstrap wrote none (versions
    differ: sources.list, deb822 files, or none for some mirror forms): the template's
    ADDITIONAL_PACKAGE runs apt-get inside the build, where only the image's sources count."""
    text = shlex.quote("".join(f"{line}\n" for line in sources))
    return ('grep -qsE "^(deb |URIs:)" "$1/etc/apt/sources.list" "$1"/etc/apt/sources.list.d/* '
            f"|| printf '%s' {text} > \"$1/etc/apt/sources.list\"")


class BaseImageError(RuntimeError):
    pass


@dataclass
class Recipe:
    image: str
    archive: str  # file name of its `podman save` archive in the cache
    make: Callable[[Path, Mapping[str, str]], None]


def container_env(env: Mapping[str, str], shim_dir: Path) -> dict[str, str]:
    """The environment podman and faas-cli need here: the shipped containers.conf unless one
    is set, and a ``docker`` that is podman first on PATH (faas-cli runs ``docker build``)."""
    out = dict(env)
    out.setdefault("CONTAINERS_CONF", str(CONTAINERS_CONF))
    podman = shutil.which("podman", path=out.get("PATH"))
    if podman is None:
        raise BaseImageError("podman is not installed: `apt-get install podman buildah "
                             "podman-docker runc mmdebstrap` (or use Docker)")
    shim_dir.mkdir(parents=True, exist_ok=True)
    link = shim_dir / "docker"
    if not link.is_symlink() or os.readlink(link) != podman:
        link.unlink(missing_ok=True)
        link.symlink_to(podman)
    out["PATH"] = f"{shim_dir}{os.pathsep}{out.get('PATH', '')}"
    return out


def _run(args: list[str], env: Mapping[str, str], what: str) -> str:
    done = subprocess.run(args, env=dict(env), capture_output=True, text=True,
                          stdin=subprocess.DEVNULL)
    if done.returncode:
        tail = (done.stderr or done.stdout).strip().splitlines()[-5:]
        raise BaseImageError(f"{what} failed (exit {done.returncode}): " + " | ".join(tail))
    return done.stdout


def _make_python(tmp: Path, env: Mapping[str, str]) -> None:
    if shutil.which("mmdebstrap", path=env.get("PATH")) is None:
        raise BaseImageError("mmdebstrap is not installed (`apt-get install mmdebstrap`)")
    mirror = env.get("EMNIST_DEBIAN_MIRROR", "http://deb.debian.org/debian")
    security = env.get("EMNIST_DEBIAN_SECURITY", "http://deb.debian.org/debian-security")
    sources = [f"deb {mirror} {suite} main" for suite in SUITES]
    sources.append(f"deb {security} bookworm-security main")
    rootfs = tmp / "rootfs.tar"
    _run(["mmdebstrap", "--variant=minbase", "--include=" + ",".join(PACKAGES),
          f"--customize-hook={CUSTOMIZE}", f"--customize-hook={_sources_hook(sources)}",
          "bookworm", str(rootfs), *sources], env,
         "mmdebstrap of the python base image")
    changes = [arg for change in PYTHON_CHANGES for arg in ("--change", change)]
    _run(["podman", "import", *changes, str(rootfs), PYTHON_IMAGE], env, "podman import")


def _make_watchdog(tmp: Path, env: Mapping[str, str]) -> None:
    binary = env.get("EMNIST_FWATCHDOG") or shutil.which("fwatchdog", path=env.get("PATH"))
    if not binary or not Path(binary).is_file():
        raise BaseImageError("no of-watchdog binary: set EMNIST_FWATCHDOG to a fwatchdog "
                             "0.11.6 binary (or put it on PATH)")
    shutil.copy2(binary, tmp / "fwatchdog")
    (tmp / "Containerfile").write_text("FROM scratch\nCOPY fwatchdog /fwatchdog\n")
    _run(["podman", "build", "-q", "-t", WATCHDOG_IMAGE, str(tmp)], env, "podman build")


RECIPES = (Recipe(PYTHON_IMAGE, "python-3.11-slim-bookworm-r2.tar", _make_python),
           Recipe(WATCHDOG_IMAGE, "of-watchdog-0.11.6.tar", _make_watchdog))


def _exists(image: str, env: Mapping[str, str]) -> bool:
    return subprocess.run(["podman", "image", "exists", image], env=dict(env),
                          stdin=subprocess.DEVNULL).returncode == 0


def ensure_base_images(env: Mapping[str, str] | None = None,
                       echo: Callable[[str], None] = print,
                       recipes: tuple[Recipe, ...] = RECIPES) -> list[str]:
    """Make each image of ``recipes`` present: already there, loaded from the cache, or built
    from its recipe (then saved to the cache). Returns what it did, one line per image."""
    env = dict(os.environ if env is None else env)
    cache = cache_dir(env) / "images"
    done = []
    for recipe in recipes:
        archive = cache / recipe.archive
        if _exists(recipe.image, env):
            done.append(f"{recipe.image}: present")
            continue
        if archive.is_file():
            _run(["podman", "load", "-q", "-i", str(archive)], env, f"podman load {archive}")
            done.append(f"{recipe.image}: loaded from {archive}")
            continue
        echo(f"building the stand-in for {recipe.image} (once; cached in {cache})")
        with tempfile.TemporaryDirectory(prefix="emnist-base-") as tmp:
            recipe.make(Path(tmp), env)
        cache.mkdir(parents=True, exist_ok=True)
        partial = archive.with_suffix(".partial")
        _run(["podman", "save", "-q", "-o", str(partial), recipe.image], env, "podman save")
        partial.replace(archive)
        done.append(f"{recipe.image}: built and saved to {archive}")
    return done
