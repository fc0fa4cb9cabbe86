"""`lmforge serve` as a subprocess on a free loopback port: for tests, benchmarks and scripts that need a real
server (a real process, real HTTP) rather than an app object in their own process."""

from __future__ import annotations

import socket
import subprocess
import sys
import tempfile
import time


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def start_server(
    model: str, *flags: str, host: str = "127.0.0.1", timeout: float = 60.0
) -> tuple[subprocess.Popen, str]:
    """Start `python -m lmforge serve MODEL --port P *flags`; return (process, base URL) once /health answers.

    The server's output goes to a temporary file (a pipe nobody reads would fill up and stall the server); a
    server that exits or does not answer within `timeout` seconds raises RuntimeError with that output.
    """
    import httpx

    port = free_port(host)
    log = tempfile.TemporaryFile("w+")
    proc = subprocess.Popen(
        [sys.executable, "-m", "lmforge", "serve", str(model), "--host", host, "--port", str(port), *flags],
        stdout=log,
        stderr=subprocess.STDOUT,
        text=True,
    )

    def output() -> str:
        log.seek(0)
        return log.read()

    url = f"http://{host}:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"lmforge serve exited with {proc.returncode}:\n{output()}")
        try:
            if httpx.get(url + "/health", timeout=1.0).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"lmforge serve did not answer /health within {timeout} s:\n{output()}")


def stop_server(proc: subprocess.Popen, timeout: float = 15.0) -> int:
    """SIGTERM (uvicorn shuts down gracefully and closes the engine), then kill if it hangs; the exit code."""
    proc.terminate()
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()
