"""Real MLflow processes on 127.0.0.1 for tests: `mlflow server` (a tracking server) and
`mlflow models serve` (a served model), started, waited for and stopped in one place.

Each runs in its own process group (mlflow starts uvicorn workers under it), so stopping it
leaves no child behind. The conftest fixture `mlflow_server` is built on `tracking_server`.
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
from pathlib import Path

HOST = "127.0.0.1"
SERVER_START_TIMEOUT_S = 60.0  # `mlflow server`: sqlite migrations, then uvicorn
SERVE_START_TIMEOUT_S = 90.0  # `mlflow models serve`: loads the model before it answers


class ServerDidNotStart(AssertionError):
    """The process exited, or did not answer in time; carries the tail of its log."""

    def __init__(self, state: str, log_tail: str) -> None:
        super().__init__(f"{state}; log tail:\n{log_tail}")
        self.state, self.log_tail = state, log_tail


def free_port() -> int:
    """A port nothing listens on right now (the OS picks it; the socket is closed again)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def unreachable_url() -> str:
    """An http URL on localhost where no server answers."""
    url = f"http://{HOST}:{free_port()}"
    assert not answers(url, "/health"), f"something listens on {url}"
    return url


def mlflow_command(*args: str) -> list[str]:
    """The `mlflow` command line of this interpreter's environment."""
    script = Path(sys.executable).with_name("mlflow")
    return [*([str(script)] if script.is_file() else [sys.executable, "-m", "mlflow"]), *args]


def mlflow_env(**settings: str) -> dict[str, str]:
    """The environment of a child mlflow process: none of this process's MLFLOW_ settings, the
    venv's bin first on PATH (`mlflow models serve` starts `uvicorn` by name), plus `settings`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env | settings


def answers(url: str, route: str) -> bool:
    """Whether `url + route` answers 200 within 2 s."""
    try:
        with urllib.request.urlopen(f"{url}{route}", timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def tail(path: Path, lines: int = 25) -> str:
    text = path.read_text(encoding="utf-8", errors="replace") if path.exists() else ""
    return "\n".join(text.splitlines()[-lines:])


def stop_group(process: subprocess.Popen, grace_s: float = 15.0) -> None:
    """SIGTERM the process group (mlflow -> uvicorn), wait up to `grace_s`, then make sure
    none is left (children may outlive the leader) and reap the leader."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=grace_s)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    if process.poll() is None:
        process.wait(timeout=10)


@contextlib.contextmanager
def running(command: list[str], *, cwd: Path, env: dict[str, str], url: str, route: str,
            timeout_s: float, stdout_path: Path, stderr_path: Path | None = None,
            grace_s: float = 15.0) -> Iterator[subprocess.Popen]:
    """Start `command` in its own process group, wait until `url + route` answers, yield the
    process, stop its group at the end. Output goes to `stdout_path` (stderr too unless
    `stderr_path`). Raises `ServerDidNotStart` if it exits or stays silent for `timeout_s`."""
    log_path = stderr_path or stdout_path
    with contextlib.ExitStack() as files:
        stdout = files.enter_context(open(stdout_path, "wb"))
        stderr = files.enter_context(open(stderr_path, "wb")) if stderr_path else subprocess.STDOUT
        process = subprocess.Popen(command, cwd=cwd, env=env, stdout=stdout, stderr=stderr,
                                   stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + timeout_s
        while not answers(url, route):
            if process.poll() is not None:
                raise ServerDidNotStart(f"exited with status {process.returncode}",
                                        tail(log_path))
            if time.monotonic() > deadline:
                raise ServerDidNotStart(f"no answer on {url}{route} after {timeout_s:.0f} s",
                                        tail(log_path))
            time.sleep(0.5)
        yield process
    finally:
        stop_group(process, grace_s)


@contextlib.contextmanager
def tracking_server(root: Path) -> Iterator[dict]:
    """`mlflow server` on a free port: sqlite backend `root/srv.db`, artifacts proxied by the
    server into `root/artifacts`. Yields its URL, its folders and its process."""
    artifacts = root / "artifacts"
    port = free_port()
    url = f"http://{HOST}:{port}"
    # MLflow 3 also starts a job runner with ~7 huey consumer processes by default; the
    # tracking API does not need it, and on two cores it only slows the start down.
    env = mlflow_env(MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    command = mlflow_command("server", "--host", HOST, "--port", str(port), "--workers", "1",
                             "--backend-store-uri", f"sqlite:///{root / 'srv.db'}",
                             "--artifacts-destination", str(artifacts))
    with running(command, cwd=root, env=env, url=url, route="/health",
                 timeout_s=SERVER_START_TIMEOUT_S, stdout_path=root / "server.out",
                 stderr_path=root / "server.err") as process:
        yield {"url": url, "root": root, "artifacts": artifacts, "process": process}


@contextlib.contextmanager
def model_server(model_uri: str, *, cwd: Path,
                 env: dict[str, str]) -> Iterator[tuple[str, subprocess.Popen]]:
    """`mlflow models serve` of `model_uri` (local env manager, one worker) on a free port;
    yields its URL and process once /ping answers. Its log is `cwd/serve.log`."""
    port = free_port()
    url = f"http://{HOST}:{port}"
    command = mlflow_command("models", "serve", "-m", model_uri, "-p", str(port), "-h", HOST,
                             "-w", "1", "--env-manager", "local")
    with running(command, cwd=cwd, env=env, url=url, route="/ping",
                 timeout_s=SERVE_START_TIMEOUT_S, stdout_path=cwd / "serve.log",
                 grace_s=20.0) as process:
        yield url, process
