"""Where the time of a cold `nbs build --force` goes, per task: a profile of the real build (issue 7).

    python bench/profile_build.py [--frac 0.03] [--cprofile DIR] [--json] [PROJECT]

Runs `nbs_lib.cli.build(force=True)` in a project (default: a fresh copy on a sample, built once to warm the
OS cache and create the MLflow store) with timers wrapped around the steps of the build, and prints per task: its
wall time in Ploomber's executor, the notebook's own cells (from the timestamps ploomber-engine writes in the
executed notebook), and the rest split by step (notebook execution machinery, HTML export, on_finish hook,
metadata). Ploomber's Serial executor runs notebook tasks in the build's own process (it forks only for Python
callables), so every task starts from the build's warm-up. Not counted: what the process pays at exit (IPython's
atexit of each task's shell, interpreter teardown). With --cprofile DIR, each task and the whole build also dump a
cProfile (DIR/<task>.prof, DIR/parent.prof; read them with pstats).
"""
from __future__ import annotations
import argparse, functools, json, os, sys, tempfile, time
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
LOG = None  # path of the JSON-lines log (appended to by every process, should a task run in one of its own)
CURRENT = {'task': None}


def _record(label: str, seconds: float) -> None:
    with open(LOG, 'a') as f:
        f.write(json.dumps({'pid': os.getpid(), 'task': CURRENT['task'], 'label': label, 's': seconds}) + '\n')


def _wrap(owner, attr: str, label: str) -> None:
    fn = getattr(owner, attr)
    @functools.wraps(fn)
    def timed(*a, **k):
        t0 = time.perf_counter()
        try: return fn(*a, **k)
        finally: _record(label, time.perf_counter() - t0)
    setattr(owner, attr, timed)


def _instrument(cprofile_dir: str | None) -> None:
    import nbs_lib.cli as cli, nbs_lib.tracking as trk
    import ploomber.dag.dag as dagmod, ploomber.spec as spec, ploomber.executors.serial as serial
    import ploomber.tasks.abc as tabc, ploomber.tasks.notebook as tnb, ploomber.products.metadata as meta
    _wrap(cli, '_warm_up', 'parent: warm-up imports')
    _wrap(trk, 'close_open_runs', 'parent: close open runs')
    _wrap(spec.DAGSpec, 'to_dag', 'parent: DAGSpec.to_dag')
    _wrap(dagmod.DAG, 'render', 'parent: DAG.render')
    _wrap(cli, 'fingerprint', 'parent: fingerprint')
    # one task as the executor runs it (in this process for notebooks; Ploomber forks only for callables)
    orig_sub = serial.build_in_subprocess
    def build_in_subprocess(task, build_kwargs, reports_all):
        CURRENT['task'] = task.name
        t0 = time.perf_counter()
        try: return orig_sub(task, build_kwargs, reports_all)
        finally: _record('task: wall in the executor', time.perf_counter() - t0); CURRENT['task'] = None
    serial.build_in_subprocess = build_in_subprocess
    # inside the task
    orig_build = tabc.Task._build
    def _build(self, *a, **k):
        CURRENT['task'] = self.name
        prof = None
        if cprofile_dir:
            import cProfile; prof = cProfile.Profile(); prof.enable()
        t0 = time.perf_counter()
        try: return orig_build(self, *a, **k)
        finally:
            _record('task: Task._build', time.perf_counter() - t0)
            if prof: prof.disable(); prof.dump_stats(str(Path(cprofile_dir)/f'{self.name}.prof'))
    tabc.Task._build = _build
    _wrap(tnb.pe, 'execute_notebook', 'in task: ploomber-engine execute_notebook')
    _wrap(tnb.NotebookConverter, 'convert', 'in task: HTML export (nbconvert)')
    _wrap(tnb.NotebookRunner, 'run', 'in task: NotebookRunner.run')
    _wrap(tabc.Task, '_run_on_finish', 'in task: on_finish hook')
    _wrap(tabc.Task, '_post_run_actions', 'in task: post-run (hook + metadata + product check)')
    _wrap(meta.Metadata, 'update', 'in task: metadata update/save')


def cell_seconds(executed_nb: Path) -> float:
    "Sum of the cells' run times, from the timestamps ploomber-engine writes into the executed notebook."
    nb = json.loads(executed_nb.read_text())
    total = 0.0
    for c in nb['cells']:
        pl = c.get('metadata', {}).get('ploomber', {})
        if 'timestamp_start' in pl and 'timestamp_end' in pl: total += pl['timestamp_end'] - pl['timestamp_start']
    return total


def main() -> None:
    global LOG
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('project', nargs='?', help='a built project copy (default: a fresh one on a sample)')
    ap.add_argument('--frac', type=float, default=0.03)
    ap.add_argument('--cprofile', help='dump a cProfile of the parent and of each task process here')
    ap.add_argument('--json', action='store_true', help='also print the figures as one JSON line, last')
    a = ap.parse_args()
    if a.project: root = Path(a.project).resolve()
    else:
        sys.path.insert(0, str(HERE.parent/'tests'))
        import subprocess
        from conftest import BIN, copy_project, env_for, set_params
        root = copy_project(Path(tempfile.mkdtemp(prefix='nbs-prof-'))/'proj'); set_params(root, **{'data.sample_frac': a.frac})
        subprocess.run([str(BIN/'nbs'), 'build'], cwd=root, env=env_for(root), check=True, capture_output=True)
    sys.path.insert(0, str(root)); os.environ['PYTHONPATH'] = str(root); os.chdir(root)
    for m in [m for m in sys.modules if m == 'nbs_lib' or m.startswith('nbs_lib.')]: del sys.modules[m]
    from nbs_lib.cli import build, offline_env
    offline_env()
    LOG = str(Path(tempfile.mkdtemp(prefix='nbs-prof-log-'))/'times.jsonl')
    if a.cprofile: Path(a.cprofile).mkdir(parents=True, exist_ok=True)
    _instrument(a.cprofile)
    prof = None
    if a.cprofile:
        import cProfile; prof = cProfile.Profile(); prof.enable()
    t0 = time.perf_counter()
    build(force=True, root=root, quiet=True)
    total = time.perf_counter() - t0
    if prof: prof.disable(); prof.dump_stats(str(Path(a.cprofile)/'parent.prof'))

    rows = [json.loads(l) for l in Path(LOG).read_text().splitlines()]
    by = defaultdict(lambda: defaultdict(float))
    for r in rows: by[r['task'] or '(parent)'][r['label']] += r['s']
    import yaml
    tasks = [(t['name'], root/t['product']['nb']) for t in yaml.safe_load((root/'pipeline.yaml').read_text())['tasks']]
    res = {'total': total, 'parent': dict(by['(parent)']), 'tasks': {}}
    for n, nb in tasks:
        d = dict(by[n]); d['notebook cells (the work itself)'] = cell_seconds(nb)
        d['overhead = task wall - cells'] = d['task: wall in the executor'] - d['notebook cells (the work itself)']
        res['tasks'][n] = d
    print(markdown(res))
    if a.json: print(json.dumps(res))


def markdown(res: dict) -> str:
    "The profile as a markdown table (seconds), one column per task."
    names = list(res['tasks'])
    labels = sorted({k for d in res['tasks'].values() for k in d})
    labels = [k for k in labels if not k.startswith(('notebook', 'overhead'))] + ['notebook cells (the work itself)', 'overhead = task wall - cells']
    out = ['| step (s) | ' + ' | '.join(names) + ' | mean |', '|---|' + '---|'*(len(names) + 1)]
    for k in labels:
        v = [res['tasks'][n].get(k, 0.0) for n in names]
        b = '**' if k.startswith('overhead') else ''
        out.append(f'| {b}{k}{b} | ' + ' | '.join(f'{b}{x:.2f}{b}' for x in v) + f' | {b}{sum(v)/len(v):.2f}{b} |')
    out.append('')
    out.append(f"Whole build {res['total']:.2f} s; in the parent, outside the tasks: "
               + ', '.join(f'{k[8:]} {v:.2f} s' for k, v in res['parent'].items()) + '.')
    return '\n'.join(out)

if __name__ == '__main__':
    main()
