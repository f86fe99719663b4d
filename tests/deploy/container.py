"""Build chatmeter's image with Podman and run it without `podman run`.

No image registry is reachable from the test machines, so the base image is made here
from Debian's packages (debootstrap, from the mirror this machine's apt uses) and passed
to the Dockerfile as BASE. `podman run` cannot start containers in the sandbox (it is
refused `setrlimit`), so the image runs from its mounted filesystem instead: `podman
create` + `podman mount` give a writable root; the process starts in its own mount and
network namespaces (its /proc, /dev, /sys and /data mounts vanish with it; its port 8000
is its own), chrooted as the image's user, with the image's environment, working
directory and entrypoint, as a container runtime would.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
BASE_IMAGE = "localhost/chatmeter-test-base:bookworm"
IMAGE = "localhost/chatmeter:test"
BUILD_STAGE = "localhost/chatmeter:test-build-stage"
LABEL = "org.opencontainers.image.title=chatmeter"  # both stages of the Dockerfile
LOCK = Path(tempfile.gettempdir()) / "chatmeter-image-test.lock"
DEFAULT_MIRROR = "http://deb.debian.org/debian"
# What BASE must give: Python 3.11 and its venv module (python:3.11-slim has both), and
# certificates for pip. Documentation and apt's lists are dropped, as slim images do.
BASE_PACKAGES = "python3,python3-venv,ca-certificates"
BASE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
MOUNT_NET = ("--mount", "--net")


def run(*args: str, timeout: float = 600, **kwargs: Any) -> str:
    done = subprocess.run(args, capture_output=True, text=True, timeout=timeout, **kwargs)
    if done.returncode != 0:
        raise RuntimeError(f"{shlex.join(args)} failed ({done.returncode}):\n{done.stderr}")
    stdout: str = done.stdout  # text=True: str (the **kwargs make mypy see Any)
    return stdout


@contextmanager
def exclusive() -> Iterator[None]:
    """One image build and run at a time on the machine (several sessions share it)."""
    with open(LOCK, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def debian_mirror() -> str:
    """The Debian archive this machine's apt uses (deb822 `.sources` or `sources.list`)."""
    files = [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]
    for path in files:
        text = path.read_text() if path.is_file() else ""
        uris: list[str] = re.findall(r"^URIs:\s*(\S+)", text, re.M)
        uris += re.findall(r"^deb\s+(?:\[[^]]*\]\s+)?(\S+)\s+bookworm\s", text, re.M)
        for uri in uris:
            if uri.rstrip("/").endswith("/debian"):
                return uri.rstrip("/")
    return DEFAULT_MIRROR


def ensure_base_image() -> float:
    """Build the Debian base once; later runs reuse it. Returns the seconds spent."""
    if subprocess.run(["podman", "image", "exists", BASE_IMAGE]).returncode == 0:
        return 0.0
    started = time.monotonic()
    with tempfile.TemporaryDirectory(dir="/var/tmp") as scratch:
        root = Path(scratch) / "rootfs"
        run(
            "debootstrap", "--variant=minbase", f"--include={BASE_PACKAGES}",
            "bookworm", str(root), debian_mirror(),
            timeout=1200,
        )  # fmt: skip
        for folder in ("usr/share/doc", "usr/share/man", "usr/share/locale", "var/cache/apt"):
            shutil.rmtree(root / folder, ignore_errors=True)
        shutil.rmtree(root / "var/lib/apt/lists", ignore_errors=True)
        (root / "var/lib/apt/lists/partial").mkdir(parents=True)
        tar = subprocess.Popen(["tar", "-C", str(root), "-c", "."], stdout=subprocess.PIPE)
        run(
            "podman", "import",
            "--change", f"ENV PATH={BASE_PATH}",
            "--change", 'CMD ["/bin/bash"]',
            "-", BASE_IMAGE,
            stdin=tar.stdout,
        )  # fmt: skip
        assert tar.wait() == 0
    return time.monotonic() - started


def pip_settings() -> dict[str, str]:
    """This machine's pip settings (`pip config list`, which includes PIP_* variables)."""
    listing = run(sys.executable, "-m", "pip", "config", "list")
    settings: dict[str, str] = {}
    for line in listing.splitlines():
        key, _, value = line.partition("=")
        settings[key.split(".", 1)[-1]] = value.strip().strip("'\"")
    return settings


def pip_build_options() -> list[str]:
    """The package index the machine's pip uses, passed to the build: the index URLs it
    can reach from inside (http/https, not this machine's file:// folders), and its
    certificate authorities (a TLS-inspecting proxy's) as the `pip_cert` build secret."""
    settings = pip_settings()
    options = []
    index = settings.get("index-url")
    if index and index.startswith(("http://", "https://")):
        options += ["--build-arg", f"PIP_INDEX_URL={index}"]
    extra = [u for u in settings.get("extra-index-url", "").split() if u.startswith("http")]
    if extra:
        options += ["--build-arg", "PIP_EXTRA_INDEX_URL=" + " ".join(extra)]
    cert = settings.get("cert")
    if cert and Path(cert).is_file():
        options += ["--secret", f"id=pip_cert,src={cert}"]
    return options


def image_id(name: str) -> str | None:
    found = subprocess.run(
        ["podman", "image", "inspect", "--format", "{{.Id}}", name],
        capture_output=True,
        text=True,
    )
    return found.stdout.strip() if found.returncode == 0 else None


def build_image() -> float:
    """`podman build` of the Dockerfile on the Debian base; unchanged layers come from
    the cache. The images it replaces are removed. Returns the seconds spent."""
    started = time.monotonic()
    # the build stage tagged too (the second build takes it from the cache): it holds
    # the dependency layer the next build reuses, so it must not look stale
    for target, tag in (("build", BUILD_STAGE), ("", IMAGE)):
        run(
            "podman", "build", "--isolation", "chroot", "--format", "docker", "--layers",
            "--build-arg", f"BASE={BASE_IMAGE}", *pip_build_options(),
            *(["--target", target] if target else []), "--tag", tag, str(REPO),
            timeout=1800,
        )  # fmt: skip
    # what earlier builds of chatmeter left, now untagged: the package's old layers (a
    # layer the new build uses stays, as its images still need it)
    stale = run(
        "podman", "images", "--quiet", "--no-trunc", "--filter", "dangling=true",
        "--filter", f"label={LABEL}",
    )  # fmt: skip
    for old in set(stale.split()) - {image_id(IMAGE), image_id(BUILD_STAGE), None}:
        subprocess.run(["podman", "rmi", old], capture_output=True)
    return time.monotonic() - started


def inspect(name: str) -> dict[str, Any]:
    found: list[dict[str, Any]] = json.loads(run("podman", "image", "inspect", name))
    return found[0]


@dataclass
class Container:
    """The image's entrypoint, running from the image's mounted filesystem."""

    root: Path
    data: Path
    process: subprocess.Popen[bytes]
    log: Path
    config: dict[str, Any]

    @property
    def pid(self) -> int:
        return self.process.pid

    def inside(self, *command: str, namespaces: tuple[str, ...] = ("--net",)) -> list[str]:
        """A host command line run in the container's namespaces."""
        return ["nsenter", f"--target={self.pid}", *namespaces, "--", *command]

    def exec(self, *command: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """`podman exec`: a command in the image, as its user, with its environment."""
        line = self.inside(*chrooted(self.root, self.config), *command, namespaces=MOUNT_NET)
        return subprocess.run(line, capture_output=True, text=True, timeout=timeout)

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def chrooted(root: Path, config: dict[str, Any]) -> list[str]:
    """chroot into `root` as the image's user, with only the image's environment, in
    its working directory."""
    user = config["User"]
    assert re.fullmatch(r"\d+:\d+", user), f"USER should be numeric uid:gid, is {user!r}"
    workdir = config.get("WorkingDir") or "/"
    return [
        "chroot", f"--userspec={user}", str(root),
        "env", "-i", "-C", workdir, *config["Env"],
    ]  # fmt: skip


def namespace_setup(root: Path, data: Path, binds: dict[Path, str]) -> str:
    """Shell commands run in the new mount namespace before the chroot: what a runtime
    mounts (proc, a small /dev, /dev/shm for multiprocessing, sysfs, the volume, and
    `binds`: host folder → path in the container)."""
    r = shlex.quote(str(root))
    bound = [
        f"mkdir -p {r}{shlex.quote(inside)} && mount --bind {shlex.quote(str(host))} "
        f"{r}{shlex.quote(inside)}"
        for host, inside in binds.items()
    ]
    devices = "null zero full random urandom tty"
    return "; ".join(
        [
            "set -e",
            "ip link set lo up",
            f"mount -t proc proc {r}/proc",
            f"mount --rbind /sys {r}/sys",
            f"mount -t tmpfs -o mode=755 dev {r}/dev",
            f"for n in {devices}; do touch {r}/dev/$n; mount --bind /dev/$n {r}/dev/$n; done",
            f"mkdir {r}/dev/shm",
            f"mount -t tmpfs -o mode=1777 shm {r}/dev/shm",
            f"mount --bind {shlex.quote(str(data))} {r}/data",
            *bound,
        ]
    )


@contextmanager
def running(
    image: str,
    workdir: Path,
    env: dict[str, str] | None = None,
    binds: dict[Path, str] | None = None,
) -> Iterator[Container]:
    """Start the image's entrypoint with `env` added to the image's; stop it and clean
    up after."""
    config = dict(inspect(image)["Config"])
    config["Env"] = [*config["Env"], *(f"{k}={v}" for k, v in (env or {}).items())]
    uid, gid = (int(part) for part in config["User"].split(":"))
    data = workdir / "data"
    data.mkdir()
    os.chown(data, uid, gid)
    log = workdir / "container.log"
    cid = run("podman", "create", "--no-healthcheck", image).strip()
    try:
        root = Path(run("podman", "mount", cid).strip())
        command = [*config["Entrypoint"], *(config.get("Cmd") or [])]
        setup = namespace_setup(root, data, binds or {})
        script = setup + "; exec " + shlex.join(chrooted(root, config))
        with open(log, "wb") as out:
            process = subprocess.Popen(
                ["unshare", "--mount", "--net", "--propagation", "private", "sh", "-c",
                 script + " " + shlex.join(command)],
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        try:
            in_own_namespaces(process)
            yield Container(root, data, process, log, config)
        finally:
            stop(process)
    finally:
        subprocess.run(["podman", "umount", cid], capture_output=True)
        subprocess.run(["podman", "rm", "--force", cid], capture_output=True)


def in_own_namespaces(process: subprocess.Popen[bytes], within: float = 60) -> None:
    """Wait until `unshare` has made the container's namespaces: until then its pid is
    in the host's, and an `nsenter --target` of it would probe the host's loopback."""
    deadline = time.monotonic() + within
    host = os.readlink("/proc/self/ns/net")
    while time.monotonic() < deadline and process.poll() is None:
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/{process.pid}/ns/net") != host:
                return
        time.sleep(0.01)
    raise AssertionError("the container's network namespace was not made")


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        with suppress(subprocess.TimeoutExpired):
            process.wait(timeout=40)
    with suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=10)


def process_tree(pid: int) -> list[int]:
    """`pid` and all its descendants."""
    found = [pid]
    for task in Path(f"/proc/{pid}/task").glob("*"):
        children = (task / "children").read_text().split()
        for child in children:
            found += process_tree(int(child))
    return found


def ids(pid: int) -> tuple[list[int], list[int]]:
    """Real, effective, saved and filesystem uids and gids of a process."""
    status = Path(f"/proc/{pid}/status").read_text()
    uids = re.search(r"^Uid:\s+(.*)$", status, re.M)
    gids = re.search(r"^Gid:\s+(.*)$", status, re.M)
    assert uids and gids
    return [int(n) for n in uids.group(1).split()], [int(n) for n in gids.group(1).split()]
