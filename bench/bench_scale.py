"""Scale benchmark: build time and peak memory of the full pipeline at 1x, 3x and 10x the rows of the raw data.

    python bench/bench_scale.py [--scales 1 3 10] [--out bench/results-scale.md]

In a throw-away git+DVC copy of the project (tests/conftest.py's copy_project), for each k the raw data is replaced
by its k-times extension (bench/scale_data.py: the flights and weather replicated over shifted years), recorded the
way a user records new data (`dvc add`, which rewrites data/raw/*.dvc; 1x restores the committed .dvc files) and
checked by `nbs data` (md5 against the .dvc files). Then, measured: a cold `nbs build --force` (every task runs; the
MLflow store and the OS cache of the code already exist from one `nbs build` at 1x before the first measurement)
and the same steps as one plain Python process (bench_pipeline.PLAIN, tracking on), each with its wall time and peak
RSS summed over its process tree (bench_pipeline.peak_rss). Growth vs 1x = (time at k / time at 1x) / k: at most
about 1.0 when cost grows no faster than linearly. Goals: growth <= linear (1.0 + 0.15 noise), 10x peak < 8192 MB.
"""
from __future__ import annotations
import argparse, os, shutil, subprocess, sys, tempfile, time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE)); sys.path.insert(0, str(HERE.parent/'tests'))
from conftest import BIN, PROJECT_FILES, copy_project, env_for  # noqa: E402
from bench_pipeline import PLAIN, peak_rss, timed  # noqa: E402
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


def _table(res: list[dict]) -> str:
    base = res[0]
    head = ('| scale | flight rows | build s | plain s | ratio | build s per M rows | peak MB | plain peak MB | '
            'growth vs 1x (time) | growth vs 1x (peak) | load avg (1 min) | goal |\n' + '|---' * 12 + '|\n')
    lines = []
    for r in res:
        x = r['rows']/base['rows']
        g_t, g_m = (r['build_s']/base['build_s'])/x, (r['peak_mb']/base['peak_mb'])/x
        goals = [f"growth {g_t:.2f} {'<=' if g_t <= 1 + NOISE else '>'} 1.0 ({'met' if g_t <= 1 + NOISE else 'NOT met'})"]
        if r['k'] == 10 or r is res[-1]:
            goals.append(f"peak {r['peak_mb']:.0f} {'<' if r['peak_mb'] < LIMIT_MB else '>='} {LIMIT_MB} MB "
                         f"({'met' if r['peak_mb'] < LIMIT_MB else 'NOT met'})")
        lines.append(f"| {r['k']}x | {r['rows']:,} | {r['build_s']:.1f} | {r['plain_s']:.1f} | {r['build_s']/r['plain_s']:.2f}x | "
                     f"{r['build_s']/(r['rows']/1e6):.1f} | {r['peak_mb']:.0f} | {r['plain_mb']:.0f} | {g_t:.2f} | {g_m:.2f} | "
                     f"{r['load'][0]:.2f} -> {r['load'][1]:.2f} | {'; '.join(goals)} |")
    return head + '\n'.join(lines) + '\n'


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
        secs, mb = peak_rss([NBS, 'build', '--force'], root)
        psecs, pmb = peak_rss([PY, '-c', PLAIN, 'track'], root)
        res.append(dict(k=k, rows=k*336_776, build_s=secs, peak_mb=mb, plain_s=psecs, plain_mb=pmb, check_s=check_s,
                        load=(load0, os.getloadavg()[0])))
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
                "sampled every 20 ms. Growth vs 1x: (time at k / time at 1x) / k, so 1.0 is linear. The machine is shared: "
                "load average (1 min) before the build -> after the plain run.\n")
        Path(a.out).write_text('# Scale benchmark: build time and peak memory at 1x, 3x, 10x the rows\n\n' + _table(res) + note)
    print('\n' + _table(res))
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == '__main__':
    main()
