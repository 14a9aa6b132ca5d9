"""Benchmark of `nbs sweep`: per-configuration overhead over the same training code run as a plain Python call,
measured in the same run, and the parallel efficiency of --jobs 2 against --jobs 1.

    .venv/bin/python bench/bench_sweep.py [--configs 4] [--repeats 3] [--keep DIR]

A project copy on the 3% sample is built once. Then, per repeat, for N configurations of identical cost (the grid
varies `train.seed`, which the default model does not use without early stopping), each in a fresh process:
  plain      one Python process that execs the code cells of 03_train and 04_evaluate for each configuration, with
             the parameters the sweep injects: the same training code, no notebook machinery, no sweep
  jobs 1     `nbs sweep --jobs 1`: ploomber-engine in one worker process
  jobs 2     `nbs sweep --jobs 2`: two worker processes
  papermill  `nbs sweep --engine papermill --jobs 1`: a kernel per notebook (1 configuration, first repeat only)
  CLI        `papermill <notebook> out.ipynb -f params.yaml`, one process per notebook (the same, for reference)
Every configuration is new (new seeds): nothing is skipped. Two overheads are reported: of a whole command over the
plain process (fixed start-up costs included, spread over N), and per configuration inside them (the time of a
configuration as the sweep's worker measures it, against the same in the plain process; the first, cold
configuration of each process left out). Times are medians over the repeats; the table goes to stdout and
bench/results-sweep.md. The evaluation's permutation importance runs on 1000 rows (params.yaml: 4000) everywhere.
"""
from __future__ import annotations
import argparse, contextlib, csv, io, json, os, platform, re, shutil, statistics, subprocess, sys, tempfile, time
from pathlib import Path
import yaml

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
BIN = Path(sys.executable).parent
FILES = ['params.yaml', 'pipeline.yaml', 'pyproject.toml', 'requirements.lock', 'notebooks', 'nbs_lib', 'data/raw']
OFFLINE = {'MLFLOW_DISABLE_TELEMETRY': 'true', 'BENTOML_DO_NOT_TRACK': 'true', 'DVC_NO_ANALYTICS': '1', 'DO_NOT_TRACK': '1',
           'PLOOMBER_VERSION_CHECK_DISABLED': '1', 'PLOOMBER_STATS_ENABLED': 'false', 'PLOOMBER_ENV_FILENAME': 'params.yaml'}


def env_for(root: Path) -> dict:
    env = {**os.environ, **OFFLINE, 'PYTHONPATH': str(root)}
    env.pop('MLFLOW_TRACKING_URI', None); env.pop('NBS_ROOT', None)
    return env


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
    subprocess.run([str(BIN/'nbs'), 'build'], cwd=dst, env=env_for(dst), check=True, capture_output=True)
    return dst


def plain_tasks(root: Path, seeds: list[int], kind: str) -> list[dict]:
    """The sweep's own tasks for these seeds (same parameters), writing elsewhere and not under a sweep run."""
    from nbs_lib.config import check_params, load_params
    from nbs_lib.sweep import check_sweep, make_task, plan
    p = check_params(load_params(root/'params.yaml')); check_sweep(p)
    pl = plan(root, p, {'seed': seeds}, 'ploomber-engine')
    tasks = []
    for c in pl['configs']:
        old, c['dir'] = str(pl['folder']/c['config_id']), root/'build/bench'/kind/c['config_id']
        c['product'] = {t: {k: v.replace(old, str(c['dir'])) for k, v in prod.items()} for t, prod in c['product'].items()}
        t = make_task(pl, c, root, '', '', '', None)
        t['notebooks'][0]['parameters'].update(parent_run_id=None, run_tags={'nbs.kind': f'bench-{kind}'})
        tasks.append(t)
    return tasks


def notebook_code(path: str) -> str:
    """The code cells of a task notebook but its parameters cell: the notebook as a plain script."""
    cells = json.loads(Path(path).read_text())['cells']
    src = lambda c: ''.join(c['source']) if isinstance(c['source'], list) else c['source']
    return '\n\n'.join(src(c) for c in cells if c['cell_type'] == 'code' and 'parameters' not in c['metadata'].get('tags', []))


def plain_process(tasks_file: str) -> None:
    """Run in a fresh process: each task's two notebooks as plain code, in order; prints the seconds of each."""
    import matplotlib.pyplot as plt
    times = []
    for task in json.loads(Path(tasks_file).read_text()):
        t0 = time.perf_counter()
        for nb in task['notebooks']:
            Path(nb['output']).parent.mkdir(parents=True, exist_ok=True)
            ns = dict(nb['parameters'], resources_=None, __name__='__main__')
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):  # as the sweep does
                exec(compile(notebook_code(nb['source']), nb['source'], 'exec'), ns)
        plt.close('all'); times.append(time.perf_counter() - t0)
    print(json.dumps(times))


def timed(cmd: list[str], root: Path) -> tuple[float, str]:
    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=root, env=env_for(root), capture_output=True, text=True)
    if r.returncode: sys.exit(f"{' '.join(cmd)} failed:\n{r.stderr[-3000:]}")
    return time.perf_counter() - t0, r.stdout


def plain(root: Path, seeds: list[int], tmp: Path) -> tuple[float, list[float]]:
    f = tmp/f'plain-{seeds[0]}.json'; f.write_text(json.dumps(plain_tasks(root, seeds, 'plain'), default=str))
    wall, out = timed([sys.executable, __file__, '--plain-process', str(f)], root)
    return wall, json.loads(out.strip().splitlines()[-1])


def sweep(root: Path, seeds: list[int], *args: str) -> tuple[float, list[float], float]:
    """`nbs sweep` over these seeds: (wall s, seconds of each configuration, s after the sweep's set-up)."""
    wall, out = timed([str(BIN/'nbs'), 'sweep', '--set', 'seed=' + ','.join(map(str, seeds)), '--no-progress', *args], root)
    m = re.search(r'^sweep (\w+): .* in ([\d.]+)s \(([\d.]+)s of it set-up\)', out, re.M)
    rows = list(csv.DictReader((root/'build/sweep'/m.group(1)/'results.csv').open()))
    assert len(rows) == len(seeds) and all(r['status'] == 'ran' for r in rows), rows
    return wall, [float(r['seconds']) for r in rows], float(m.group(2)) - float(m.group(3))


def cli(root: Path, seeds: list[int]) -> float:
    """`papermill nb out -f params.yaml` for both notebooks of each configuration; seconds per configuration."""
    t0 = time.perf_counter()
    for task in plain_tasks(root, seeds, 'cli'):
        for nb in task['notebooks']:
            Path(nb['output']).parent.mkdir(parents=True, exist_ok=True)
            pf = Path(nb['output']).with_suffix('.params.yaml'); pf.write_text(yaml.safe_dump(json.loads(json.dumps(nb['parameters'], default=str))))
            timed([str(BIN/'papermill'), nb['source'], nb['output'], '-f', str(pf), '--no-progress-bar'], root)
    return (time.perf_counter() - t0)/len(seeds)


def warm(times: list[float]) -> float:
    """Median seconds of a configuration, the first (cold: imports) left out."""
    return statistics.median(times[1:] if len(times) > 1 else times)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--configs', type=int, default=4, help='configurations per measurement')
    ap.add_argument('--repeats', type=int, default=3)
    ap.add_argument('--keep', help='build the project copy here and keep it')
    ap.add_argument('--plain-process', help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.plain_process: plain_process(a.plain_process); return 0
    os.environ.update(OFFLINE); os.environ.pop('MLFLOW_TRACKING_URI', None)
    tmp = Path(a.keep) if a.keep else Path(tempfile.mkdtemp(prefix='bench-sweep-'))
    load0 = os.getloadavg(); t = time.perf_counter()
    root = make_project(tmp/'proj') if not (tmp/'proj/build/features/test.parquet').exists() else tmp/'proj'
    print(f"project copy ready in {time.perf_counter()-t:.0f}s: {root}", file=sys.stderr)
    sys.path.insert(0, str(root)); os.environ['NBS_ROOT'] = str(root)
    n, seed = a.configs, iter(range(int(time.time()) % 100000 * 100, 10**9))
    seeds = lambda k: [next(seed) for _ in range(k)]
    res = {k: [] for k in ('plain', 'plain_cfg', 'jobs1', 'jobs1_cfg', 'jobs1_run', 'jobs2', 'jobs2_run', 'papermill', 'papermill_cfg', 'cli')}
    for r in range(a.repeats):
        print(f"repeat {r+1}/{a.repeats}", file=sys.stderr)
        w, c = plain(root, seeds(n), tmp); res['plain'].append(w); res['plain_cfg'].append(warm(c))
        w, c, run = sweep(root, seeds(n), '--jobs', '1'); res['jobs1'].append(w); res['jobs1_cfg'].append(warm(c)); res['jobs1_run'].append(run)
        w, _, run = sweep(root, seeds(n), '--jobs', '2'); res['jobs2'].append(w); res['jobs2_run'].append(run)
        if r == 0:  # papermill, for reference: a kernel per notebook, so every configuration is as slow as the first
            w, c, _ = sweep(root, seeds(1), '--jobs', '1', '--engine', 'papermill')
            res['papermill'].append(w); res['papermill_cfg'].append(c[0]); res['cli'].append(cli(root, seeds(1)))
    m = {k: statistics.median(v) for k, v in res.items()}
    f = lambda v: '' if v is None else f'{v:.2f}'
    rows = [('plain Python process: the notebooks\' code exec\'d, one process for all', m['plain'], m['plain']/n, None, m['plain_cfg'], None),
            ('`nbs sweep --jobs 1` (ploomber-engine, one worker process)', m['jobs1'], m['jobs1']/n, (m['jobs1'] - m['plain'])/n,
             m['jobs1_cfg'], m['jobs1_cfg'] - m['plain_cfg']),
            ('`nbs sweep --jobs 2` (2 forked worker processes)', m['jobs2'], m['jobs2']/n, (m['jobs2'] - m['plain'])/n, None, None),
            ('`nbs sweep --engine papermill --jobs 1` (1 configuration, once)', m['papermill'], m['papermill'],
             None, m['papermill_cfg'], m['papermill_cfg'] - m['plain_cfg']),
            ('naive papermill CLI, a process per notebook (1 configuration, once)', None, m['cli'], None, None, m['cli'] - m['plain_cfg'])]
    test_n = json.loads((root/'build/evaluate/metrics.json').read_text())['test']['n']
    lines = [f"# Sweep benchmark: {n} configurations per sweep, median of {a.repeats} repeats", '',
             f"Machine: {platform.platform()}, {os.cpu_count()} cores, Python {platform.python_version()}; load average "
             f"{load0[0]:.1f} at start, {os.getloadavg()[0]:.1f} at end. Data: 3% sample ({test_n} test rows), default model.", '',
             '| command | wall s | per configuration s | overhead per configuration, whole command s | a configuration inside s | overhead per configuration inside s |',
             '|---|---|---|---|---|---|']
    lines += ['| ' + ' | '.join([name] + [f(v) for v in vals]) + ' |' for name, *vals in rows]
    lines += ['', "Whole command: wall time of the command over the plain process's, divided by the configurations (start-up "
              "costs included: imports, the DAG render, the parent run, worker start). Inside: the median time of one warm "
              "configuration as measured around it (the sweep's worker: both notebooks, their MLflow logging, the attached "
              "notebooks), against the same code as a plain call.", '',
              f"Parallel efficiency, --jobs 2 vs --jobs 1 on {os.cpu_count()} cores: whole commands "
              f"{m['jobs1']/(2*m['jobs2']):.2f} (speed-up {m['jobs1']/m['jobs2']:.2f}x); running the configurations "
              f"(after the set-up, which imports what they use and starts the workers) {m['jobs1_run']/(2*m['jobs2_run']):.2f} (speed-up {m['jobs1_run']/m['jobs2_run']:.2f}x).", '',
              f'Reproduce: `make bench-sweep` (or `.venv/bin/python bench/bench_sweep.py --configs {n} --repeats {a.repeats}`).']
    text = '\n'.join(lines) + '\n'
    print(text); (HERE/'results-sweep.md').write_text(text)
    if not a.keep: shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == '__main__':
    sys.exit(main())
