"""Podman on a machine with no Docker engine and no reachable registry: what the container tests drive.

Everything lives under one private temporary root (storage, run root, configs), so the tests never
touch the host's own containers and can delete all they made by deleting that root. Facts this
module is built on, measured on the CI machines (Debian bookworm, podman 4.3, hybrid cgroups v1):

- ``podman build`` needs ``--isolation chroot`` (the OCI isolation fails on these cgroups) and
  ``--format docker`` (the OCI image format has no HEALTHCHECK: it would be dropped silently).
- ``podman run`` needs ``runtime = "runc"`` (crun is not installed) and explicit default ulimits
  (the host's hard limits are below podman's defaults).
- Health checks are driven by systemd timers, which this machine does not run: a test calls
  ``podman healthcheck run`` itself.
- pip inside a build must trust the host's CA bundle (outbound HTTPS is intercepted); the bundle and
  a pip.conf naming it are mounted for the build only, so no image ever contains them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import shlex
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
DEBIAN_MIRROR = "http://deb.debian.org/debian"
# What the slim Python base provides and a debootstrapped minbase lacks: Python with venv/ensurepip
# (bookworm's python3 is 3.11; the project needs >= 3.11) and CA certificates.
STANDIN_PACKAGES = ("python3", "python3-venv", "ca-certificates")
VAR_LIB_CONTAINERS = Path("/var/lib/containers")
NETAVARK_TABLES = ("nat", "filter")
# The chains netavark creates once and keeps after its last container is gone.
NETAVARK_SCAFFOLD = {
    ("nat", "NETAVARK-HOSTPORT-DNAT"),
    ("nat", "NETAVARK-HOSTPORT-MASQ"),
    ("nat", "NETAVARK-HOSTPORT-SETMARK"),
    ("filter", "NETAVARK_FORWARD"),
}
# iptables: netavark only suggests it, but publishing a port needs it.
APT_PACKAGES = ("podman", "buildah", "runc", "debootstrap", "iptables")


class PodmanError(RuntimeError):
    """A podman command failed; the message carries its command line and output."""


def missing_tools() -> list[str]:
    return [tool for tool in ("podman", "runc", "debootstrap", "iptables") if shutil.which(tool) is None]


def install_tools() -> None:
    """apt-get the container tools (root only); raises with apt's output when that fails."""
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", *APT_PACKAGES]):
        result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Podman:
    """Runs podman against a private storage root.

    Args:
        root: an empty directory this instance owns: storage, run root and configs go under it, and
            ``close()`` deletes it.
    """

    root: Path
    env: dict[str, str] = field(init=False)
    _firewall_before: set[tuple[str, str]] = field(init=False, default_factory=set)
    _created_var_lib: bool = field(init=False, default=False)
    _network: str | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        # What podman leaves on the host outside its storage: netavark's iptables chains and the
        # blob-info cache under /var/lib/containers. Remember what was there, remove the rest later.
        self._firewall_before = firewall_chains()
        self._created_var_lib = not VAR_LIB_CONTAINERS.exists()
        conf = self.root / "conf"
        conf.mkdir(parents=True, exist_ok=True)
        (conf / "storage.conf").write_text(
            f'[storage]\ndriver = "overlay"\ngraphroot = "{self.root / "storage"}"\nrunroot = "{self.root / "run"}"\n'
        )
        (conf / "containers.conf").write_text(
            "[containers]\n"
            'default_ulimits = ["nofile=1024:4096", "nproc=4096:4096"]\n'
            "[engine]\n"
            'runtime = "runc"\n'
            'cgroup_manager = "cgroupfs"\n'
            'events_logger = "file"\n'
            f'tmp_dir = "{self.root / "tmp"}"\n'
            "[network]\n"
            f'network_config_dir = "{conf / "networks"}"\n'
        )
        # Registries are unreachable here: resolve short names to docker.io without prompting, and
        # every build/run passes --pull=never so only local images are used.
        (conf / "registries.conf").write_text(
            'unqualified-search-registries = ["docker.io"]\nshort-name-mode = "permissive"\n'
        )
        (conf / "pip.conf").write_text(f"[global]\ncert = {HOST_CA_BUNDLE}\n")
        self.env = {
            **os.environ,
            "CONTAINERS_STORAGE_CONF": str(conf / "storage.conf"),
            "CONTAINERS_CONF": str(conf / "containers.conf"),
            "CONTAINERS_REGISTRIES_CONF": str(conf / "registries.conf"),
            "TMPDIR": str(self._mkdir("tmp")),
        }

    def _mkdir(self, name: str) -> Path:
        path = self.root / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def __call__(
        self, *args: str, timeout: float = 120, check: bool = True, input: bytes | None = None
    ) -> subprocess.CompletedProcess[str]:
        cmd = ["podman", *args]
        result = subprocess.run(cmd, env=self.env, capture_output=True, timeout=timeout, input=input)
        out = subprocess.CompletedProcess(
            cmd, result.returncode, result.stdout.decode(errors="replace"), result.stderr.decode(errors="replace")
        )
        if check and out.returncode != 0:
            raise PodmanError(f"{' '.join(cmd)} exited {out.returncode}:\n{out.stdout[-4000:]}\n{out.stderr[-4000:]}")
        return out

    def build(
        self, context: Path, dockerfile: Path, tag: str, build_args: dict[str, str] | None = None, timeout: float = 600
    ) -> subprocess.CompletedProcess[str]:
        """Build with the flags this machine needs; the CA bundle and pip.conf exist only during the build."""
        args = [
            "build",
            "--isolation",
            "chroot",
            "--format",
            "docker",
            "--pull=never",
            "--layers",
            "-f",
            str(dockerfile),
            "-t",
            tag,
            "-v",
            f"{HOST_CA_BUNDLE}:{HOST_CA_BUNDLE}:ro",
            "-v",
            f"{self.root / 'conf' / 'pip.conf'}:/etc/pip.conf:ro",
        ]
        for key, value in (build_args or {}).items():
            args += ["--build-arg", f"{key}={value}"]
        return self(*args, str(context), timeout=timeout)

    def network(self) -> str:
        """This instance's own bridge network, made on first use.

        Its own subnet and bridge, not podman's default 10.88.0.0/16 on podman0: two test sessions
        on one machine (each with its own storage, hence its own address allocation) would otherwise
        hand out the same addresses on the same bridge.
        """
        if self._network is None:
            name = f"vitserve-test-{secrets.token_hex(3)}"
            subnet = f"10.213.{secrets.randbelow(256)}.0/24"
            self("network", "create", "--disable-dns", "--subnet", subnet, name)
            # podman 4.3 names the bridge podman<N>, N counted in this storage only: two sessions
            # would both take podman1. Give it a name of its own in the network's config file.
            config_file = self.root / "conf" / "networks" / f"{name}.json"
            config = json.loads(config_file.read_text())
            config["network_interface"] = f"vs{name[-6:]}"
            config_file.write_text(json.dumps(config, indent=2))
            self._network = name
        return self._network

    def image_size_bytes(self, tag: str) -> int:
        return int(self("image", "inspect", "--format", "{{.Size}}", tag).stdout.strip())

    def inspect(self, ref: str, fmt: str, kind: str = "image") -> str:
        return self(kind, "inspect", "--format", fmt, ref).stdout.strip()

    def close(self) -> None:
        """Remove every container (their network namespaces and firewall rules go with them), the images
        and the storage, and what podman left on the host outside it."""
        with contextlib.suppress(Exception):
            self("rm", "--all", "--force", "--time", "0", timeout=120, check=False)
        if self._network is not None:  # removes its bridge and firewall rules
            with contextlib.suppress(Exception):
                self("network", "rm", "--force", self._network, timeout=60, check=False)
        # The storage is private, so deleting its directory removes every image; that is much faster
        # than `podman system reset` (layer by layer). Unmount anything still mounted under it first.
        storage = str(self.root)
        with open("/proc/mounts") as mounts:
            targets = [line.split()[1] for line in mounts if line.split()[1].startswith(storage)]
        for target in sorted(targets, key=len, reverse=True):
            subprocess.run(["umount", "-l", target], capture_output=True, timeout=30)
        shutil.rmtree(self.root, ignore_errors=True)
        created = firewall_chains() - self._firewall_before
        # Another podman (a second test session) may still have containers behind these chains.
        if created and netavark_idle():
            remove_firewall_chains(created)
        if self._created_var_lib:
            shutil.rmtree(VAR_LIB_CONTAINERS, ignore_errors=True)


def firewall_chains() -> set[tuple[str, str]]:
    """(table, chain) of every netavark chain in iptables now; empty when iptables is absent."""
    chains = set()
    if shutil.which("iptables") is None:
        return chains
    for table in NETAVARK_TABLES:
        out = subprocess.run(["iptables", "-t", table, "-S"], capture_output=True, text=True, timeout=30)
        for line in out.stdout.splitlines():
            parts = line.split()
            if len(parts) == 2 and parts[0] == "-N" and parts[1].startswith("NETAVARK"):
                chains.add((table, parts[1]))
    return chains


def netavark_idle() -> bool:
    """True when netavark's chains hold nothing but their empty scaffolding: no network or published
    port of any container (ours or anyone's) still depends on them."""
    if firewall_chains() - NETAVARK_SCAFFOLD:
        return False  # per-network or per-container chains still exist
    for table, chain in (("filter", "NETAVARK_FORWARD"), ("nat", "NETAVARK-HOSTPORT-DNAT")):
        out = subprocess.run(["iptables", "-t", table, "-S", chain], capture_output=True, text=True, timeout=30)
        if any(line.startswith("-A ") for line in out.stdout.splitlines()):
            return False
    return True


def remove_firewall_chains(chains: set[tuple[str, str]]) -> None:
    """Delete the jumps into these chains, then the chains (netavark keeps them after the last container)."""
    for table in sorted({table for table, _ in chains}):
        names = {chain for t, chain in chains if t == table}
        rules = subprocess.run(["iptables", "-t", table, "-S"], capture_output=True, text=True, timeout=30).stdout
        for line in rules.splitlines():
            args = shlex.split(line)
            if args[:1] == ["-A"] and args[1] not in names and any(a in names for a in args[2:]):
                subprocess.run(["iptables", "-t", table, "-D", *args[1:]], capture_output=True, timeout=30)
        for chain in names:
            subprocess.run(["iptables", "-t", table, "-F", chain], capture_output=True, timeout=30)
        for chain in names:
            subprocess.run(["iptables", "-t", table, "-X", chain], capture_output=True, timeout=30)


def standin_tarball(cache_dir: Path, suite: str = "bookworm", packages: Sequence[str] = STANDIN_PACKAGES) -> Path:
    """A minbase Debian root with the packages a slim Python image provides, as a tar (cached).

    The tarball depends only on the suite and package list, so it is safe to keep between runs.
    """
    key = hashlib.sha256(f"{suite}:{','.join(sorted(packages))}".encode()).hexdigest()[:12]
    tarball = cache_dir / f"standin-{suite}-{key}.tar"
    if tarball.exists():
        return tarball
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="vitserve-debootstrap-", dir=cache_dir) as tmp:
        rootfs = Path(tmp) / "rootfs"
        cmd = ["debootstrap", "--variant=minbase", f"--include={','.join(packages)}", suite, str(rootfs), DEBIAN_MIRROR]
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        if result.returncode != 0:
            raise RuntimeError(f"debootstrap failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
        # Slim images ship without apt lists or caches; keep the stand-in as lean as they are.
        for leftover in ("var/cache/apt/archives", "var/lib/apt/lists"):
            for item in (rootfs / leftover).glob("*"):
                if item.is_file():
                    item.unlink()
        partial = tarball.with_suffix(".partial")
        subprocess.run(["tar", "--numeric-owner", "-C", str(rootfs), "-cf", str(partial), "."], check=True, timeout=300)
        partial.rename(tarball)
    return tarball


def import_standin(podman: Podman, tarball: Path, tags: Sequence[str]) -> None:
    """Import the stand-in root and tag it with the exact names the Dockerfiles' FROM lines use."""
    # The same image config a python:3.x-slim image carries that matters to a build or a run.
    changes = [
        "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "ENV LANG=C.UTF-8",
        'CMD ["python3"]',
    ]
    args = ["import"]
    for change in changes:
        args += ["--change", change]
    podman(*args, str(tarball), "localhost/vitserve-standin:latest", timeout=300)
    for tag in tags:
        podman("tag", "localhost/vitserve-standin:latest", tag)


@dataclass
class Container:
    """One detached container, published on 127.0.0.1:port; ``remove()`` is idempotent."""

    podman: Podman
    name: str
    port: int

    @classmethod
    def start(
        cls,
        podman: Podman,
        image: str,
        name: str,
        env: dict[str, str] | None = None,
        volumes: Sequence[str] = (),
        stop_timeout_s: int = 30,
        extra: Sequence[str] = (),
    ) -> Container:
        port = free_port()
        args = [
            "run",
            "--detach",
            "--pull=never",
            "--name",
            name,
            "--network",
            podman.network(),
            "--publish",
            f"127.0.0.1:{port}:8000",
            "--stop-timeout",
            str(stop_timeout_s),
            *extra,
        ]
        for key, value in (env or {}).items():
            args += ["--env", f"{key}={value}"]
        for volume in volumes:
            args += ["--volume", volume]
        podman(*args, image)
        return cls(podman, name, port)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def logs(self) -> str:
        out = self.podman("logs", self.name, check=False)
        return out.stdout + out.stderr

    def state(self) -> str:
        return self.podman.inspect(self.name, "{{.State.Status}}", kind="container")

    def wait_healthy(self, timeout_s: float = 120) -> float:
        """Run the image's HEALTHCHECK until it passes; returns the seconds it took."""
        start = time.monotonic()
        while True:
            if self.podman("healthcheck", "run", self.name, check=False, timeout=60).returncode == 0:
                return time.monotonic() - start
            if self.state() != "running":
                raise PodmanError(f"{self.name} exited before becoming healthy:\n{self.logs()[-4000:]}")
            if time.monotonic() - start > timeout_s:
                raise PodmanError(f"{self.name} not healthy after {timeout_s}s:\n{self.logs()[-4000:]}")
            time.sleep(1)

    def exec(self, *cmd: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return self.podman("exec", self.name, *cmd, timeout=timeout)

    def remove(self) -> None:
        self.podman("rm", "--force", "--time", "0", self.name, check=False)


@contextlib.contextmanager
def private_podman(prefix: str = "vitserve-podman-") -> Iterator[Podman]:
    root = Path(tempfile.mkdtemp(prefix=prefix))
    podman = Podman(root)
    try:
        yield podman
    finally:
        podman.close()
