"""`arenaflow ui`: the MLflow web UI over the project's tracking store.

`running_server(tracking_uri, port)` starts `mlflow server` in its own process group, bound to
127.0.0.1, waits until `/health` answers and yields a `UIServer` (`.url`, `.proc`); on exit it stops
the whole group (SIGTERM, then SIGKILL after a grace period). `serve()` is the blocking CLI verb around it: it prints
the URL and runs until Ctrl-C or SIGTERM.

Artifacts are served locally: runs logged straight to a sqlite store keep their own local
`artifact_uri`, which the server reads directly; experiments created through the server get proxied
artifacts under `<store dir>/mlartifacts`.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from ..errors import ArenaflowError

LOCAL_HOST = "127.0.0.1"


class ServerError(ArenaflowError, RuntimeError):
    """`mlflow server` exited early or did not answer in time."""


@dataclass(frozen=True)
class UIServer:
    """A started, answering `mlflow server`: `url` is its base URL (the UI lives at `url + '/#/'`)."""

    url: str
    port: int
    tracking_uri: str
    proc: subprocess.Popen

    def __str__(self) -> str:
        return self.url


def default_tracking_uri() -> str:
    """The project's tracking store (tracking.tracking_uri: $MLFLOW_TRACKING_URI, else ./mlflow.db)."""
    from .runs import tracking_uri

    return tracking_uri()


def artifacts_destination_for(tracking_uri: str) -> Path:
    """Local folder for proxied artifacts: `mlartifacts/` beside a sqlite file or file store."""
    if tracking_uri.startswith("sqlite:///"):
        db = tracking_uri[len("sqlite:///") :]
        if db and db != ":memory:":
            return Path(db).expanduser().resolve().parent / "mlartifacts"
    elif tracking_uri.startswith("file://"):
        return Path(tracking_uri[len("file://") :]).resolve().parent / "mlartifacts"
    elif "://" not in tracking_uri:  # a bare path is a file store
        return Path(tracking_uri).expanduser().resolve().parent / "mlartifacts"
    return Path("mlartifacts").resolve()


def free_port(host: str = LOCAL_HOST) -> int:
    """A TCP port that was free a moment ago (for tests and `--port 0`)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def server_command(
    tracking_uri: str,
    port: int,
    host: str = LOCAL_HOST,
    *,
    artifacts_destination: str | os.PathLike | None = None,
    workers: int = 1,
) -> list[str]:
    """The `mlflow server` command line (run with this interpreter, so the venv's mlflow is used)."""
    dest = Path(artifacts_destination) if artifacts_destination else artifacts_destination_for(tracking_uri)
    return [
        sys.executable, "-m", "mlflow", "server",
        "--backend-store-uri", tracking_uri,
        "--serve-artifacts",
        "--artifacts-destination", str(dest),
        "--host", host,
        "--port", str(port),
        "--workers", str(workers),
    ]  # fmt: skip


def _answers(url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
        return False


def wait_until_up(url: str, proc: subprocess.Popen | None = None, timeout: float = 120.0) -> None:
    """Poll `<url>/health` until it answers 200; fail fast if `proc` exits first."""
    deadline = time.monotonic() + timeout
    health = url.rstrip("/") + "/health"
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise ServerError(f"mlflow server exited with code {proc.returncode} before answering")
        if _answers(health):
            return
        time.sleep(0.5)
    raise ServerError(f"mlflow server did not answer at {health} within {timeout:.0f} s")


def stop_group(proc: subprocess.Popen, grace: float = 10.0) -> int:
    """SIGTERM the server's whole process group (uvicorn/gunicorn workers included), then SIGKILL."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
    # Workers may outlive the leader: sweep the group either way.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    return proc.wait()


@contextlib.contextmanager
def running_server(
    tracking_uri: str | None = None,
    port: int = 5000,
    host: str = LOCAL_HOST,
    *,
    artifacts_destination: str | os.PathLike | None = None,
    workers: int = 1,
    log: str | os.PathLike | None = None,
    startup_timeout: float = 120.0,
) -> Iterator[UIServer]:
    """Run `mlflow server` over `tracking_uri` for the duration of the block; yields a `UIServer`.

    `log`: file for the server's stdout+stderr (default: inherit the caller's). `port=0` picks a
    free port. The server runs in a new session, so stopping it stops every worker it forked.
    """
    tracking_uri = tracking_uri or default_tracking_uri()
    if port == 0:
        port = free_port(host)
    if not _port_free(host, port):
        raise ServerError(f"port {port} on {host} is already in use")
    cmd = server_command(
        tracking_uri, port, host, artifacts_destination=artifacts_destination, workers=workers
    )
    url = f"http://{host}:{port}"
    env = dict(os.environ, MLFLOW_TRACKING_URI=tracking_uri)
    # The server's background job runner (huey consumers for GenAI judges/online scoring) is not
    # used by arenaflow; without it the server starts faster and forks 8 fewer processes.
    env.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    out: IO | None = open(log, "ab") if log is not None else None  # noqa: SIM115
    try:
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT if out is not None else None,
            env=env,
            start_new_session=True,
        )
        try:
            try:
                wait_until_up(url, proc, timeout=startup_timeout)
            except ServerError as exc:
                if log is not None:
                    out.flush()
                    tail = Path(log).read_bytes()[-3000:].decode(errors="replace")
                    raise ServerError(f"{exc}; end of {log}:\n{tail}") from None
                raise
            yield UIServer(url=url, port=port, tracking_uri=tracking_uri, proc=proc)
        finally:
            stop_group(proc)
    finally:
        if out is not None:
            out.close()


def _port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        return s.connect_ex((host, port)) != 0


def serve(
    tracking_uri: str | None = None,
    port: int = 5000,
    host: str = LOCAL_HOST,
    *,
    workers: int = 1,
) -> int:
    """Blocking `arenaflow ui`: start the server, print its URL, run until Ctrl-C or SIGTERM.

    Returns 0 after a clean stop, else the server's own exit code if it died by itself.
    """
    tracking_uri = tracking_uri or default_tracking_uri()

    def _on_term(signum, frame):  # turn SIGTERM into the same clean path as Ctrl-C
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, _on_term)
    try:
        print(f"arenaflow ui: starting mlflow server over {tracking_uri} ...", flush=True)
        with running_server(tracking_uri, port, host, workers=workers) as server:
            print(f"arenaflow ui: MLflow UI at {server.url}  (Ctrl-C to stop)", flush=True)
            code = server.proc.wait()
            print(f"arenaflow ui: mlflow server exited with code {code}", file=sys.stderr, flush=True)
            return code or 1
    except KeyboardInterrupt:
        print("\narenaflow ui: stopped", flush=True)
        return 0
    except ServerError as exc:
        print(f"arenaflow ui: {exc}", file=sys.stderr, flush=True)
        return 1
    finally:
        signal.signal(signal.SIGTERM, previous)
