"""Benchmark of the BentoML service (issues 4 and 17): every figure against its baseline, measured in the same run.

    python bench/bench_serving.py [--repeats 3] [--rows 20000] [--frac 0.03] [--seconds 10]    (or: make bench-serving)

A throw-away copy of the project is built on a sample, its model registered as the champion with the real MLflow
API, imported into a BentoML store of its own and served by `bentoml serve` on 127.0.0.1 (loopback only).
1. batch throughput: /predict_file (a parquet of --rows rows) and /predict (JSON, serve.max_batch rows a request)
   against the champion's in-process predict_proba on the same rows at once (goal: HTTP >= 0.5x in-process); as a
   reference, /predict against predict_proba called on the same 1000-row batches
2. the service against its limit (issue 17), single-row /predict under load from `wrk`, an outside load client
   (Debian: apt-get install wrk; without it these rows are skipped, said in the output and the results): the
   baseline is a bare Starlette endpoint that scores the same model with the same runtime and does nothing else
   (bench/bare_scorer.py, started here); goals: throughput at 64 connections >= 0.5x the bare endpoint's, p50 at 1
   connection <= 2x, p99 at 64 connections < 100 ms; BentoML's own API path (serve.hot_path: false) as a reference;
   serve.workers: 2 against 1 at 64 connections
3. (`--only journal`) what the journal of answered predictions costs (serve.journal, issue 18): PredictionLog.append per
   request in-process, journal on against off, and single-row /predict latency at concurrency 1 on two servers
Medians of --repeats runs (wrk: --repeats rounds of --seconds after a warm-up, every server in turn in each round);
every loop is bounded. Prints one table and writes bench/results-serving.md (load average at the start of each wrk
row: the machine may be shared).
"""
from __future__ import annotations
import argparse, asyncio, io, json, math, os, platform, re, shutil, statistics, subprocess, sys, tempfile, time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent/'tests'))
from conftest import PROJECT_FILES, copy_project, env_for, nbs, set_params  # noqa: E402


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs); return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


async def _latencies(url: str, rec: dict, concurrency: int, total: int) -> tuple[list[float], float]:
    """`total` single-row requests from `concurrency` clients; (latencies in ms, requests per second)."""
    import httpx
    lat: list[float] = []
    body = json.dumps({'records': [rec]}).encode()
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=httpx.Limits(max_connections=concurrency)) as c:
        async def worker(n: int):
            for _ in range(n):
                t0 = time.perf_counter()
                r = await c.post('/predict', content=body, headers={'content-type': 'application/json'})
                lat.append((time.perf_counter() - t0) * 1000)
                if r.status_code != 200: raise SystemExit(f'/predict answered {r.status_code}: {r.text[:300]}')
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(total // concurrency) for _ in range(concurrency)))
        return lat, len(lat) / (time.perf_counter() - t0)


_UNIT = {'us': 1e-3, 'ms': 1.0, 's': 1e3}

def _ms(text: str) -> float:
    v, unit = re.fullmatch(r'([\d.]+)(us|ms|s)', text).groups(); return float(v) * _UNIT[unit]

def wrk(url: str, body: bytes, connections: int, seconds: float, tmp: Path) -> dict:
    """`wrk` POSTing `body` to url/predict from `connections` connections for `seconds`: req/s, p50 and p99 in ms, load average.
    SystemExit when any answer is not a 2xx or a socket errs (a figure of failed requests means nothing)."""
    script = tmp/'post.lua'
    script.write_text('wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\n'
                      f'wrk.body = {json.dumps(body.decode())}\n')
    load = os.getloadavg()[0]
    out = subprocess.run(['wrk', '-t', str(min(2, connections)), '-c', str(connections), '-d', f'{seconds:g}s', '--latency', '--timeout', '10s',
                          '-s', str(script), f'{url}/predict'], capture_output=True, text=True, timeout=seconds + 60).stdout
    if 'Non-2xx' in out or 'Socket errors' in out: raise SystemExit(f'wrk: failed requests against {url}:\n{out}')
    pct = dict(re.findall(r'^\s+(50|99)%\s+(\S+)$', out, re.M))
    if len(pct) < 2 or 'Requests/sec' not in out: raise SystemExit(f'wrk: no latency figures from {url}:\n{out}')
    return {'rps': float(re.search(r'Requests/sec:\s+([\d.]+)', out).group(1)), 'p50': _ms(pct['50']), 'p99': _ms(pct['99']), 'load': load}


def _server(root: Path, home: str, tmp: Path, name: str, **params):
    """`bentoml serve` of the project with `params` set; (url, process). Stop it with servers.stop_server."""
    from servers import free_port, start_server, wait_ready
    set_params(root, **params)
    port = free_port(); url = f'http://127.0.0.1:{port}'; log = tmp/f'server-{name}.log'
    proc = start_server(root, port, env_for(root, BENTOML_HOME=home), log)
    print(f'{name}: ready in {wait_ready(url, proc, 300, log):.1f}s', flush=True)
    return url, proc


def _bare(root: Path, home: str, tmp: Path, threshold: float):
    """The baseline endpoint (bench/bare_scorer.py) under uvicorn, 1 process, scoring the champion in the BentoML store."""
    from servers import free_port, wait_ready
    import bentoml
    from nbs_lib.serving import bento_model_name
    os.environ['BENTOML_HOME'] = home
    model_dir = bentoml.models.get(f"{bento_model_name('flights-delay', 'champion')}:latest").path_of('mlflow_model')
    port = free_port(); url = f'http://127.0.0.1:{port}'; log = tmp/'server-bare.log'
    env = env_for(root, BARE_MODEL=str(model_dir), BARE_THRESHOLD=str(threshold), PYTHONPATH=f'{root}{os.pathsep}{HERE}')
    proc = subprocess.Popen([str(Path(sys.executable).parent/'uvicorn'), 'bare_scorer:app', '--host', '127.0.0.1', '--port', str(port),
                             '--no-access-log', '--log-level', 'warning'], cwd=HERE, env=env, stdout=open(log, 'w'),
                            stderr=subprocess.STDOUT, start_new_session=True)
    print(f'bare Starlette endpoint: ready in {wait_ready(url, proc, 120, log):.1f}s', flush=True)
    return url, proc


def limit_rows(root: Path, home: str, recs: list[dict], a, row, tmp: Path, threshold: float) -> None:
    """Figure 2: single-row /predict under wrk, the service against the bare endpoint, BentoML's own path and 2 workers."""
    from servers import stop_server
    if shutil.which('wrk') is None:
        msg = 'wrk not found (Debian: apt-get install wrk): the rows of figure 2 (the service against its limit) are skipped'
        print(msg, flush=True); row(f'2. skipped: {msg}', float('nan'), 0, '', ''); return
    one = json.dumps({'records': [recs[0]]}).encode()
    warm = min(3.0, a.seconds)
    # all four up at once, measured in turn at each load: a figure and its baseline minutes apart on a shared machine
    # would compare two different loads
    procs, urls = [], {}
    try:
        for name, params in (('service', {'serve.workers': 1, 'serve.hot_path': True}), ('bentoml-path', {'serve.workers': 1, 'serve.hot_path': False}),
                             ('service-2-workers', {'serve.workers': 2, 'serve.hot_path': True})):
            urls[name], proc = _server(root, home, tmp, name, **params); procs.append(proc)
        urls['bare'], proc = _bare(root, home, tmp, threshold); procs.append(proc)
        urls = {n: urls[n] for n in ('service', 'bare', 'bentoml-path', 'service-2-workers')}  # the service and its baseline back to back
        for url in urls.values(): wrk(url, one, 64, warm, tmp)  # warm up: first calls, connection set-up
        # --repeats rounds, each server in turn in each: a figure is the median of its rounds (one 10 s sample of the
        # bare endpoint moved by 30% between quiet runs); a second's pause before each, for the last one's log to flush
        rounds = []
        def load64(url):
            time.sleep(1.0); return wrk(url, one, 64, a.seconds, tmp)
        for _ in range(a.repeats):
            r = {name: {'c64': load64(url)} for name, url in urls.items()}
            for name in ('service', 'bare', 'bentoml-path'): r[name]['c1'] = wrk(urls[name], one, 1, a.seconds / 2, tmp)
            rounds.append(r)
            print(f'round {len(rounds)}: ' + ', '.join(f"{n} {v['c64']['rps']:,.0f} req/s" for n, v in r.items()), flush=True)
    finally:
        for proc in procs: stop_server(proc)
    runs = {name: {c: {k: statistics.median(r[name][c][k] for r in rounds) for k in rounds[0][name][c]} for c in rounds[0][name]}
            for name in rounds[0]}
    set_params(root, **{'serve.workers': 1, 'serve.hot_path': True})
    s, b, o, w = runs['service'], runs['bare'], runs['bentoml-path'], runs['service-2-workers']
    la = lambda *rs: 'load ' + '/'.join(f"{r['load']:.1f}" for r in rs)
    row('2a. single row, 64 connections: throughput', s['c64']['rps'], b['c64']['rps'], 'bare Starlette endpoint, same runtime', 'req/s', '>= 0.5x',
        la(s['c64'], b['c64']))
    row('2b. single row, 1 connection: p50', s['c1']['p50'], b['c1']['p50'], 'bare Starlette endpoint, same runtime', 'ms', '<= 2x', la(s['c1'], b['c1']))
    row('2c. single row, 64 connections: p99', s['c64']['p99'], b['c64']['p99'], 'bare Starlette endpoint, same runtime', 'ms', '< 100 ms', la(s['c64'], b['c64']))
    row('2d. single row, 1 connection: p99', s['c1']['p99'], b['c1']['p99'], 'bare Starlette endpoint, same runtime', 'ms', '', la(s['c1'], b['c1']))
    row('2e. reference: 64 connections, throughput, the hot path', s['c64']['rps'], o['c64']['rps'], "BentoML's own API path (serve.hot_path: false)", 'req/s',
        '', la(s['c64'], o['c64']))
    row('2f. reference: 1 connection, p50, the hot path', s['c1']['p50'], o['c1']['p50'], "BentoML's own API path (serve.hot_path: false)", 'ms', '',
        la(s['c1'], o['c1']))
    row('2g. serve.workers 2: 64 connections, throughput', w['c64']['rps'], s['c64']['rps'], 'serve.workers 1', 'req/s', f'reported ({os.cpu_count()} cores)',
        la(w['c64'], s['c64']))
    row('2h. serve.workers 2: 64 connections, p99', w['c64']['p99'], s['c64']['p99'], 'serve.workers 1', 'ms', '< 100 ms', la(w['c64'], s['c64']))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--repeats', type=int, default=3)
    ap.add_argument('--rows', type=int, default=20000, help='rows scored in the throughput figures')
    ap.add_argument('--frac', type=float, default=0.03, help='sample of the data the model is trained on')
    ap.add_argument('--seconds', type=float, default=10.0, help='seconds of wrk load at 64 connections (half that at 1)')
    ap.add_argument('--requests', type=int, default=640, help='single-row requests per latency figure of --only journal')
    ap.add_argument('--out', help='default: bench/results-serving.md (bench/results-journal.md with --only journal)')
    ap.add_argument('--only', choices=['1', '2', 'journal'], help='run only these figures (1: batch throughput, 2: the limit rows)')
    ap.add_argument('--project', help='the throw-away project copy: built there when it is not yet (default: a new temporary one); '
                    "reuse one to compare code (its nbs_lib and service.py are refreshed from this checkout)")
    a = ap.parse_args()
    a.out = a.out or str(HERE/('results-journal.md' if a.only == 'journal' else 'results-serving.md'))
    import httpx, mlflow, pandas as pd
    from mlflow.tracking import MlflowClient
    from servers import json_records, stop_server
    from nbs_lib.tracking import load_model

    tmp = Path(tempfile.mkdtemp(prefix='nbs-bench-serving-'))
    root = Path(a.project) if a.project else tmp/'proj'
    home = str(root/'build/bentoml')
    mlflow.set_tracking_uri(f"sqlite:///{root/'mlflow.db'}")
    if (root/'build/bentoml/models').is_dir():  # built by an earlier run: this checkout's code, the same model
        for f in ('nbs_lib', 'service.py'):
            shutil.rmtree(root/f, ignore_errors=True) if (root/f).is_dir() else (root/f).unlink(missing_ok=True)
        copy_project(root, files=['nbs_lib', 'service.py'])
        print(f'reusing the sample project in {root}', flush=True)
    else:
        copy_project(root, files=PROJECT_FILES + ['service.py', 'bentofile.yaml'])
        set_params(root, **{'data.sample_frac': a.frac, 'serve.workers': 1, 'serve.max_batch': 1000})
        print(f'building the sample project in {root} ...', flush=True)
        nbs(root, 'build')
        mv = mlflow.register_model(json.loads((root/'build/train/run.json').read_text())['model_uri'], 'flights-delay')
        MlflowClient().set_registered_model_alias('flights-delay', 'champion', mv.version)
        nbs(root, 'serve', 'import', BENTOML_HOME=home, MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR='false')

    from nbs_lib.config import load_params
    from nbs_lib.data import DataSpec
    from nbs_lib.serving import serve_params
    # every figure starts from this checkout's serve: defaults (a reused project holds what the last run left: --only
    # journal ends with serve.journal false, which would have measured rows 1 and 2 without the journal)
    d = load_params(HERE.parent/'params.yaml')['serve']
    set_params(root, **{'serve.journal': d['journal'], 'serve.batching.enabled': d['batching']['enabled'], 'serve.hot_path': d['hot_path'],
                        'serve.cors_origins': d.get('cors_origins', [])})
    p = load_params(root/'params.yaml'); spec = DataSpec.from_params(p); threshold = serve_params(p)['threshold']
    test = pd.read_parquet(root/'build/features/test.parquet').drop(columns=[spec.target])
    X = pd.concat([test] * math.ceil(a.rows / len(test)), ignore_index=True).head(a.rows)
    recs = json_records(X); max_batch = 1000
    rows = []
    def row(what, value, baseline, base_name, unit, goal='', load=''):
        ratio = f'{value / baseline:.2f}x' if baseline else ''
        rows.append((what, f'{value:,.1f} {unit}' if unit else '', f'{baseline:,.1f} {unit} ({base_name})' if baseline else '', ratio, goal, load))
        print(' | '.join(rows[-1]), flush=True)

    if a.only == 'journal': journal_rows(root, home, X, recs, a, row, tmp)
    elif a.only == '2': limit_rows(root, home, recs, a, row, tmp, threshold)
    else:
        model = load_model('models:/flights-delay@champion')
        model.predict_proba(X.head(100))
        from threadpoolctl import threadpool_limits
        def inproc():
            with threadpool_limits(1):  # as in the service (OMP_NUM_THREADS=1 per worker)
                t0 = time.perf_counter(); model.predict_proba(X); return a.rows / (time.perf_counter() - t0)
        def inproc_batches():  # the same model on the JSON figure's batches: what calling it yourself, 1000 rows at a time, gives
            with threadpool_limits(1):
                t0 = time.perf_counter()
                for i in range(0, a.rows, max_batch): model.predict_proba(X.iloc[i:i + max_batch])
                return a.rows / (time.perf_counter() - t0)
        buf = io.BytesIO(); X.to_parquet(buf); parquet = buf.getvalue()
        url, proc = _server(root, home, tmp, 'service (batch figures)')
        try:
            with httpx.Client(base_url=url, timeout=300) as c:
                for _ in range(3): c.post('/predict', json={'records': recs[:max_batch]}).raise_for_status()  # warm up
                def http_file():
                    t0 = time.perf_counter()
                    r = c.post('/predict_file', files={'file': ('rows.parquet', parquet)}); r.raise_for_status()
                    return a.rows / (time.perf_counter() - t0)
                bodies = [json.dumps({'records': recs[i:i + max_batch]}).encode() for i in range(0, a.rows, max_batch)]
                def http_json():
                    t0 = time.perf_counter()
                    for b in bodies: c.post('/predict', content=b, headers={'content-type': 'application/json'}).raise_for_status()
                    return a.rows / (time.perf_counter() - t0)
                load = f'load {os.getloadavg()[0]:.1f}'
                # interleaved, so that baseline and HTTP figures see the same load on a shared machine
                runs = [(inproc(), http_file(), http_json(), inproc_batches()) for _ in range(a.repeats)]
                base = statistics.median(r[0] for r in runs)
                row(f'1a. batch over HTTP: /predict_file, parquet of {a.rows:,} rows', statistics.median(r[1] for r in runs),
                    base, 'in-process predict_proba, 1 thread', 'rows/s', '>= 0.5x', load)
                row(f'1b. batch over HTTP: /predict, JSON, {max_batch} rows a request', statistics.median(r[2] for r in runs),
                    base, 'in-process predict_proba, 1 thread', 'rows/s', '>= 0.5x', load)
                row(f'1c. reference: /predict, JSON, {max_batch} rows a request', statistics.median(r[2] for r in runs),
                    statistics.median(r[3] for r in runs), f'in-process predict_proba, {max_batch} rows a call, 1 thread', 'rows/s', '', load)
        finally:
            stop_server(proc)
        if a.only is None: limit_rows(root, home, recs, a, row, tmp, threshold)
    env = (f'{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at the end, Python {platform.python_version()}, '
           f'1 worker unless said, model trained on a {a.frac} sample, medians of {a.repeats} runs, wrk {a.seconds:g} s at 64 connections, '
           f'{a.seconds / 2:g} s at 1')
    head = '| figure | value | baseline (same run) | ratio | goal | load average (value/baseline) |\n|---|---|---|---|---|---|\n'
    table = head + '\n'.join('| ' + ' | '.join(r) + ' |' for r in rows)
    only = f' --only {a.only}' if a.only else ''
    text = (f'# Serving benchmark\n\n`python bench/bench_serving.py --repeats {a.repeats} --rows {a.rows} --frac {a.frac} '
            f'--seconds {a.seconds:g}{only}`\n\n{env}\n\n{table}\n')
    Path(a.out).write_text(text)
    print('\n' + table + f'\n\n{env}\nwritten to {a.out}')


def journal_rows(root: Path, home: str, X, recs: list[dict], a, row, tmp: Path) -> None:
    """Figure 4: the journal's cost per request, in-process (PredictionLog.append) and over HTTP, on against off."""
    import numpy as np
    from nbs_lib.config import load_params
    from nbs_lib.data import DataSpec
    spec = DataSpec.from_params(load_params(root/'params.yaml'))
    from nbs_lib.predlog import PredictionLog
    from nbs_lib.schema import check_frame
    from servers import free_port, start_server, stop_server, wait_ready
    n = max(a.requests, 200)
    for rows in (1, 10, 1000):
        Xr = check_frame(X.head(rows), spec); p = np.full(rows, 0.25); rid = ['r' * 32] * rows; now = [time.time()] * rows
        def per_append(journal: bool) -> float:
            d = Path(tempfile.mkdtemp(dir=tmp))
            log = PredictionLog(d, spec, flush_rows=10**9, flush_seconds=3600, journal=journal)
            try:
                for _ in range(20): log.append(Xr, p, p >= 0.3, '1', rid, now)  # warm
                t0 = time.perf_counter()
                for _ in range(n): log.append(Xr, p, p >= 0.3, '1', rid, now)
                return (time.perf_counter() - t0) / n * 1e6
            finally: log.close()
        on = statistics.median(per_append(True) for _ in range(a.repeats))
        off = statistics.median(per_append(False) for _ in range(a.repeats))
        row(f'4a. journal: PredictionLog.append of a {rows}-row request, journal on', on, off, 'journal off', 'us')
    lat = {}
    for journal in (True, False):
        set_params(root, **{'serve.batching.enabled': True, 'serve.journal': journal})
        port = free_port(); url = f'http://127.0.0.1:{port}'; log = tmp/f'server-journal-{journal}.log'
        proc = start_server(root, port, env_for(root, BENTOML_HOME=home), log)
        try:
            wait_ready(url, proc, 300, log)
            asyncio.run(_latencies(url, recs[0], 1, 100))  # warm
            runs = [asyncio.run(_latencies(url, recs[0], 1, a.requests)) for _ in range(a.repeats)]
            lat[journal] = (statistics.median(_pct(l, 0.5) for l, _ in runs), statistics.median(statistics.mean(l) for l, _ in runs))
        finally:
            stop_server(proc)
    row('4b. journal: single row over HTTP, concurrency 1, p50, journal on', lat[True][0], lat[False][0], 'journal off', 'ms')
    row('4b. journal: single row over HTTP, concurrency 1, mean, journal on', lat[True][1], lat[False][1], 'journal off', 'ms')


if __name__ == '__main__':
    main()
