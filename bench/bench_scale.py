"""Scale benchmark: build time and peak memory of the full pipeline at 1x, 3x and 10x the rows of the raw data.

    python bench/bench_scale.py [--scales 1 3 10] [--out bench/results-scale.md]

In a throw-away git+DVC copy of the project (tests/conftest.py's copy_project), for each k the raw data is replaced
by its k-times extension (bench/scale_data.py: the flights and weather replicated over shifted years), recorded the
way a user records new data (`dvc add`, which rewrites data/raw/*.dvc; 1x restores the committed .dvc files) and
checked by `nbs data` (md5 against the .dvc files). Then, measured: a cold `nbs build --force` (every task runs; the
MLflow store and the OS cache of the code already exist from one `nbs build` at 1x before the first measurement)
and the same steps as one plain Python process (bench_pipeline.PLAIN, tracking on), each with its wall time, its CPU
time (user + sys of the process and the children it waited for: far less sensitive than wall time to the other jobs of
a shared machine) and peak RSS summed over its process tree (sampled every 20 ms). Each task's own time in the build
(the `ran in` lines of `nbs build`) goes in a second table, to show which step grows faster than the rows.
Growth vs 1x = (time at k / time at 1x) / k: at most about 1.0 when cost grows no faster than linearly.
Goals, in each row: growth <= linear (1.0 + 0.15 noise), on wall and on CPU time; peak < 8192 MB (asked of 10x).
"""
from __future__ import annotations
import argparse, os, re, resource, shutil, subprocess, sys, tempfile, time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE)); sys.path.insert(0, str(HERE.parent/'tests'))
from conftest import BIN, PROJECT_FILES, copy_project, env_for  # noqa: E402
from bench_pipeline import PLAIN, timed  # noqa: E402
from scale_data import FLIGHTS, WEATHER, extend  # noqa: E402

PY, NBS = str(BIN/'python'), str(BIN/'nbs')
NOISE, LIMIT_MB = 0.15, 8192


def _project(tmp: Path) -> Path:
    "A git+DVC copy of the project (its own DVC remote, never pushed to) with the committed raw data verified."
    root = copy_project(tmp/'proj', files=PROJECT_FILES + ['.dvc/config', '.dvc/.gitignore', '.dvcignore', '.gitignore'])
    git = ['git', '-c', 'user.name=bench', '-c', 'user.email=bench@nbs.local']
    for cmd in (git + ['init', '-q'], git + ['add', '-A'], git + ['commit', '-qm', 'bench'],
                [str(BIN/'dvc'), 'remote', 'modify', '--local', 'shared', 'url', str(tmp/'remote')]):
        subprocess.run(cmd, cwd=root, check=True, env=env_for(root), capture_output=True)
    return root


def _use_data(root: Path, orig: Path, k: int) -> float:
    "Put the k-times data in data/raw and record it as a user would; returns the seconds of `nbs data` checking it."
    raw = root/'data'/'raw'
    extend(orig, raw, k)
    if k == 1: subprocess.run(['git', 'checkout', '--', f'data/raw/{FLIGHTS}.dvc', f'data/raw/{WEATHER}.dvc'], cwd=root, check=True)
    else: timed([str(BIN/'dvc'), 'add', '-q', f'data/raw/{FLIGHTS}', f'data/raw/{WEATHER}'], root)
    return timed([NBS, 'data'], root)


def measure(cmd: list[str], root: Path) -> dict:
    "Wall seconds, CPU seconds (user + sys, waited-for children included), peak MB (RSS summed over the process tree) and stdout of a command."
    import psutil
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN); t0 = time.perf_counter()
    with tempfile.TemporaryFile('w+') as out:
        p = subprocess.Popen(cmd, cwd=root, env=env_for(root), stdout=out, stderr=subprocess.PIPE, text=True)
        proc, peak = psutil.Process(p.pid), 0
        while p.poll() is None:
            try: peak = max(peak, sum(q.memory_info().rss for q in [proc, *proc.children(recursive=True)] if q.is_running()))
            except psutil.Error: pass
            time.sleep(0.02)
        wall = time.perf_counter() - t0; ru = resource.getrusage(resource.RUSAGE_CHILDREN)
        if p.returncode: raise SystemExit(f"{cmd} failed: {p.stderr.read()[-3000:]}")
        out.seek(0); text = out.read()
    return {'s': wall, 'cpu': (ru.ru_utime - ru0.ru_utime) + (ru.ru_stime - ru0.ru_stime), 'mb': peak/2**20, 'out': text}


def task_seconds(build_output: str) -> dict[str, float]:
    "Each task's time from the `  name  ran in 12.3s` lines of `nbs build`."
    return {m[1]: float(m[2]) for m in re.finditer(r'^\s+(\S+)\s+ran in ([\d.]+)s\s*$', build_output, re.M)}


def _verdict(g: float) -> str:
    ok = g <= 1 + NOISE
    return f"{g:.2f} {'<=' if ok else '>'} {1 + NOISE:.2f} ({'met' if ok else 'NOT met'})"


def _table(res: list[dict]) -> str:
    base = res[0]
    head = ('| scale | flight rows | build s | build CPU s | plain s | plain CPU s | ratio build/plain | build s per M rows | '
            'peak MB | plain peak MB | growth vs 1x: build wall | build CPU | plain wall | plain CPU | peak | load avg (1 min) | goal |\n'
            + '|---' * 17 + '|\n')
    lines = []
    for r in res:
        x = r['rows']/base['rows']
        g = {k: (r[k]/base[k])/x for k in ('build_s', 'build_cpu', 'plain_s', 'plain_cpu', 'peak_mb')}
        goals = [f"build time growth, wall {_verdict(g['build_s'])}, CPU {_verdict(g['build_cpu'])}",
                 f"peak {r['peak_mb']:.0f} {'<' if r['peak_mb'] < LIMIT_MB else '>='} {LIMIT_MB} MB ({'met' if r['peak_mb'] < LIMIT_MB else 'NOT met'})"]
        lines.append(f"| {r['k']}x | {r['rows']:,} | {r['build_s']:.1f} | {r['build_cpu']:.1f} | {r['plain_s']:.1f} | {r['plain_cpu']:.1f} | "
                     f"{r['build_s']/r['plain_s']:.2f}x | {r['build_s']/(r['rows']/1e6):.1f} | {r['peak_mb']:.0f} | {r['plain_mb']:.0f} | "
                     f"{g['build_s']:.2f} | {g['build_cpu']:.2f} | {g['plain_s']:.2f} | {g['plain_cpu']:.2f} | {g['peak_mb']:.2f} | "
                     f"{r['load'][0]:.2f} -> {r['load'][1]:.2f} | {'; '.join(goals)} |")
    return head + '\n'.join(lines) + '\n'


def _task_table(res: list[dict]) -> str:
    "Seconds of each task of the build at each scale, and its growth vs 1x."
    base, tasks = res[0], list(res[0]['tasks'])
    cols = ['task'] + [f"{r['k']}x s" for r in res] + [f"growth {r['k']}x" for r in res[1:]]
    head = '| ' + ' | '.join(cols) + ' |\n' + '|---' * len(cols) + '|\n'
    rows = []
    for t in tasks:
        g = [f"{(r['tasks'].get(t, float('nan'))/base['tasks'][t])/(r['rows']/base['rows']):.2f}" if base['tasks'][t] else '-' for r in res[1:]]
        rows.append('| ' + ' | '.join([t] + [f"{r['tasks'].get(t, float('nan')):.1f}" for r in res] + g) + ' |')
    return head + '\n'.join(rows) + '\n'


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--scales', type=int, nargs='+', default=[1, 3, 10])
    ap.add_argument('--out', default=str(HERE/'results-scale.md'))
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix='nbs-bench-scale-'))
    root = _project(tmp)
    orig = tmp/'raw-1x'; orig.mkdir()
    for f in (FLIGHTS, WEATHER): shutil.copyfile(root/'data'/'raw'/f, orig/f)
    _use_data(root, orig, 1)
    timed([NBS, 'build'], root)  # creates the MLflow store, warms the OS cache of the code: not measured
    res = []
    for k in a.scales:
        check_s = _use_data(root, orig, k)
        load0 = os.getloadavg()[0]
        b = measure([NBS, 'build', '--force'], root)
        pl = measure([PY, '-c', PLAIN, 'track'], root)
        res.append(dict(k=k, rows=k*336_776, build_s=b['s'], build_cpu=b['cpu'], peak_mb=b['mb'], tasks=task_seconds(b['out']),
                        plain_s=pl['s'], plain_cpu=pl['cpu'], plain_mb=pl['mb'], check_s=check_s, load=(load0, os.getloadavg()[0])))
        print(res[-1], flush=True)
        checks = ', '.join(f"{r['k']}x: {r['check_s']:.1f} s" for r in res)
        note = (f"\nMeasured together by `python bench/bench_scale.py --scales {' '.join(map(str, a.scales))}` (`make bench-scale`) "
                f"on {os.cpu_count()} cores, {time.strftime('%Y-%m-%d %H:%M')}, one run each (a 10x build takes minutes). "
                "The data of each scale is the raw data replicated over shifted years (bench/scale_data.py), recorded with "
                "`dvc add` and checked by `nbs data` before the build "
                f"({checks}; not in the build time). "
                "Build: a cold `nbs build --force` (all 5 tasks, MLflow tracking, executed notebooks and their HTML), after one "
                "unmeasured `nbs build` at 1x that created the MLflow store. Plain: the same steps in one Python process "
                "(bench_pipeline.PLAIN, tracking and the monitor's report included). Peak MB: RSS summed over the process tree, "
                "sampled every 20 ms. CPU s: user + sys of the process and the children it waited for. Growth vs 1x: "
                "(time at k / time at 1x) / k, so 1.0 is linear. The machine is shared: load average (1 min) before the build -> "
                "after the plain run; wall time under load is stretched by the other jobs, CPU time much less.\n")
        Path(a.out).write_text('# Scale benchmark: build time and peak memory at 1x, 3x, 10x the rows\n\n' + _table(res) + note
                               + '\n## Each task of the build (seconds, from `nbs build`; growth vs 1x as above)\n\n' + _task_table(res))
    print('\n' + _table(res) + '\n' + _task_table(res))
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == '__main__':
    main()
