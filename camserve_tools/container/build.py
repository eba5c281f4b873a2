"""`make image`: build camserve:<version of pyproject.toml> with podman, without any registry.

    python -m camserve_tools.container.build [--torch-index-url URL] [--tag camserve:0.2.0]

1. podman, buildah and mmdebstrap are installed with apt when missing (as root; otherwise the build stops and says
   what to install). CONTAINERS_CONF names deploy/image/containers.conf unless the environment names another.
2. The base, localhost/camserve-base:bookworm, is built from Debian's packages (mmdebstrap, minbase with python3,
   python3-venv, ca-certificates and catatonit) and imported when no image of that name exists.
3. The build context is staged under .run/image/context with only what the image holds: requirements.txt (the
   runtime pins of pyproject.toml), pyproject.toml, README.md, camserve/, camserve_tools/, config/,
   deploy/image/log4j2.xml, model_store/*.mar.
4. The host's pip settings (`pip config list`: indexes, find-links, constraints, CA bundle) reach the RUN steps
   only: rewritten into one pip.conf, with copies of the small files it names, in .run/image/pip, mounted at /mnt
   for the build; local indexes and find-links folders are served read-only over loopback HTTP while the build
   runs. Nothing of them enters a layer.
5. `podman build --format docker` (HEALTHCHECK is a Docker-format field) with `--pull=never --network host`.

The build's time and the image's size go to .run/image/build.json and standard output.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
IMAGE_DIR = ROOT / "deploy" / "image"
WORK_DIR = ROOT / ".run" / "image"
BASE_IMAGE = "localhost/camserve-base:bookworm"
BASE_PACKAGES = ("python3", "python3-venv", "ca-certificates", "catatonit")
# What the host needs to build and run the image (and to play a pod): Debian's package names.
HOST_PACKAGES = ("podman", "buildah", "runc", "mmdebstrap", "containernetworking-plugins", "uidmap", "catatonit")
PIP_MOUNT = "/mnt"
# pip settings whose values are local paths or file:// URLs, to be mounted into the build.
PIP_PATH_KEYS = {"cert", "client-cert", "constraint", "find-links", "index-url", "extra-index-url", "requirement"}


def version() -> str:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


def runtime_requirements() -> list[str]:
    """[project].dependencies of pyproject.toml: the pins of the worker runtime and the tools, no dev extra."""
    return list(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"])


def default_tag() -> str:
    return f"localhost/camserve:{version()}"


def container_environment() -> dict[str, str]:
    """The environment for podman: our containers.conf unless the caller names one."""
    env = dict(os.environ)
    env.setdefault("CONTAINERS_CONF", str(IMAGE_DIR / "containers.conf"))
    return env


def podman(*args: str, check: bool = True, capture: bool = False, timeout: float | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["podman", *args], env=container_environment(), check=check, text=True, capture_output=capture, timeout=timeout)


class ToolsMissing(RuntimeError):
    """podman and its companions are absent and cannot be installed here; the message says what to install."""


def ensure_host_tools(packages: tuple[str, ...] = HOST_PACKAGES) -> list[str]:
    """Install what is missing with apt (as root); the packages installed, or ToolsMissing saying why it could not."""
    missing = [package for package in packages if not _installed(package)]
    if not missing:
        return []
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise ToolsMissing(f"missing {' '.join(missing)}; install them (as root: apt-get install {' '.join(missing)})")
    print(f"installing {' '.join(missing)} with apt-get (they were missing)", flush=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    try:
        subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
        subprocess.run(["apt-get", "install", "-y", "-qq", *missing], check=True, env=env)
    except subprocess.CalledProcessError as error:
        raise ToolsMissing(f"apt-get could not install {' '.join(missing)}: {error}") from None
    return missing


def _installed(package: str) -> bool:
    result = subprocess.run(["dpkg-query", "-W", "-f=${Status}", package], capture_output=True, text=True)
    return result.returncode == 0 and "install ok installed" in result.stdout


def image_exists(name: str) -> bool:
    return podman("image", "exists", name, check=False).returncode == 0


def ensure_base(rebuild: bool = False) -> None:
    """The Debian base, from Debian's packages, when no image of that name exists (or `rebuild`)."""
    if image_exists(BASE_IMAGE) and not rebuild:
        return
    WORK_DIR.mkdir(parents=True, exist_ok=True)
    rootfs = WORK_DIR / "base.tar"
    started = time.perf_counter()
    subprocess.run(
        [
            "mmdebstrap",
            "--variant=minbase",
            "--include=" + ",".join(BASE_PACKAGES),
            # Documentation and translations are of no use in a server image.
            "--dpkgopt=path-exclude=/usr/share/doc/*",
            "--dpkgopt=path-exclude=/usr/share/man/*",
            "--dpkgopt=path-exclude=/usr/share/locale/*",
            "bookworm",
            str(rootfs),
        ],
        check=True,
    )
    podman("import", "--change", 'CMD ["/bin/bash"]', str(rootfs), BASE_IMAGE)
    rootfs.unlink()
    print(f"base image {BASE_IMAGE} built from Debian bookworm in {time.perf_counter() - started:.0f} s", flush=True)


def stage_context(archives: list[Path]) -> Path:
    """A build context with only what the image holds (no .venv, .run, tests or .git to scan or copy)."""
    context = WORK_DIR / "context"
    shutil.rmtree(context, ignore_errors=True)
    context.mkdir(parents=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, context / name)
    (context / "requirements.txt").write_text("\n".join(runtime_requirements()) + "\n")
    for name in ("camserve", "camserve_tools", "config"):
        shutil.copytree(ROOT / name, context / name, ignore=ignore)
    (context / "deploy" / "image").mkdir(parents=True)
    shutil.copy2(IMAGE_DIR / "log4j2.xml", context / "deploy" / "image" / "log4j2.xml")
    (context / "model_store").mkdir()
    for archive in archives:
        shutil.copy2(archive, context / "model_store" / archive.name)
    return context


def host_pip_settings() -> list[tuple[str, str]]:
    """(key, value) of the host pip's effective settings, lowest precedence first (config files, then PIP_* variables)."""
    listed = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True, check=True).stdout
    files: list[tuple[str, str]] = []
    variables: list[tuple[str, str]] = []
    for line in listed.splitlines():
        match = re.fullmatch(r"(:env:|[\w-]+)\.([\w-]+)='(.*)'", line.strip())
        if match:
            (variables if match.group(1) == ":env:" else files).append((match.group(2), match.group(3)))
    return files + variables


@dataclass
class PipForBuild:
    """What the build's RUN steps need of the host's pip: one folder mounted at PIP_MOUNT (the rewritten pip.conf and
    copies of the small files it names) and the local indexes and find-links folders, served over
    loopback HTTP for the build's duration (each bind mount of its own would leave an empty mount point in a layer)."""

    folder: Path
    served: Path

    @contextmanager
    def serving(self) -> Iterator[None]:
        if not any(self.served.iterdir()):
            yield
            return
        server = subprocess.Popen(
            [sys.executable, "-m", "http.server", "--bind", "127.0.0.1", "--directory", str(self.served), str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            yield
        finally:
            server.terminate()
            server.wait()

    port: int = 0


def pip_for_build(work_dir: Path) -> PipForBuild:
    """The host pip's settings for the build: local files copied into the mounted folder, local folders and file://
    indexes as URLs of the loopback server, everything else as it is."""
    from camserve_tools.servers.torchserve import free_port

    folder, served = work_dir / "pip", work_dir / "pip-served"
    for directory in (folder / "conf", served):
        shutil.rmtree(directory, ignore_errors=True)
        directory.mkdir(parents=True)
    pip = PipForBuild(folder, served, port=free_port())
    names: dict[Path, str] = {}

    def name(host: Path) -> str:
        return names.setdefault(host, f"{len(names)}-{host.name}")

    def rewrite(item: str) -> str:
        path = Path(item[len("file://") :] if item.startswith("file://") else item)
        if not (path.is_absolute() and path.exists()):
            return item
        if path.is_file():
            shutil.copy2(path, folder / "conf" / name(path))
            return f"{PIP_MOUNT}/conf/{name(path)}"
        # A local index's pages link its files relative to the index (../../files/...): serve the folder above it.
        root, below = (path.parent, "/simple/") if path.name == "simple" else (path, "/")
        link = served / name(root)
        if not link.exists():
            link.symlink_to(root, target_is_directory=True)
        return f"http://127.0.0.1:{pip.port}/{name(root)}{below}"

    settings = {
        key: (" ".join(rewrite(item) for item in value.split()) if key in PIP_PATH_KEYS else value) for key, value in host_pip_settings()
    }
    if names and any(served.iterdir()):
        settings["trusted-host"] = " ".join(filter(None, (settings.get("trusted-host", ""), "127.0.0.1")))
    (folder / "conf" / "pip.conf").write_text("[global]\n" + "".join(f"{key} = {value}\n" for key, value in settings.items()))
    return pip


def build(tag: str, torch_index_url: str = "", base_image: str = BASE_IMAGE, no_cache: bool = False) -> dict:
    archives = sorted((ROOT / "model_store").glob("*.mar"))
    if not archives:
        raise SystemExit("no archive in model_store/: `make model_store/shapes.mar model_store/imagenet.mar` first")
    ensure_host_tools()
    if base_image == BASE_IMAGE:
        ensure_base()
    context = stage_context(archives)
    pip = pip_for_build(WORK_DIR)
    command = ["build", "--format", "docker", "--pull=never", "--network", "host", "--layers", "-f", str(IMAGE_DIR / "Containerfile")]
    command += ["--build-arg", f"BASE_IMAGE={base_image}", "--build-arg", f"TORCH_INDEX_URL={torch_index_url}"]
    # /mnt exists in the base, so the mount leaves no mount point behind in a layer.
    command += ["--volume", f"{pip.folder}:{PIP_MOUNT}"]
    if no_cache:
        command.append("--no-cache")
    command += ["-t", tag, str(context)]
    started = time.perf_counter()
    with pip.serving():
        podman(*command)
    seconds = time.perf_counter() - started
    size = int(podman("image", "inspect", "--format", "{{.Size}}", tag, capture=True).stdout.strip())
    report = {"image": tag, "build_seconds": round(seconds, 1), "size_bytes": size, "size_gb": round(size / 1e9, 2)}
    (WORK_DIR / "build.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"built {tag} in {seconds:.0f} s: {size / 1e9:.2f} GB")
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tag", default=default_tag(), help="image name (default: %(default)s)")
    parser.add_argument("--torch-index-url", default=os.environ.get("TORCH_INDEX_URL", ""), help="index for torch/torchvision alone")
    parser.add_argument("--base-image", default=BASE_IMAGE, help="base with python3.11, venv and catatonit (default: %(default)s)")
    parser.add_argument("--no-cache", action="store_true", help="rebuild every layer")
    args = parser.parse_args()
    try:
        build(args.tag, args.torch_index_url, args.base_image, args.no_cache)
    except ToolsMissing as error:
        raise SystemExit(f"make image: {error}") from None


if __name__ == "__main__":
    main()
