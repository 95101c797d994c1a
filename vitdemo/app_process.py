"""`python app.py` in a child process, started as a user starts it and configured only through the environment:
for the tools that drive or time the app from outside (the browser test, the start-up bench, the README's
screenshot)."""
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


@contextmanager
def running_app(root: str | Path, env: dict[str, str] | None = None, log: IO | None = None,
                timeout: float = 120.0) -> Iterator[tuple[str, float]]:
    """Start `app.py` of the checkout at `root` on a free local port, offline, with `env` added to this
    process's environment; yield its URL and the seconds until the page first answered; stop it on leaving.
    Its output goes to `log` (else nowhere). Raises RuntimeError if it exits or does not answer in time."""
    port = free_port()
    env = dict(os.environ, GRADIO_SERVER_NAME='127.0.0.1', GRADIO_SERVER_PORT=str(port), HF_HUB_OFFLINE='1',
               **(env or {}))
    url = f'http://127.0.0.1:{port}/'
    start = time.perf_counter()
    app = subprocess.Popen([sys.executable, 'app.py'], cwd=root, env=env, stdout=log or subprocess.DEVNULL,
                           stderr=subprocess.STDOUT if log else subprocess.DEVNULL)
    try:
        while True:
            if app.poll() is not None:
                raise RuntimeError(f'the app in {root} exited with {app.returncode}')
            try:
                urllib.request.urlopen(url, timeout=1)
                break
            except OSError:
                if time.perf_counter() - start > timeout:
                    raise RuntimeError(f'the app in {root} did not answer within {timeout:.0f} s') from None
                time.sleep(0.05)
        yield url, time.perf_counter() - start
    finally:
        app.terminate()
        app.wait(timeout=30)
