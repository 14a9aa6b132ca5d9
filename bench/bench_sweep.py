"""Benchmark of `nbs sweep`: per-configuration overhead over the same training code run as a plain Python call,
measured in the same run, and the parallel efficiency of --jobs 2 against --jobs 1.

    .venv/bin/python bench/bench_sweep.py [--configs 4] [--repeats 3] [--keep DIR]

A project copy on the 3% sample is built once; then, per repeat, for N configurations of identical cost (the grid
varies `train.seed`, which the default model does not use without early stopping):
  plain      the code cells of 03_train and 04_evaluate, exec'd in this (warm) process with the parameters the
             sweep injects: the same training code, no notebook machinery, no sweep
  jobs 1     run_sweep(jobs=1): ploomber-engine in this process, with the parent run, hashing, skip lookup, table
  jobs 2     run_sweep(jobs=2): two fresh worker processes (spawn + warm-up imports included)
  papermill  run_sweep(engine='papermill', jobs=1): a kernel per notebook (papermill's Python API), 2 configurations
  CLI        `papermill <notebook> out.ipynb -f params.yaml`, one process per notebook, 2 configurations
The evaluation's permutation importance runs on 1000 rows (params.yaml says 4000) in every mode alike.
Each configuration is a new one (new seeds), so nothing is skipped. Times are medians over the repeats.
The table goes to stdout and bench/results-sweep.md.
"""
from __future__ import annotations
import argparse, contextlib, io, json, os, platform, shutil, statistics, subprocess, sys, tempfile, time
from pathlib import Path
import yaml

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
BIN = Path(sys.executable).parent
FILES = ['params.yaml', 'pipeline.yaml', 'pyproject.toml', 'requirements.lock', 'notebooks', 'nbs_lib', 'data/raw']
OFFLINE = {'MLFLOW_DISABLE_TELEMETRY': 'true', 'BENTOML_DO_NOT_TRACK': 'true', 'DVC_NO_ANALYTICS': '1', 'DO_NOT_TRACK': '1',
           'PLOOMBER_VERSION_CHECK_DISABLED': '1', 'PLOOMBER_STATS_ENABLED': 'false', 'PLOOMBER_ENV_FILENAME': 'params.yaml'}


def make_project(dst: Path) -> Path:
    """A copy of the project on the 3% sample, built (its features are what the sweep trains on)."""
    for f in FILES:
        s = ROOT/f
        if s.is_dir(): shutil.copytree(s, dst/f, ignore=shutil.ignore_patterns('__pycache__', '.ipynb_checkpoints'))
        else: (dst/f).parent.mkdir(parents=True, exist_ok=True); shutil.copy2(s, dst/f)
    p = yaml.safe_load((dst/'params.yaml').read_text())
    p['data']['sample_frac'] = 0.03
    p['sweep']['grid'] = {}  # each measurement sets its own grid (seeds)
    p['evaluate']['importance_rows'] = 1000  # less work per configuration (the same everywhere): the overhead stands out
    (dst/'params.yaml').write_text(yaml.safe_dump(p, sort_keys=False))
    env = {**os.environ, **OFFLINE, 'PYTHONPATH': str(dst)}; env.pop('MLFLOW_TRACKING_URI', None)
    subprocess.run([str(BIN/'nbs'), 'build'], cwd=dst, env=env, check=True, capture_output=True)
    return dst


def notebook_code(path: str) -> str:
    """The code cells of a task notebook but its parameters cell: the notebook as a plain script."""
    cells = json.loads(Path(path).read_text())['cells']
    src = lambda c: ''.join(c['source']) if isinstance(c['source'], list) else c['source']
    return '\n\n'.join(src(c) for c in cells if c['cell_type'] == 'code' and 'parameters' not in c['metadata'].get('tags', []))


def plain_tasks(root: Path, seeds: list[int], kind: str) -> list[dict]:
    """The sweep's own tasks for these seeds (same parameters), writing elsewhere and not under a sweep run."""
    from nbs_lib.config import check_params, load_params
    from nbs_lib.sweep import check_sweep, make_task, plan
    p = check_params(load_params(root/'params.yaml')); check_sweep(p['sweep'])
    pl = plan(root, p, {'seed': seeds}, 'ploomber-engine')
    tasks = []
    for c in pl['configs']:
        c['dir'] = root/'build/bench'/kind/c['config_id']
        old = str(pl['folder']/c['config_id'])
        c['product'] = {t: {k: v.replace(old, str(c['dir'])) for k, v in prod.items()} for t, prod in c['product'].items()}
        t = make_task(pl, c, root, '', '', '', None)
        t['notebooks'][0]['parameters'].update(parent_run_id=None, run_tags={'nbs.kind': f'bench-{kind}'})
        tasks.append(t)
    return tasks


def run_plain(task: dict) -> float:
    """Both notebooks' code exec'd in this process with the task's parameters; seconds."""
    import matplotlib.pyplot as plt
    t0 = time.perf_counter()
    for nb in task['notebooks']:
        Path(nb['output']).parent.mkdir(parents=True, exist_ok=True)
        ns = dict(nb['parameters'], resources_=None, __name__='__main__')
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):  # as the sweep does
            exec(compile(notebook_code(nb['source']), nb['source'], 'exec'), ns)
    plt.close('all')
    return time.perf_counter() - t0


def run_cli(task: dict, root: Path) -> float:
    """`papermill <notebook> <out> -f <params>` for both notebooks, one process each; seconds."""
    t0 = time.perf_counter()
    env = {**os.environ, **OFFLINE, 'PYTHONPATH': str(root)}
    for nb in task['notebooks']:
        Path(nb['output']).parent.mkdir(parents=True, exist_ok=True)
        pf = Path(nb['output']).with_suffix('.params.yaml'); pf.write_text(yaml.safe_dump(nb['parameters']))
        subprocess.run([str(BIN/'papermill'), nb['source'], nb['output'], '-f', str(pf), '--no-progress-bar'],
                       cwd=root, env=env, check=True, capture_output=True)
    return time.perf_counter() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--configs', type=int, default=4, help='configurations per measurement')
    ap.add_argument('--repeats', type=int, default=3)
    ap.add_argument('--keep', help='build the project copy here and keep it')
    a = ap.parse_args(argv)
    os.environ.update(OFFLINE); os.environ.pop('MLFLOW_TRACKING_URI', None)
    tmp = Path(a.keep) if a.keep else Path(tempfile.mkdtemp(prefix='bench-sweep-'))
    load0 = os.getloadavg()
    t = time.perf_counter(); root = make_project(tmp/'proj')
    print(f"project copy built in {time.perf_counter()-t:.0f}s: {root}", file=sys.stderr)
    sys.path.insert(0, str(root)); os.environ['NBS_ROOT'] = str(root); os.chdir(root)
    from nbs_lib.sweep import run_sweep
    n, seed = a.configs, iter(range(1000, 10**6))
    n_pm = min(2, n)  # papermill costs a kernel per notebook: fewer configurations
    seeds = lambda: [next(seed) for _ in range(n)]
    res = {k: [] for k in ('plain', 'jobs1', 'setup1', 'jobs2', 'papermill', 'cli')}
    run_plain(plain_tasks(root, [0], 'warmup')[0])  # imports, caches: the plain call is measured warm
    for r in range(a.repeats):
        print(f"repeat {r+1}/{a.repeats}", file=sys.stderr)
        res['plain'] += [run_plain(t) for t in plain_tasks(root, seeds(), 'plain')]
        s1 = run_sweep(root, {'seed': seeds()}, jobs=1, progress=False)
        res['jobs1'].append(s1['seconds']['total']); res['setup1'].append(s1['seconds']['setup'])
        res['jobs2'].append(run_sweep(root, {'seed': seeds()}, jobs=2, progress=False)['seconds']['total'])
        res['papermill'].append(run_sweep(root, {'seed': seeds()[:n_pm]}, jobs=1, engine='papermill', progress=False)['seconds']['total'])
        res['cli'] += [run_cli(t, root) for t in plain_tasks(root, seeds()[:n_pm], 'cli')]
    med = {k: statistics.median(v) for k, v in res.items()}
    plain = med['plain']
    rows = [('plain Python call (the notebooks\' code, exec\'d in a warm process)', plain, plain, 0.0),
            ('`nbs sweep --jobs 1` (ploomber-engine, in process), whole sweep', med['jobs1'], med['jobs1']/n, med['jobs1']/n - plain),
            ('  of which fixed set-up (checks, DAG render, hashing, parent run)', med['setup1'], None, med['setup1']/n),
            ('  per configuration, set-up excluded', None, (med['jobs1'] - med['setup1'])/n, (med['jobs1'] - med['setup1'])/n - plain),
            ('`nbs sweep --jobs 2` (2 fresh worker processes), whole sweep', med['jobs2'], med['jobs2']/n, None),
            (f'`nbs sweep --engine papermill --jobs 1` (a kernel per notebook; {n_pm} configurations)', med['papermill'], med['papermill']/n_pm, med['papermill']/n_pm - plain),
            ('naive papermill CLI, one process per notebook (`papermill nb out -f params`)', None, med['cli'], med['cli'] - plain)]
    eff = med['jobs1']/(2*med['jobs2'])
    f = lambda v: '' if v is None else f'{v:.2f}'
    lines = [f"# Sweep benchmark ({n} configurations per sweep, median of {a.repeats} repeats)", '',
             f"Machine: {platform.platform()}, {os.cpu_count()} cores, Python {platform.python_version()}; "
             f"load average {load0[0]:.1f} at start, {os.getloadavg()[0]:.1f} at end. Data: 3% sample "
             f"({json.loads((root/'build/evaluate/metrics.json').read_text())['test']['n']} test rows), default model.", '',
             '| measure | wall s | per configuration s | overhead per configuration over plain s |', '|---|---|---|---|']
    lines += [f"| {name} | {f(w)} | {f(pc)} | {f(o)} |" for name, w, pc, o in rows]
    lines += ['', f"Parallel efficiency, --jobs 2 vs --jobs 1 on {os.cpu_count()} cores (whole sweeps, worker start included): "
              f"{eff:.2f} (speed-up {med['jobs1']/med['jobs2']:.2f}x).",
              '', 'Reproduce: `make bench-sweep` (or `.venv/bin/python bench/bench_sweep.py --configs 4 --repeats 3`).']
    text = '\n'.join(lines) + '\n'
    print(text)
    (HERE/'results-sweep.md').write_text(text)
    if not a.keep: shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == '__main__':
    sys.exit(main())
