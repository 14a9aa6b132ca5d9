"""Benchmark of the BentoML service (issue 4): every figure against its baseline, measured in the same run.

    python bench/bench_serving.py [--repeats 5] [--rows 20000] [--frac 0.03]    (or: make bench-serving)

A throw-away copy of the project is built on a sample, its model registered as the champion with the real MLflow
API, imported into a BentoML store of its own and served by `bentoml serve` on 127.0.0.1 (loopback only).
1. batch throughput: /predict_file (a parquet of --rows rows) and /predict (JSON, serve.max_batch rows a request)
   against the champion's in-process predict_proba on the same rows (goal: HTTP >= 0.5x in-process)
2. single-row /predict latency p50/p99 at concurrency 1 and 32 (goal: p99 < 20 ms at concurrency 1)
3. the same with adaptive batching off (serve.batching.enabled: false), on a second server
4. what the journal of answered predictions costs (serve.journal, issue 18): PredictionLog.append per request
   in-process, journal on against off, and single-row /predict latency at concurrency 1 on two servers, on against off
   (`--only journal` runs just these)
Medians of --repeats runs; every loop is bounded. Prints one table and writes bench/results-serving.md.
"""
from __future__ import annotations
import argparse, asyncio, io, json, math, os, platform, statistics, sys, tempfile, time
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--repeats', type=int, default=5)
    ap.add_argument('--rows', type=int, default=20000, help='rows scored in the throughput figures')
    ap.add_argument('--frac', type=float, default=0.03, help='sample of the data the model is trained on')
    ap.add_argument('--requests', type=int, default=640, help='single-row requests per latency figure')
    ap.add_argument('--warmup', type=float, default=8.0, help='seconds of load at each concurrency before it is measured')
    ap.add_argument('--out', help='default: bench/results-serving.md (bench/results-journal.md with --only journal)')
    ap.add_argument('--only', choices=['journal'], help='run only these figures')
    a = ap.parse_args()
    a.out = a.out or str(HERE/('results-journal.md' if a.only else 'results-serving.md'))
    import httpx, mlflow, pandas as pd
    from mlflow.tracking import MlflowClient
    from nbs_lib.scoring import compile_pipeline
    from servers import free_port, json_records, start_server, stop_server, wait_ready
    from nbs_lib.tracking import load_model

    tmp = Path(tempfile.mkdtemp(prefix='nbs-bench-serving-'))
    root = copy_project(tmp/'proj', files=PROJECT_FILES + ['service.py', 'bentofile.yaml'])
    set_params(root, **{'data.sample_frac': a.frac, 'serve.workers': 1})
    home = str(root/'build/bentoml')
    print(f'building the sample project in {root} ...', flush=True)
    nbs(root, 'build')
    mlflow.set_tracking_uri(f"sqlite:///{root/'mlflow.db'}")
    mv = mlflow.register_model(json.loads((root/'build/train/run.json').read_text())['model_uri'], 'flights-delay')
    MlflowClient().set_registered_model_alias('flights-delay', 'champion', mv.version)
    nbs(root, 'serve', 'import', BENTOML_HOME=home, MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR='false')

    from nbs_lib.config import load_params
    from nbs_lib.data import DataSpec
    spec = DataSpec.from_params(load_params(root/'params.yaml'))
    test = pd.read_parquet(root/'build/features/test.parquet').drop(columns=[spec.target])
    X = pd.concat([test] * math.ceil(a.rows / len(test)), ignore_index=True).head(a.rows)
    model = load_model('models:/flights-delay@champion')
    model.predict_proba(X.head(100))
    from threadpoolctl import threadpool_limits
    def inproc():
        with threadpool_limits(1):  # as in the service (OMP_NUM_THREADS=1 per worker)
            t0 = time.perf_counter(); model.predict_proba(X); return a.rows / (time.perf_counter() - t0)
    base = statistics.median(inproc() for _ in range(a.repeats))
    one = X.head(1)
    def inproc_one() -> list[float]:
        out = []
        with threadpool_limits(1):
            for _ in range(a.requests):
                t0 = time.perf_counter(); model.predict_proba(one); out.append((time.perf_counter() - t0) * 1000)
        return out
    single = [inproc_one() for _ in range(a.repeats)]
    one_p50, one_p99 = statistics.median(_pct(s, 0.5) for s in single), statistics.median(_pct(s, 0.99) for s in single)
    fast = compile_pipeline(model)  # what the service runs: the same numbers without pandas (nbs_lib.scoring.Scorer)
    def fast_one() -> list[float]:
        out = []
        with threadpool_limits(1):
            for _ in range(a.requests):
                t0 = time.perf_counter(); fast(one); out.append((time.perf_counter() - t0) * 1000)
        return out
    fast_p50 = statistics.median(_pct(fast_one(), 0.5) for _ in range(a.repeats)) if fast else float('nan')

    buf = io.BytesIO(); X.to_parquet(buf); parquet = buf.getvalue()
    recs = json_records(X); max_batch = 1000
    rows, results = [], {}
    def row(what, value, baseline, base_name, unit, goal=''):
        ratio = f'{value / baseline:.2f}x' if baseline else ''
        rows.append((what, f'{value:,.1f} {unit}', f'{baseline:,.1f} {unit} ({base_name})' if baseline else '', ratio, goal))
        print(' | '.join(rows[-1]), flush=True)

    for batching in (() if a.only else (True, False)):
        set_params(root, **{'serve.batching.enabled': batching, 'serve.max_batch': max_batch})
        port = free_port(); url = f'http://127.0.0.1:{port}'; log = tmp/f'server-{batching}.log'
        proc = start_server(root, port, env_for(root, BENTOML_HOME=home), log)
        try:
            ready = wait_ready(url, proc, 300, log)
            print(f'server (batching {"on" if batching else "off"}) ready in {ready:.1f}s', flush=True)
            with httpx.Client(base_url=url, timeout=300) as c:
                for _ in range(3): c.post('/predict', json={'records': recs[:10]}).raise_for_status()  # warm up
                if batching:
                    def http_file():
                        t0 = time.perf_counter()
                        r = c.post('/predict_file', files={'file': ('rows.parquet', parquet)}); r.raise_for_status()
                        return a.rows / (time.perf_counter() - t0)
                    def http_json():
                        t0 = time.perf_counter()
                        for i in range(0, a.rows, max_batch):
                            c.post('/predict', json={'records': recs[i:i + max_batch]}).raise_for_status()
                        return a.rows / (time.perf_counter() - t0)
                    row(f'1a. batch over HTTP: /predict_file, parquet of {a.rows:,} rows', statistics.median(http_file() for _ in range(a.repeats)),
                        base, 'in-process predict_proba, 1 thread', 'rows/s', '>= 0.5x')
                    row(f'1b. batch over HTTP: /predict, JSON, {max_batch} rows a request', statistics.median(http_json() for _ in range(a.repeats)),
                        base, 'in-process predict_proba, 1 thread', 'rows/s', '>= 0.5x')
            for conc in (1, 32):
                # warm up at this concurrency first: the dispatcher trains on its first ~35 calls, then waits for a batch
                # as long as its recent batches waited (mean of the last 50, refreshed every 5 s), so a change of load
                # takes seconds to settle; the figures are the settled ones
                t0 = time.monotonic()
                for _ in range(200):
                    asyncio.run(_latencies(url, recs[0], conc, conc * 8))
                    if time.monotonic() - t0 > a.warmup: break
                runs = [asyncio.run(_latencies(url, recs[0], conc, a.requests)) for _ in range(a.repeats)]
                p50 = statistics.median(_pct(l, 0.5) for l, _ in runs); p99 = statistics.median(_pct(l, 0.99) for l, _ in runs)
                rps = statistics.median(r for _, r in runs)
                results[(batching, conc)] = (p50, p99, rps)
        finally:
            stop_server(proc)
    for conc in (() if a.only else (1, 32)):
        (p50, p99, rps), (q50, q99, qps) = results[(True, conc)], results[(False, conc)]
        row(f'2. single row, concurrency {conc}, batching on: p50', p50, q50, 'batching off', 'ms')
        row(f'2. single row, concurrency {conc}, batching on: p99', p99, q99, 'batching off', 'ms', '< 20 ms' if conc == 1 else '')
        row(f'2. single row, concurrency {conc}, batching on: throughput', rps, qps, 'batching off', 'req/s')
        if conc == 1:
            row('2. single row, concurrency 1, batching off: p50', q50, one_p50, 'in-process predict_proba of 1 row', 'ms')
            row('2. single row, concurrency 1, batching off: p99', q99, one_p99, 'in-process predict_proba of 1 row', 'ms', '< 20 ms')
            row('2. in-process, 1 row: the service\'s compiled pipeline, p50', fast_p50, one_p50, 'in-process predict_proba of 1 row', 'ms')
    journal_rows(root, home, X, recs, a, row, tmp)
    env = (f'{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at the end, Python {platform.python_version()}, '
           f'1 worker, model trained on a {a.frac} sample, medians of {a.repeats} runs')
    head = '| figure | value | baseline (same run) | ratio | goal |\n|---|---|---|---|---|\n'
    table = head + '\n'.join('| ' + ' | '.join(r) + ' |' for r in rows)
    only = f' --only {a.only}' if a.only else ''
    text = (f'# Serving benchmark\n\n`python bench/bench_serving.py --repeats {a.repeats} --rows {a.rows} --frac {a.frac} '
            f'--requests {a.requests} --warmup {a.warmup}{only}`\n\n{env}\n\n{table}\n')
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
