"""Private Redis servers for the fault tests: started from the ``redis-server`` on PATH,
stopped and started again at will, on a port of their own (TLS ones too)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import redis


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_ping(
    client: Callable[[], redis.Redis], proc: subprocess.Popen[bytes], log: Path, timeout: float, what: str
) -> None:
    """Until the server started as ``proc`` answers PING; its log's tail if it exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            client().ping()
            return
        except redis.RedisError:
            if proc.poll() is not None:
                raise RuntimeError(f"{what} exited: {log.read_text()[-2000:]}") from None
            time.sleep(0.05)
    raise TimeoutError(f"{what} did not answer within {timeout}s")


class RedisServer:
    """One ``redis-server`` process on a fixed port, so that a restart keeps its URL.
    ``persist``: append-only file, fsynced every second and on a clean shutdown, so a
    restart keeps the data (as a production Redis does); without it a restart empties it."""

    def __init__(
        self, workdir: Path, *, persist: bool = False, tls: dict[str, str] | None = None, args: tuple[str, ...] = ()
    ) -> None:
        if shutil.which("redis-server") is None:
            # as for the shared Redis (conftest.py): missing on a laptop skips, in CI fails
            message = "no redis-server on PATH: the fault tests start private ones (apt install redis-server)"
            if os.environ.get("CI"):
                pytest.fail(message)
            pytest.skip(message)
        self.port = free_port()
        self.dir = workdir / f"redis-{self.port}"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.persist = persist
        self.tls = tls
        self.args = args
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        if self.tls:
            return f"rediss://127.0.0.1:{self.port}/0?ssl_cert_reqs=required&ssl_ca_certs={self.tls['ca']}"
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url, socket_connect_timeout=1, socket_timeout=5)

    def start(self, timeout: float = 10.0) -> RedisServer:
        args = ["redis-server", "--bind", "127.0.0.1", "--dir", str(self.dir), "--save", ""]
        args += ["--appendonly", "yes", "--appendfsync", "everysec"] if self.persist else ["--appendonly", "no"]
        if self.tls:
            args += ["--port", "0", "--tls-port", str(self.port), "--tls-cert-file", self.tls["cert"]]
            args += [
                "--tls-key-file",
                self.tls["key"],
                "--tls-ca-cert-file",
                self.tls["ca"],
                "--tls-auth-clients",
                "no",
            ]
        else:
            args += ["--port", str(self.port)]
        args += list(self.args)
        with (self.dir / "redis.log").open("ab") as log:
            self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        _wait_for_ping(self.client, self.proc, self.dir / "redis.log", timeout, f"redis-server on {self.port}")
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """A clean shutdown (SIGTERM): with ``persist``, everything written is kept."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None

    def kill(self) -> None:
        """SIGKILL: what a crash or a lost host does."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None

    def restart(self, down_s: float = 0.0) -> None:
        self.stop()
        time.sleep(down_s)
        self.start()


def make_tls(workdir: Path) -> dict[str, str]:
    """A CA and a server certificate for 127.0.0.1 signed by it, made with openssl."""
    if shutil.which("openssl") is None:
        raise RuntimeError("no openssl on PATH")
    out = workdir / "tls"
    out.mkdir(parents=True, exist_ok=True)
    ca, ca_key, cert, key, csr, ext = (
        str(out / n) for n in ("ca.pem", "ca.key", "cert.pem", "key.pem", "req.csr", "ext.cnf")
    )
    Path(ext).write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)

    run(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=test CA",
        "-keyout",
        ca_key,
        "-out",
        ca,
    )
    run("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1", "-keyout", key, "-out", csr)
    run(
        "x509",
        "-req",
        "-in",
        csr,
        "-CA",
        ca,
        "-CAkey",
        ca_key,
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        ext,
        "-out",
        cert,
    )
    return {"ca": ca, "cert": cert, "key": key}


class Sentinel:
    """One ``redis-server --sentinel`` watching ``master`` (quorum 1, a second to call it down)."""

    def __init__(self, workdir: Path, master: RedisServer, name: str = "mymaster") -> None:
        self.port = free_port()
        self.name = name
        self.dir = workdir / f"sentinel-{self.port}"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.config = self.dir / "sentinel.conf"
        self.config.write_text(
            f"port {self.port}\nbind 127.0.0.1\ndir {self.dir}\n"
            f"sentinel monitor {name} 127.0.0.1 {master.port} 1\n"
            f"sentinel down-after-milliseconds {name} 1000\n"
            f"sentinel failover-timeout {name} 5000\n"
            f"sentinel parallel-syncs {name} 1\n"
        )
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"sentinel://127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, socket_connect_timeout=1, socket_timeout=5)

    def start(self, timeout: float = 10.0) -> Sentinel:
        with (self.dir / "sentinel.log").open("ab") as log:
            self.proc = subprocess.Popen(
                ["redis-server", str(self.config), "--sentinel"], stdout=log, stderr=subprocess.STDOUT
            )
        _wait_for_ping(self.client, self.proc, self.dir / "sentinel.log", timeout, f"sentinel on {self.port}")
        return self

    def master_port(self) -> int | None:
        try:
            addr = self.client().sentinel_get_master_addr_by_name(self.name)
        except redis.RedisError:
            return None
        return int(addr[1]) if addr else None

    def replicas(self) -> int:
        try:
            return len(self.client().sentinel_slaves(self.name))
        except redis.RedisError:
            return 0

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        self.proc = None
