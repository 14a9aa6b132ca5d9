"""The MLflow UI as `make mlflow-ui` starts it (one worker, no GenAI job runners) against `mlflow ui` with MLflow's
defaults (4 workers, job runners on: what the Makefile ran before), on the same built sample project, in the same run.

    python bench/bench_ui.py [--repeats 3] [--frac 0.03] [--settle 20]    (make bench-ui)

For each start, alternating the two: the seconds from the command to the first answer of the UI's own runs search
(what the page asks first), then, `--settle` seconds after the start, the processes of its session, their resident
memory summed, and the CPU they used. Writes bench/results-ui.md.
"""
from __future__ import annotations
import argparse, json, os, shutil, signal, statistics, subprocess, sys, time, urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent/'tests'))
from conftest import BIN, env_for  # noqa: E402
from servers import free_port  # noqa: E402
from bench_noop import MAKE, built_clone  # noqa: E402

TICK = os.sysconf('SC_CLK_TCK')


def session(sid: int) -> tuple[int, float, float]:
    """(processes, resident MB summed, CPU seconds) of the processes alive in session `sid`."""
    n, rss, cpu = 0, 0, 0.0
    for p in Path('/proc').iterdir():
        try:
            if not p.name.isdigit(): continue
            f = (p/'stat').read_text().rsplit(')', 1)[1].split()
            if int(f[3]) != sid: continue
            n += 1; cpu += (int(f[11]) + int(f[12])) / TICK
            rss += next(int(l.split()[1]) for l in (p/'status').read_text().splitlines() if l.startswith('VmRSS'))
        except (OSError, StopIteration, ValueError, IndexError): pass  # gone meanwhile, or a kernel thread
    return n, rss / 1024, cpu


def start(cmd: list[str], root: Path, port: int, exp: str, settle: float) -> tuple[float, int, float, float]:
    """(seconds to the first runs-search answer, processes, MB, CPU s at `settle` seconds) of one UI start."""
    req = urllib.request.Request(f'http://127.0.0.1:{port}/ajax-api/2.0/mlflow/runs/search', method='POST',
                                 data=json.dumps({'experiment_ids': [exp]}).encode(), headers={'Content-Type': 'application/json'})
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, cwd=root, env=env_for(root), start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while True:
            if p.poll() is not None or time.perf_counter() - t0 > 120: raise SystemExit(f"{' '.join(cmd)} did not answer (exit {p.poll()})")
            try:
                with urllib.request.urlopen(req, timeout=10) as r:
                    if json.loads(r.read())['runs']: break
            except OSError: time.sleep(0.05)
        ready = time.perf_counter() - t0
        time.sleep(max(0.0, settle - (time.perf_counter() - t0)))
        return (ready, *session(p.pid))
    finally:
        os.killpg(p.pid, signal.SIGTERM)
        try: p.wait(30)
        except subprocess.TimeoutExpired: os.killpg(p.pid, signal.SIGKILL); p.wait()
        time.sleep(1)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--repeats', type=int, default=3)
    ap.add_argument('--frac', type=float, default=0.03)
    ap.add_argument('--settle', type=float, default=20.0, help='seconds after the start at which processes and memory are read')
    ap.add_argument('--out', default=str(HERE/'results-ui.md'))
    a = ap.parse_args(argv)
    tmp, root = built_clone(a.frac, 'nbs-bench-ui-')
    from mlflow.tracking import MlflowClient
    run_id = json.loads((root/'build/train/run.json').read_text())['run_id']
    exp = MlflowClient(f"sqlite:///{root/'mlflow.db'}").get_run(run_id).info.experiment_id
    starts = {'ours': lambda port: [*MAKE, 'mlflow-ui', f'UI_PORT={port}'],
              'default': lambda port: [str(BIN/'mlflow'), 'ui', '--backend-store-uri', f"sqlite:///{root/'mlflow.db'}", '--port', str(port)]}
    got = {k: [] for k in starts}
    for i in range(a.repeats):
        for k, cmd in starts.items():
            port = free_port()
            got[k].append(start(cmd(port), root, port, exp, a.settle))
            print(k, 'ready %.2f s, %d processes, %.0f MB, %.1f CPU s' % got[k][-1], flush=True)
    med = {k: [statistics.median(x[c] for x in v) for c in range(4)] for k, v in got.items()}
    base = '`mlflow ui` with MLflow\'s defaults (4 workers, GenAI job runners)'
    rows = []
    for n, (what, fmt) in enumerate([('the UI answers its first runs search, from the command', '{:.2f} s'),
                                     (f'processes, {a.settle:.0f} s after the start', '{:.0f}'),
                                     (f'resident memory of those processes, {a.settle:.0f} s after the start', '{:,.0f} MB'),
                                     (f'CPU they used in those {a.settle:.0f} s', '{:.1f} s')]):
        m, b = med['ours'][n], med['default'][n]
        rows.append(f"| 7{'abcd'[n]}. `make mlflow-ui`: {what} | {fmt.format(m)} | {fmt.format(b)} ({base}) | {m / b:.2f}x |")
    head = '| figure | measured | baseline (same run) | ratio |\n|---|---|---|---|\n'
    note = (f"\nMedians of {a.repeats} starts of each, alternating, on a project built on a {a.frac} sample, by "
            f"`python bench/bench_ui.py --repeats {a.repeats} --frac {a.frac} --settle {a.settle:g}` on {os.cpu_count()} cores, "
            f"{time.strftime('%Y-%m-%d %H:%M')} UTC, load average {os.getloadavg()[0]:.1f} at the end.\n")
    table = head + '\n'.join(rows) + '\n'
    Path(a.out).write_text('# MLflow UI benchmark\n\n' + table + note)
    print('\n' + table + note + f'written to {a.out}')
    shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == '__main__':
    sys.exit(main())
