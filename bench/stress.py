"""Stress of the BentoML service (issue 8): bounded load from a second process, then schema-driven fuzzing.

    python bench/stress.py [--seconds 120] [--concurrency 32] [--fuzz-examples 1000] [--fuzz-seconds 60]    (or: make stress)

A throw-away copy of the project is built on a sample, its model registered as the champion with the real MLflow
API (as tests/test_serving.py does), imported into a project-local BentoML store and served by `bentoml serve` on
127.0.0.1 with the project's own serve: parameters. This process is the client:
1. load: --concurrency async clients post single-row and small-batch (2 to 10 rows) /predict requests for --seconds
   (at most --max-requests in all); every non-2xx answer or exception is an error. Latency p50/p99, and the RSS of
   the server's process tree (psutil) after warm-up, each second of the load and at the end: growth over the second
   half of the load above --max-growth (5%) is a failure, memory that keeps climbing being a leak.
2. fuzz: `st run` (schemathesis) generates requests from the service's own OpenAPI schema (/docs.json) for
   /predict and /predict_file, --fuzz-examples per operation and phase, repeated for --fuzz-seconds; requests and 5xx are counted from the
   server's own Prometheus /metrics, so nothing the fuzzer sent escapes the count. The server must still be ready.
3. hostile: the reproducers of issue 18 at their original sizes (a parquet of 50 million identical rows, 1,000 records
   of 1,000 unknown keys, an oversized body, a list column, a 245-character file name, a file sent as a URL string,
   500 idle and 500 half-sent connections, clients that leave mid-request, SIGKILL of the worker under load), each
   with its answer, the worker's peak RSS during it (sampled every 50 ms) and after it, and the slowest /readyz
   answer during it (polled every 100 ms). `--hostile-only` skips 1 and 2.
Prints a table, writes bench/results-stress.md; exits 1 on any load error, any 5xx, unbounded memory growth, an
unexpected answer to a hostile case, a lost prediction, or a server that is not up.
"""
from __future__ import annotations
import argparse, asyncio, json, os, platform, random, re, subprocess, sys, tempfile, threading, time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent/'tests'))
from conftest import BIN, PROJECT_FILES, copy_project, nbs, set_params  # noqa: E402
from test_serving import _env, _register  # noqa: E402


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs); return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))] if xs else float('nan')


def tree_rss(pid: int) -> int:
    """Resident memory (bytes) of a process and all its descendants."""
    import psutil
    p = psutil.Process(pid); total = 0
    for q in [p, *p.children(recursive=True)]:
        try: total += q.memory_info().rss
        except psutil.NoSuchProcess: pass
    return total


def http_counts(url: str) -> dict[tuple[str, str], float]:
    """{(endpoint, status code): requests} from the server's Prometheus /metrics (summed over workers)."""
    import httpx
    out: dict[tuple[str, str], float] = {}
    for line in httpx.get(f'{url}/metrics', timeout=30).text.splitlines():
        if not line.startswith('bentoml_service_request_total{'): continue
        labels = dict(re.findall(r'(\w+)="([^"]*)"', line))
        key = (labels.get('endpoint', ''), labels.get('http_response_code', ''))
        out[key] = out.get(key, 0) + float(line.rsplit(' ', 1)[1])
    return out


async def load(url: str, recs: list[dict], seconds: float, concurrency: int, max_requests: int, seed: int) -> dict:
    """Single-row (4 in 5) and 2-10-row /predict requests from `concurrency` clients until `seconds` or `max_requests`."""
    import httpx
    rnd = random.Random(seed)
    bodies = [json.dumps({'records': [r]}).encode() for r in recs[:200]]
    bodies += [json.dumps({'records': recs[i:i + rnd.randint(2, 10)]}).encode() for i in range(0, 500, 10)]
    lat: list[float] = []; errors: list[str] = []; sent = 0
    deadline = time.monotonic() + seconds
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=httpx.Limits(max_connections=concurrency)) as c:
        async def client(k: int):
            nonlocal sent
            r_ = random.Random(seed + k)
            while time.monotonic() < deadline and sent < max_requests:
                sent += 1
                body = bodies[r_.randrange(200)] if r_.random() < 0.8 else bodies[200 + r_.randrange(len(bodies) - 200)]
                t0 = time.perf_counter()
                try:
                    r = await c.post('/predict', content=body, headers={'content-type': 'application/json'})
                    if not 200 <= r.status_code < 300: errors.append(f'HTTP {r.status_code}: {r.text[:200]}')
                except Exception as e:  # a refused, reset or timed-out connection is an error too
                    errors.append(f'{type(e).__name__}: {e}')
                lat.append((time.perf_counter() - t0) * 1000)
        t0 = time.perf_counter()
        await asyncio.gather(*(client(k) for k in range(concurrency)))
        wall = time.perf_counter() - t0
    return {'requests': len(lat), 'errors': errors, 'p50': _pct(lat, 0.5), 'p99': _pct(lat, 0.99), 'rps': len(lat) / wall}


def openapi_31(url: str) -> dict:
    """The service's OpenAPI schema, labelled 3.1.0: BentoML 1.4 says 3.0.2 but writes pydantic 2's JSON Schema of
    OpenAPI 3.1 (`{"type": "null"}` in anyOf, a numeric exclusiveMinimum), which schemathesis cannot generate from as 3.0."""
    import httpx
    spec = httpx.get(f'{url}/docs.json', timeout=30).json()
    return {**spec, 'openapi': '3.1.0'}


def fuzz(url: str, examples: int, seconds: float, seed: int, out: Path) -> tuple[int, int, str]:
    """`st run` on the service's OpenAPI schema against /predict and /predict_file: (requests, 5xx, st's summary)."""
    out.mkdir(parents=True, exist_ok=True)
    (out/'openapi.json').write_text(json.dumps(openapi_31(url)))
    before = http_counts(url)
    cmd = [str(BIN/'st'), 'run', str(out/'openapi.json'), '--url', url, '--include-path-regex', '^/predict', '--max-examples', str(examples), '--max-time', str(int(seconds)),
           '--seed', str(seed), '--checks', 'not_a_server_error', '--workers', '2', '--request-timeout', '60',
           '--generation-database', 'none', '--report', 'junit', '--report-dir', str(out), '--warnings', 'off']
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=3600, cwd=out, env={**os.environ, 'NO_COLOR': '1'})
    after = http_counts(url)
    diff = {k: after.get(k, 0) - before.get(k, 0) for k in after if k[0].startswith('/predict')}
    total = int(sum(diff.values())); fivexx = int(sum(v for (_, code), v in diff.items() if code.startswith('5')))
    (out/'st-run.log').write_text(p.stdout + p.stderr)
    summary = '\n'.join(l for l in p.stdout.splitlines() if re.search(r'passed|failed|error|Test cases|Operations|cases', l, re.I))
    if p.returncode not in (0, 1): summary += f'\nst run exited {p.returncode}:\n{p.stderr[-2000:]}'
    return total, fivexx, summary


def worker_pid(pid: int) -> int:
    """The pid of the (first) BentoML worker under the server process `pid`."""
    import psutil
    for _ in range(600):
        for q in psutil.Process(pid).children(recursive=True):
            try:
                if any('_bentoml_impl.worker.service' in x for x in q.cmdline()): return q.pid
            except psutil.NoSuchProcess: pass
        time.sleep(0.1)
    raise RuntimeError('no worker process')


class Watch:
    """While a case runs: the worker's RSS every 50 ms (peak) and /readyz every 100 ms (slowest answer, failures)."""
    def __init__(self, url: str, server_pid: int):
        self.url, self.server_pid, self.peak, self.worst, self.unready = url, server_pid, 0, 0.0, 0
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=f, daemon=True) for f in (self._mem, self._ready)]

    def _mem(self):
        import psutil
        while not self._stop.wait(0.05):
            try: self.peak = max(self.peak, psutil.Process(worker_pid(self.server_pid)).memory_info().rss)
            except (psutil.NoSuchProcess, RuntimeError): pass

    def _ready(self):
        import httpx
        while not self._stop.wait(0.1):
            t0 = time.perf_counter()
            try: ok = httpx.get(f'{self.url}/readyz', timeout=5).status_code == 200
            except httpx.HTTPError: ok = False
            self.worst = max(self.worst, time.perf_counter() - t0); self.unready += not ok

    def __enter__(self):
        for t in self._threads: t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        for t in self._threads: t.join()
        import httpx  # and once more right after the case, so a case shorter than a poll is measured too
        t0 = time.perf_counter()
        try: self.unready += httpx.get(f'{self.url}/readyz', timeout=5).status_code != 200
        except httpx.HTTPError: self.unready += 1
        self.worst = max(self.worst, time.perf_counter() - t0)


def _hostile_cases(url: str, port: int, recs: list[dict], tmp: Path, loris: int, kill_requests: int) -> list[tuple]:
    """(name, what is sent, expected, function returning (ok, what came back)) for each reproducer of issue 18."""
    import io, socket
    import httpx
    import numpy as np
    import pandas as pd
    c = httpx.Client(base_url=url, timeout=120)
    one = pd.DataFrame([recs[0]])
    def parquet(df) -> bytes:
        b = io.BytesIO(); df.to_parquet(b); return b.getvalue()
    block = one.loc[np.zeros(1_000_000, dtype=np.int32)].reset_index(drop=True)
    def many(n: int) -> bytes:  # n identical rows, a million at a time: the client never holds them all
        import pyarrow as pa, pyarrow.parquet as pq
        t, b = pa.Table.from_pandas(block, preserve_index=False), io.BytesIO()
        with pq.ParquetWriter(b, t.schema) as w:
            for _ in range(n // len(block)): w.write_table(t)
        return b.getvalue()
    def post_file(body: bytes, name: str = 'rows.parquet', want: int = 400):
        r = c.post('/predict_file', files={'file': (name, body)})
        return r.status_code == want, f'{r.status_code} {r.text[:90]}'
    def junk(n_keys: int):
        body = {'records': [{**recs[0], **{f'unknown_{i:04d}': i for i in range(n_keys)}} if n_keys else {} for _ in range(1000)]}
        r = c.post('/predict', json=body)
        d = r.json() if r.status_code == 400 else {}
        return r.status_code == 400 and len(r.content) < 20_000, f"{r.status_code}, {len(r.content):,} bytes, error_count {d.get('error_count')}"
    def big_body():
        r = c.post('/predict', content=b' ' * (65 * 2**20), headers={'content-type': 'application/json'})
        return r.status_code == 413, f'{r.status_code} {r.text[:90]}'
    def as_string():
        r = c.post('/predict_file', files={'file': (None, 'http://127.0.0.1:9/x.parquet')})
        return r.status_code == 400, f'{r.status_code} {r.text[:90]}'
    def slow_loris():
        socks = [socket.create_connection(('127.0.0.1', port)) for _ in range(2 * loris)]
        for s in socks[loris:]: s.sendall(b'POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\n')
        t0, open_ = time.monotonic(), set(range(len(socks)))
        while open_ and time.monotonic() - t0 < 60:
            for i in list(open_):
                socks[i].settimeout(0.01)
                try:
                    if socks[i].recv(10) == b'': open_.discard(i)
                except socket.timeout: pass
                except OSError: open_.discard(i)
        for s in socks: s.close()
        return not open_, f'{len(socks) - len(open_)} of {len(socks)} closed by the server in {time.monotonic() - t0:.0f} s'
    def aborts():
        before = http_counts(url)
        for _ in range(20):
            s = socket.create_connection(('127.0.0.1', port))
            s.sendall(b'POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 9000\r\n\r\n{"records": [')
            s.close()
        time.sleep(1)
        d = {k[1]: v - before.get(k, 0) for k, v in http_counts(url).items() if k[0] == '/predict' and v - before.get(k, 0)}
        return d.get('499') == 20 and not any(k.startswith('5') for k in d), f'counted by status: {d}'
    return [
        ('parquet of 50M identical rows', f'{len(f50 := many(50_000_000)) / 2**20:.1f} MB', '400 at once', lambda: post_file(f50)),
        ('parquet of 10M identical rows', f'{len(f10 := many(10_000_000)) / 2**10:.0f} KB', '400 at once', lambda: post_file(f10)),
        ('1,000 records x 1,000 unknown keys', '8.5 MB JSON', '400, < 20 KB', lambda: junk(1000)),
        ('1,000 empty records', 'JSON', '400, < 20 KB', lambda: junk(0)),
        ('body over serve.max_body_mb', '65 MiB', '413', big_body),
        ('parquet column of lists', 'distance = [1.0, 2.0]', '400', lambda: post_file(parquet(one.assign(distance=[[1.0, 2.0]])))),
        ('upload file name of 245 characters', 'CSV', '400', lambda: post_file(one.to_csv(index=False).encode(), 'x' * 241 + '.csv')),
        ('file as a plain form string', 'file=http://...', '400, never fetched', as_string),
        (f'{loris} idle + {loris} half-sent connections', 'slow-loris', 'all closed', slow_loris),
        ('20 clients leave mid-body', 'Content-Length 9000, 13 bytes sent', 'counted 499, no 5xx', aborts),
    ]


def kill_under_load(url: str, server_pid: int, recs: list[dict], root: Path, requests: int) -> tuple[bool, str]:
    """`requests` /predict at concurrency 8, SIGKILL of the worker after a third of them: answered request ids missing from the log."""
    import signal
    from concurrent.futures import ThreadPoolExecutor
    import httpx
    from nbs_lib.predlog import read_prediction_log
    from nbs_lib.config import load_params
    from nbs_lib.data import DataSpec
    spec = DataSpec.from_params(load_params(root/'params.yaml'))
    answered: dict[str, int] = {}; victim = worker_pid(server_pid)
    c = httpx.Client(base_url=url, timeout=60, limits=httpx.Limits(max_connections=8))
    def one(i: int) -> None:
        try: r = c.post('/predict', json={'records': recs[i % 97:i % 97 + 1 + i % 3]})
        except httpx.HTTPError: return
        if r.status_code == 200: answered[r.json()[0]['request_id']] = len(r.json())
    def killer() -> None:
        while len(answered) < requests // 3: time.sleep(0.002)
        os.kill(victim, signal.SIGKILL)
    k = threading.Thread(target=killer); k.start()
    with ThreadPoolExecutor(8) as ex: list(ex.map(one, range(requests)))
    k.join()
    for _ in range(1200):  # the arbiter restarts the worker, which recovers the journal first
        try:
            if httpx.get(f'{url}/readyz', timeout=2).status_code == 200: break
        except httpx.HTTPError: pass
        time.sleep(0.1)
    deadline = time.monotonic() + 60
    while True:
        log = read_prediction_log(root/'build/serving/predictions', spec)
        missing = set(answered) - set(log['request_id'])
        if not missing or time.monotonic() > deadline: break
        time.sleep(0.5)
    return not missing, f'{len(answered):,} answered, {len(missing)} missing from the prediction log'


def hostile(url: str, port: int, server_pid: int, recs: list[dict], root: Path, tmp: Path, loris: int, kill_requests: int, row) -> list[str]:
    """Run each hostile case under a Watch; a row per case; the failures."""
    import psutil
    failed = []
    cases = _hostile_cases(url, port, recs, tmp, loris, kill_requests)
    cases.append((f'SIGKILL of the worker under load ({kill_requests:,} requests, concurrency 8)', '', 'none lost',
                  lambda: kill_under_load(url, server_pid, recs, root, kill_requests)))
    for name, sent, want, run in cases:
        before = psutil.Process(worker_pid(server_pid)).memory_info().rss
        with Watch(url, server_pid) as w:
            t0 = time.perf_counter(); ok, got = run(); took = time.perf_counter() - t0
        time.sleep(0.5)
        after = psutil.Process(worker_pid(server_pid)).memory_info().rss
        row(f'hostile: {name} ({sent}; expected {want})' if sent else f'hostile: {name} (expected {want})',
            f"{'ok' if ok else 'FAILED'}: {got}; {took:.1f} s; worker RSS {before / 2**20:,.0f} MiB before, peak {max(w.peak, before) / 2**20:,.0f}, "
            f"after {after / 2**20:,.0f}; slowest /readyz {w.worst * 1000:,.0f} ms{f', {w.unready} not ready' if w.unready else ''}")
        if not ok: failed.append(f'hostile case {name!r}: {got}')
    return failed


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--seconds', type=float, default=120, help='duration of the load (the server warms up for about 90 s at concurrency 32)')
    ap.add_argument('--concurrency', type=int, default=32, help='concurrent clients of the load')
    ap.add_argument('--max-requests', type=int, default=200_000, help='bound on the load requests')
    ap.add_argument('--fuzz-examples', type=int, default=1000, help='schemathesis examples per operation and phase (0: no fuzzing)')
    ap.add_argument('--fuzz-seconds', type=float, default=60, help='time budget of the fuzzing (st run --max-time): it repeats until spent')
    ap.add_argument('--frac', type=float, default=0.03, help='sample of the data the model is trained on')
    ap.add_argument('--seed', type=int, default=0)
    ap.add_argument('--max-growth', type=float, default=0.05, help='bound on RSS growth over the second half of the load, a fraction')
    ap.add_argument('--loris', type=int, default=500, help='idle connections, and as many half-sent ones, in the slow-loris case')
    ap.add_argument('--kill-requests', type=int, default=2000, help='/predict requests of the kill-under-load case')
    ap.add_argument('--hostile-only', action='store_true', help='only the hostile cases (no load, no fuzzing)')
    ap.add_argument('--out', default=str(HERE/'results-stress.md'))
    a = ap.parse_args()
    import pandas as pd
    from servers import free_port, json_records, start_server, stop_server, wait_ready

    tmp = Path(tempfile.mkdtemp(prefix='nbs-stress-'))
    root = copy_project(tmp/'proj', files=PROJECT_FILES + ['service.py', 'bentofile.yaml'])
    set_params(root, **{'data.sample_frac': a.frac})
    print(f'building the sample project in {root} ...', flush=True)
    nbs(root, 'build')
    _register(root)
    nbs(root, 'serve', 'import', BENTOML_HOME=str(root/'build/bentoml'), MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR='false')
    from nbs_lib.config import load_params
    from nbs_lib.data import DataSpec
    target = DataSpec.from_params(load_params(root/'params.yaml')).target
    recs = json_records(pd.read_parquet(root/'build/features/test.parquet').drop(columns=[target]).sample(600, random_state=a.seed))

    port = free_port(); url = f'http://127.0.0.1:{port}'; log = root/'server.log'
    proc = start_server(root, port, _env(root), log)
    rows: list[tuple[str, str]] = []; failed: list[str] = []
    def row(what: str, value: str) -> None:
        rows.append((what, value)); print(f'{what}: {value}', flush=True)
    try:
        print(f'server ready in {wait_ready(url, proc, 300, log):.1f}s', flush=True)
        import httpx
        for i in range(20): httpx.post(f'{url}/predict', json={'records': recs[i:i + 5]}, timeout=60).raise_for_status()
        if a.hostile_only: raise _Hostile
        rss0 = tree_rss(proc.pid)
        samples: list[tuple[float, int]] = []; stop = threading.Event(); t_load = time.monotonic()
        def sample() -> None:  # the server's RSS each second of the load: growth must level off, not climb to the end
            while not stop.wait(1.0): samples.append((time.monotonic() - t_load, tree_rss(proc.pid)))
        sampler = threading.Thread(target=sample, daemon=True); sampler.start()
        res = asyncio.run(load(url, recs, a.seconds, a.concurrency, a.max_requests, a.seed))
        stop.set(); sampler.join()
        rss1 = tree_rss(proc.pid)
        half = [r for t, r in samples if t <= a.seconds / 2] or [rss0]
        rss_half, rss_peak = half[-1], max([r for _, r in samples] + [rss1])
        row(f'load: /predict requests ({a.seconds:g} s, concurrency {a.concurrency}, 1 to 10 rows)', f"{res['requests']:,}")
        row('load: errors (non-2xx or exception)', str(len(res['errors'])))
        row('load: throughput', f"{res['rps']:,.1f} req/s")
        row('load: latency p50', f"{res['p50']:.1f} ms")
        row('load: latency p99', f"{res['p99']:.1f} ms")
        row('server RSS (process tree) after warm-up', f'{rss0 / 2**20:,.1f} MiB')
        row('server RSS (process tree) after the load', f'{rss1 / 2**20:,.1f} MiB')
        row('server RSS growth', f'{(rss1 - rss0) / 2**20:+,.1f} MiB ({(rss1 - rss0) / rss0:+.1%})')
        row(f'server RSS growth over the second half of the load (from {rss_half / 2**20:,.1f} MiB at {a.seconds / 2:g} s)',
            f'{(rss1 - rss_half) / 2**20:+,.1f} MiB ({(rss1 - rss_half) / rss_half:+.1%}); peak {rss_peak / 2**20:,.1f} MiB')
        step = max(1, len(samples) // 12)
        row('server RSS during the load (s: MiB)', ', '.join(f'{t:.0f}: {r / 2**20:,.0f}' for t, r in samples[step - 1::step]))
        if rss1 - rss_half > a.max_growth * rss_half:
            failed.append(f'server RSS still growing: {(rss1 - rss_half) / rss_half:+.1%} over the second half of the load (bound --max-growth {a.max_growth:.0%})')
        if res['errors']: failed.append(f"{len(res['errors'])} load errors, first: {res['errors'][:3]}")
        if a.fuzz_examples:
            t0 = time.monotonic()
            n, n5, summary = fuzz(url, a.fuzz_examples, a.fuzz_seconds, a.seed, tmp/'fuzz')
            row(f'fuzz: requests to /predict, /predict_file (st run, --max-examples {a.fuzz_examples} --max-time {a.fuzz_seconds:g})', f'{n:,} in {time.monotonic() - t0:.0f} s')
            row('fuzz: 5xx answers', str(n5))
            print(summary, flush=True)
            if n5:
                kinds = sorted(set(re.findall(r'^starlette\.exceptions\.HTTPException: .*$', log.read_text(), re.M)))
                failed.append(f'{n5} 5xx answers to fuzzing ({"; ".join(kinds[:5])}): see {tmp}/fuzz/st-run.log and {log}')
        raise _Hostile
    except _Hostile:
        import resource
        resource.setrlimit(resource.RLIMIT_NOFILE, (resource.getrlimit(resource.RLIMIT_NOFILE)[1],) * 2)
        failed += hostile(url, port, proc.pid, recs, root, tmp, a.loris, a.kill_requests, row)
        up = httpx.get(f'{url}/readyz', timeout=30).status_code == 200 and proc.poll() is None
        row('server ready at the end', 'yes' if up else 'NO')
        if not up: failed.append('server not ready at the end')
    finally:
        stop_server(proc)
    env = (f'{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at the end, Python {platform.python_version()}, '
           f'serve: parameters of params.yaml ({_workers(root)} worker), model trained on a {a.frac} sample')
    table = '| figure | value |\n|---|---|\n' + '\n'.join(f'| {w} | {v} |' for w, v in rows)
    text = (f'# Stress of the service\n\n`python bench/stress.py --seconds {a.seconds:g} --concurrency {a.concurrency} '
            f'--fuzz-examples {a.fuzz_examples} --fuzz-seconds {a.fuzz_seconds:g} --loris {a.loris} --kill-requests {a.kill_requests}'
            f'{" --hostile-only" if a.hostile_only else ""}`\n\n{env}\n\n{table}\n')
    Path(a.out).write_text(text)
    print('\n' + table + f'\n\n{env}\nwritten to {a.out}')
    for f in failed: print(f'error: {f}', file=sys.stderr)
    return 1 if failed else 0


class _Hostile(Exception):
    """Go on to the hostile cases."""


def _workers(root: Path) -> int:
    import yaml
    return yaml.safe_load((root/'params.yaml').read_text())['serve']['workers']


if __name__ == '__main__':
    sys.exit(main())
