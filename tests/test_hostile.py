"""Issue 18: the service under hostile input, against ONE real `bentoml serve` (1 worker, journal on, small limits) on
loopback. Each test sends a reproducer (smaller than the outside test's where it shows the same defect), checks the
answer, the worker's resident memory (psutil) and that /readyz still answers at once. The last test kills the worker
under load and counts the prediction log's rows by request_id."""
from __future__ import annotations
import json, os, re, signal, socket, threading, time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
import httpx
import numpy as np
import pandas as pd
import psutil
import pytest
import yaml
from conftest import PROJECT_FILES, copy_project, nbs, set_params
from nbs_lib.predlog import read_prediction_log
from servers import json_records, serving, wait_ready
from test_serving import _env, _register, _test_rows

LIMITS = {'serve.workers': 1, 'serve.max_file_rows': 1000, 'serve.max_file_mb': 2, 'serve.max_body_mb': 4,
          'serve.timeouts.header_s': 2, 'serve.timeouts.keep_alive_s': 2, 'serve.timeouts.body_s': 3,
          'serve.journal': True, 'serve.batching.max_latency_ms': 10000}
MiB = 2**20


@pytest.fixture(scope='module')
def hostile(sample_project, tmp_path_factory):
    """The built sample's champion served by one worker with the limits above."""
    root = copy_project(tmp_path_factory.mktemp('hostile')/'proj', src=sample_project, files=PROJECT_FILES + ['build', 'mlflow.db'])
    copy_project(root, files=['service.py', 'bentofile.yaml'])
    set_params(root, **LIMITS)
    _register(root)
    nbs(root, 'serve', 'import', BENTOML_HOME=str(root/'build/bentoml'), MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR='false')
    with serving(root, _env(root)) as (url, proc, _):
        port = int(url.rsplit(':', 1)[1])
        c = httpx.Client(base_url=url, timeout=60)
        recs = json_records(_test_rows(root, 40))
        for i in range(5): assert c.post('/predict', json={'records': recs[i:i + 3]}).status_code == 200  # warm
        yield {'root': root, 'url': url, 'port': port, 'proc': proc, 'client': c, 'recs': recs, 'log': root/'server.log'}


def worker(h) -> psutil.Process:
    """The server's (one) worker process."""
    for _ in range(300):
        ws = [p for p in psutil.Process(h['proc'].pid).children(recursive=True)
              if any('_bentoml_impl.worker.service' in a for a in p.cmdline())]
        if ws: return ws[0]
        time.sleep(0.1)
    raise AssertionError('no worker process')


def rss(h) -> float:
    return worker(h).memory_info().rss / MiB


def ready_at_once(h) -> None:
    """/readyz answers 200 within 2 s."""
    assert httpx.get(f"{h['url']}/readyz", timeout=2).status_code == 200


class Readiness:
    """/readyz polled from a thread while a hostile request runs: the slowest answer (s), and failures."""
    def __init__(self, h):
        self.url, self.worst, self.failed, self._stop = f"{h['url']}/readyz", 0.0, [], threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            t0 = time.perf_counter()
            try:
                if httpx.get(self.url, timeout=2).status_code != 200: self.failed.append('not ready')
            except httpx.HTTPError as e: self.failed.append(type(e).__name__)
            self.worst = max(self.worst, time.perf_counter() - t0); self._stop.wait(0.1)

    def __enter__(self): self._t.start(); return self
    def __exit__(self, *a): self._stop.set(); self._t.join()


def _parquet(df: pd.DataFrame, path: Path) -> bytes:
    df.to_parquet(path); return path.read_bytes()


def test_parquet_claiming_many_rows_is_refused_from_its_footer(hostile, tmp_path):
    """A small file of a million identical rows (serve.max_file_rows 1000): 400 at once, nothing decoded."""
    h, c = hostile, hostile['client']
    one = pd.DataFrame([h['recs'][0]])
    body = _parquet(one.loc[np.zeros(1_000_000, dtype=int)].reset_index(drop=True), tmp_path/'many.parquet')
    assert len(body) < 200_000  # ~100 KB on disk, ~150 MB decoded
    before = rss(h)
    with Readiness(h) as ready:
        r = c.post('/predict_file', files={'file': ('many.parquet', body)})
    assert r.status_code == 400 and 'the file has 1000000 rows, more than serve.max_file_rows=1000' in r.json()['error'], r.text
    assert not ready.failed and ready.worst < 2, (ready.failed, ready.worst)
    assert rss(h) - before < 30, (before, rss(h))
    # rows under the limit, but a decoded size over serve.max_file_mb (2): a long string repeated, dictionary-encoded
    wide = _parquet(one.loc[np.zeros(900, dtype=int)].reset_index(drop=True).assign(note='x' * 5000), tmp_path/'wide.parquet')
    r = c.post('/predict_file', files={'file': ('wide.parquet', wide)})
    assert r.status_code == 400 and 'more than serve.max_file_mb=2' in r.json()['error'], r.text
    ready_at_once(h)


def test_a_parquet_column_of_lists_answers_400(hostile, tmp_path):
    h = hostile
    df = pd.DataFrame(h['recs'][:3]).assign(distance=[[1.0, 2.0]] * 3)
    r = h['client'].post('/predict_file', files={'file': ('lists.parquet', _parquet(df, tmp_path/'l.parquet'))})
    assert r.status_code == 400 and "column 'distance': list<" in r.json()['error'], r.text
    ready_at_once(h)


def test_error_answers_name_the_first_problems_and_count_them(hostile):
    """1,000 records with 100 unknown keys each (the outside test: 1,000 keys, an 8.5 MB body), and 1,000 empty records."""
    h, c = hostile, hostile['client']
    rec = h['recs'][0]
    junk = {'records': [{**rec, **{f'unknown_{i:03d}': i for i in range(100)}} for _ in range(1000)]}
    log0, before = h['log'].stat().st_size, rss(h)
    with Readiness(h) as ready:
        r = c.post('/predict', json=junk)
    assert r.status_code == 400, r.text[:500]
    d = r.json()
    assert len(r.content) < 20_000 and d['error_count'] == 1000 and len(d['detail']) == 20, (len(r.content), d.get('error'))
    assert "100 unknown fields ('unknown_000'" in d['detail'][0]['msg'] and d['error'].startswith('1000 problems in the request')
    assert not ready.failed and ready.worst < 2, (ready.failed, ready.worst)
    r = c.post('/predict', json={'records': [{}] * 1000})
    assert r.status_code == 400 and len(r.content) < 20_000 and r.json()['error_count'] == 18000, (len(r.content), r.text[:300])
    time.sleep(0.5)
    assert h['log'].stat().st_size - log0 < 3000, h['log'].read_text()[log0:log0 + 3000]  # a line per request, not megabytes
    assert rss(h) - before < 60, (before, rss(h))
    ready_at_once(h)


def test_a_bad_request_is_one_warning_line_without_its_values(hostile):
    h = hostile
    size = h['log'].stat().st_size
    r = h['client'].post('/predict', json={'records': [dict(h['recs'][0], month=13, carrier='PRIVATE-VALUE-42')]})
    assert r.status_code == 400 and "'month'" in json.dumps(r.json()).replace('"', "'")
    time.sleep(0.5)
    new = h['log'].read_text()[size:]
    assert 'PRIVATE-VALUE-42' not in new and 'Traceback' not in new and '[ERROR]' not in new, new
    lines = [l for l in new.splitlines() if '/predict' in l and 'bad request' in l]
    assert len(lines) == 1 and 'WARNING' in lines[0] and 'month' in lines[0], new


def test_body_size_limit_answers_413_on_every_endpoint(hostile):
    h, c = hostile, hostile['client']
    big = b'x' * (5 * MiB)  # serve.max_body_mb: 4
    for path in ('/predict', '/predict_file', '/no-such-endpoint'):
        r = c.post(path, content=big, headers={'content-type': 'application/json'})
        assert r.status_code == 413 and 'max_body_mb' in r.json()['error'], (path, r.status_code, r.text[:200])
    r = c.post('/predict', content=iter([b'x' * MiB] * 5), headers={'content-type': 'application/json'})  # chunked, no length
    assert r.status_code == 413, r.text[:200]
    ready_at_once(h)


class _Listener:
    """A loopback socket that counts connections: nothing may fetch the URL a client gives as a file."""
    def __init__(self):
        self.s = socket.socket(); self.s.bind(('127.0.0.1', 0)); self.s.listen(); self.s.settimeout(0.2); self.hits = 0
        self.url = f'http://127.0.0.1:{self.s.getsockname()[1]}/flights.parquet'

    def count(self) -> int:
        try:
            while True: self.s.accept()[0].close(); self.hits += 1
        except OSError: return self.hits


def test_file_given_as_a_string_is_refused_and_never_fetched(hostile):
    h, c, lst = hostile, hostile['client'], _Listener()
    r = c.post('/predict_file', files={'file': (None, lst.url)})  # curl -F file=http://...
    assert r.status_code == 400 and 'must be an uploaded file' in r.json()['error'], r.text
    r = c.post('/predict_file', json={'file': lst.url})
    assert r.status_code == 400 and 'multipart/form-data' in r.json()['error'], r.text
    assert lst.count() == 0
    ready_at_once(h)


def test_a_long_upload_file_name_answers_400(hostile):
    h = hostile
    csv = pd.DataFrame(h['recs'][:2]).to_csv(index=False).encode()
    r = h['client'].post('/predict_file', files={'file': ('x' * 245 + '.csv', csv)})
    assert r.status_code == 400 and 'file name of 249 bytes' in r.json()['error'], r.text
    assert h['client'].post('/predict_file', files={'file': ('x' * 150 + '.csv', csv)}).status_code == 200
    ready_at_once(h)


def test_400_answers_agree_with_the_schema_and_docs_show_the_model(hostile):
    c = hostile['client']
    spec = c.get('/docs.json').json()
    description = yaml.safe_load((hostile['root']/'bentofile.yaml').read_text())['description']  # the project's own words
    assert spec['info']['version'] == 'model flights-delay v1' and description in spec['info']['description'], spec['info']
    assert 'BentoML' not in spec['info']['description']
    detail = spec['components']['schemas']['InvalidArgument']['properties']['detail']
    r = c.post('/predict', json={'records': []})
    assert r.status_code == 400 and detail['type'] == 'array' and isinstance(r.json()['detail'], list)
    assert set(r.json()['detail'][0]) <= set(detail['items']['properties'])


def _open_fds(h) -> int:
    return worker(h).num_fds()


def test_idle_and_unfinished_connections_are_closed(hostile):
    """100 connections, half silent, half with headers never finished (slow-loris): closed after timeouts.header_s (2)."""
    h = hostile
    fds0 = _open_fds(h)
    socks = [socket.create_connection(('127.0.0.1', h['port'])) for _ in range(100)]
    for s in socks[50:]: s.sendall(b'POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n')
    time.sleep(0.5)
    assert _open_fds(h) >= fds0 + 90
    ready_at_once(h)
    deadline, closed = time.monotonic() + 15, set()
    while len(closed) < len(socks) and time.monotonic() < deadline:
        for i, s in enumerate(socks):
            if i in closed: continue
            s.settimeout(0.05)
            try:
                if s.recv(100) == b'': closed.add(i)
            except socket.timeout: pass
            except OSError: closed.add(i)
    for s in socks: s.close()
    assert len(closed) == len(socks), f'{len(socks) - len(closed)} connections still open'
    time.sleep(0.3)
    assert _open_fds(h) <= fds0 + 5, (fds0, _open_fds(h))
    ready_at_once(h)


def _counts(h) -> dict:
    out = {}
    for line in httpx.get(f"{h['url']}/metrics", timeout=10).text.splitlines():
        if line.startswith('bentoml_service_request_total{') and 'endpoint="/predict"' in line:
            code = re.search(r'http_response_code="(\d+)"', line).group(1)
            out[code] = out.get(code, 0) + float(line.rsplit(' ', 1)[1])
    return out


def test_a_client_that_leaves_mid_request_is_a_client_error(hostile):
    h = hostile
    before = _counts(h)
    for _ in range(3):
        s = socket.create_connection(('127.0.0.1', h['port']))
        s.sendall(b'POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 5000\r\n\r\n{"records": [')
        time.sleep(0.2); s.close()
    time.sleep(0.5)
    after = _counts(h)
    diff = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    assert diff.get('499') == 3 and not any(k.startswith('5') and v for k, v in diff.items()), diff
    log = h['log'].read_text()
    assert not re.search(r'status=5\d\d', log), log[-3000:]
    ready_at_once(h)


def test_killed_worker_loses_no_answered_prediction(hostile):
    """400 requests at concurrency 8, SIGKILL of the worker after 150 answers: every answered request_id is in the log
    (recovered from the journal when the worker restarts), each record once."""
    h = hostile
    recs, url = h['recs'], h['url']
    answered: dict[str, int] = {}; lock = threading.Lock(); victim = worker(h)
    c = httpx.Client(base_url=url, timeout=30, limits=httpx.Limits(max_connections=8))

    def one(i: int) -> None:
        body = {'records': recs[i % 37:i % 37 + 1 + i % 3]}
        try: r = c.post('/predict', json=body)
        except httpx.HTTPError: return
        if r.status_code == 200:
            with lock: answered[r.json()[0]['request_id']] = len(r.json())

    def killer() -> None:
        while len(answered) < 150: time.sleep(0.005)
        os.kill(victim.pid, signal.SIGKILL)
    t0 = time.monotonic()
    k = threading.Thread(target=killer); k.start()
    with ThreadPoolExecutor(8) as ex: list(ex.map(one, range(400)))
    k.join(); t1 = time.monotonic()
    assert not victim.is_running() and len(answered) >= 150
    wait_ready(url, h['proc'], 120, h['log'])  # the arbiter restarts the worker, which recovers the journal
    print(f'load {t1 - t0:.1f}s, ready again {time.monotonic() - t1:.1f}s later, {len(answered)} answered')
    folder = h['root']/'build/serving/predictions'
    from nbs_lib.data import DataSpec
    spec = DataSpec.from_params(yaml.safe_load((h['root']/'params.yaml').read_text()))
    deadline = time.monotonic() + 30
    while True:
        log = read_prediction_log(folder, spec)
        log = log[~log['shadow'] & log['request_id'].isin(answered)]
        missing = set(answered) - set(log['request_id'])
        if not missing or time.monotonic() > deadline: break
        time.sleep(0.5)
    assert not missing, f'{len(missing)} of {len(answered)} answered requests missing from the prediction log'
    per = log.groupby('request_id').size()
    assert all(per[r] == n for r, n in answered.items()), 'a record logged twice or partly'
