"""A real `bentoml serve` for the tests and the benchmarks: started as a child process (its own process group, so
stopping it stops its workers), waited for until ready (failing with the server's own last words), stopped; and
frames as the JSON records /predict takes. Not part of the library: only tests/ and bench/ start servers."""
from __future__ import annotations
import contextlib, json, os, subprocess, sys, time
from pathlib import Path
import numpy as np
import pandas as pd
from nbs_lib.serving import bentofile


def start_server(root: str | Path, port: int, env: dict | None = None, log: str | Path | None = None,
                 host: str = '127.0.0.1'):
    "Start `bentoml serve <bentofile's service>` in `root` on host:port; returns the Popen (output to `log`)."
    out = open(log, 'w') if log else subprocess.DEVNULL
    return subprocess.Popen([str(Path(sys.executable).parent/'bentoml'), 'serve', bentofile(Path(root))['service'], '--host', host,
                             '--port', str(port)], cwd=root, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)

def wait_ready(url: str, proc, timeout: float = 300, log: str | Path | None = None) -> float:
    "Poll `url`/readyz until 200; seconds it took. RuntimeError (with the log's tail) if the server exits or times out."
    import urllib.request, urllib.error
    t0 = time.monotonic()
    tail = lambda: Path(log).read_text()[-3000:] if log and Path(log).exists() else ''
    while True:
        if proc.poll() is not None: raise RuntimeError(f"bentoml serve exited {proc.returncode}:\n{tail()}")
        try:
            with urllib.request.urlopen(f'{url}/readyz', timeout=2) as r:
                if r.status == 200: return time.monotonic() - t0
        except (urllib.error.URLError, OSError): pass
        if time.monotonic() - t0 > timeout: raise RuntimeError(f"{url} not ready after {timeout:.0f} s:\n{tail()}")
        time.sleep(0.3)

def free_port(host: str = '127.0.0.1') -> int:
    "A TCP port free on `host` right now."
    import socket
    with socket.socket() as so:
        so.bind((host, 0)); return so.getsockname()[1]

def json_records(X: pd.DataFrame) -> list[dict]:
    "Rows of `X` as JSON-ready records for /predict (NaN as null, numpy scalars as Python numbers)."
    return [{k: (None if isinstance(v, float) and np.isnan(v) else v) for k, v in r.items()} for r in json.loads(X.to_json(orient='records'))]

def stop_server(proc, timeout: float = 30) -> None:
    "Stop a server started by `start_server` (SIGTERM to its process group, SIGKILL if it lingers)."
    import signal
    if proc.poll() is not None: return
    os.killpg(proc.pid, signal.SIGTERM)
    try: proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL); proc.wait(10)


@contextlib.contextmanager
def serving(root: Path, env: dict, timeout: float = 300):
    "A real `bentoml serve` of the project at `root` on a free loopback port: yields (url, process, seconds to ready); stopped after."
    import pytest
    port = free_port(); url = f'http://127.0.0.1:{port}'
    proc = start_server(root, port, env, root/'server.log')
    try:
        try: ready = wait_ready(url, proc, timeout, root/'server.log')
        except RuntimeError as e: pytest.fail(str(e))
        yield url, proc, ready
    finally:
        stop_server(proc)
