"""Benchmarks of the workflow's own overhead (issue 7): every figure against its baseline, measured in the same run.

    python bench/bench_pipeline.py [--repeats 3] [--frac 0.03] [--full]    (or: make bench)

1. cold build of the whole pipeline (`nbs build --force`) vs the same steps as one plain Python script
2. per-task overhead: papermill (a kernel) vs ploomber-engine (in-process) vs the plain function call, and each
   task inside the real build against its notebook's cells (bench/profile_build.py)
3. no-op rebuild (`nbs build`, `ploomber build`) vs `dvc repro` on an up-to-date stage, and `nbs build` right after a verb
4. MLflow tracking cost per run (params, metrics, model, artifacts) vs no tracking
5. peak memory (RSS of the whole process tree) of a cold build on the full data (--full)
1e. edit-to-result (--full): a changed `train:` hyperparameter, then `nbs build` until the test metrics are in
   metrics.json and in MLflow, vs one plain Python process doing the same fit and test scoring
Prints one table (medians) and writes bench/results.md.
"""
from __future__ import annotations
import argparse, json, os, shutil, statistics, subprocess, sys, tempfile, textwrap, time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent/'tests'))
from conftest import BIN, copy_project, env_for, set_params  # noqa: E402
from profile_build import markdown as pb_markdown  # noqa: E402

PY = str(BIN/'python')


def timed(cmd, root, **env) -> float:
    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=root, env=env_for(root, **env), capture_output=True, text=True)
    dt = time.perf_counter() - t0
    if r.returncode: raise SystemExit(f"{cmd} failed:\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}")
    return dt


def median_of(fn, repeats: int) -> float:
    return statistics.median(fn() for _ in range(repeats))


def peak_rss(cmd, root, **env) -> tuple[float, float]:
    """(seconds, peak MB) of a command, RSS summed over its process tree, sampled every 20 ms."""
    import psutil
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, cwd=root, env=env_for(root, **env), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peak = 0
    proc = psutil.Process(p.pid)
    while p.poll() is None:
        try:
            procs = [proc, *proc.children(recursive=True)]
            peak = max(peak, sum(q.memory_info().rss for q in procs if q.is_running()))
        except psutil.Error: pass
        time.sleep(0.02)
    if p.returncode: raise SystemExit(f"{cmd} failed: {p.stderr.read()[-3000:]}")
    return time.perf_counter() - t0, peak/2**20


# the same steps as the pipeline, as one plain script: no notebooks, no ploomber (tracking on or off)
PLAIN = textwrap.dedent('''
    import json, sys, time
    from pathlib import Path
    t0 = time.perf_counter()
    from nbs_lib.config import load_params, check_params, project_root
    from nbs_lib.data import DataSpec, check_table, model_table, sample_rows, split_table, write_parquet, read_table
    from nbs_lib.features import join_raw, load_raw
    from nbs_lib.models import model_from_params
    from nbs_lib import metrics as mt
    track = sys.argv[1] == 'track'
    p = check_params(load_params()); root = project_root(); d = p['data']; out = root/'build-plain'; spec = DataSpec.from_params(p)
    frames = load_raw(root/d['raw_dir'], d['files']); main = next(iter(frames))
    frames[main] = sample_rows(frames[main], d['sample_frac'], d['seed'], p['split']['by'])
    for name, f in frames.items(): write_parquet(f, out/f'{name}.parquet')
    table = model_table(join_raw({name: read_table(out/f'{name}.parquet') for name in frames}), spec)
    check_table(table, spec)
    train, test = split_table(table, p['split'], spec)
    write_parquet(train, out/'train.parquet'); write_parquet(test, out/'test.parquet')
    INPUT_COLUMNS, TARGET = spec.inputs, spec.target
    model = model_from_params(p).fit(train[INPUT_COLUMNS], train[TARGET])
    pr = model.predict_proba(test[INPUT_COLUMNS])[:, 1]
    m = mt.classification_metrics(test[TARGET], pr, p['evaluate']['threshold'])
    bym = mt.metrics_by(test.assign(y=test[TARGET], p=pr), 'month')
    imp = mt.feature_importance(model, test[INPUT_COLUMNS], test[TARGET], n_rows=p['evaluate']['importance_rows'])
    for name, fig in {'roc': mt.plot_roc(test[TARGET], pr), 'cal': mt.plot_calibration(test[TARGET], pr),
                      'month': mt.plot_by_period(bym, 'month'), 'imp': mt.plot_importance(imp)}.items():
        fig.savefig(out/f'{name}.png', dpi=90)
    if track:
        import mlflow
        from nbs_lib import tracking as trk
        rid = trk.start_run(p, 'plain', {'train': out/'train.parquet'}, dict(train=p['train']), {'nbs.kind': 'bench'}, root=root)
        with trk.active(rid):
            info = trk.log_model(model, train[INPUT_COLUMNS].head(5)); mlflow.log_metrics({f'test_{k}': v for k, v in m.items()})
        trk.log_files(rid, sorted(out.glob('*.png')), 'evaluation'); trk.finish_run(rid)
        from nbs_lib import monitor as mon  # the monitor task's work: drift report of the later months, its own MLflow run
        (out/'run.json').write_text(json.dumps({'run_id': rid, 'model_uri': info.model_uri}))
        mon.run_monitor({'features': {'train': out/'train.parquet', 'test': out/'test.parquet'}, 'train': {'run': out/'run.json'}},
                        {'drift': out/'drift.json', 'report': out/'report'}, p['monitor'], p['table'], p['tracking'], p['split'], root=root)
    (out/'metrics.json').write_text(json.dumps(m))
    print(json.dumps({'seconds': time.perf_counter() - t0, 'roc_auc': m['roc_auc']}))
''')

# one run's tracking, timed inside a warm process (imports excluded: they are paid once per process)
TRACK = textwrap.dedent('''
    import json, sys, time
    import pandas as pd, mlflow
    from nbs_lib.config import load_params, check_params, project_root
    from nbs_lib.data import DataSpec
    from nbs_lib.models import model_from_params
    from nbs_lib import tracking as trk
    p = check_params(load_params()); root = project_root(); spec = DataSpec.from_params(p); INPUT_COLUMNS, TARGET = spec.inputs, spec.target
    train = pd.read_parquet(root/'build/features/train.parquet')
    model = model_from_params(p).fit(train[INPUT_COLUMNS], train[TARGET])
    pngs = sorted((root/'build/evaluate/plots').glob('*.png'))
    trk.setup_tracking(p, root)
    times = []
    for i in range(int(sys.argv[1]) + 1):
        t0 = time.perf_counter()
        rid = trk.start_run(p, f'bench-{i}', {'train': root/'build/features/train.parquet'}, dict(train=p['train']), {'nbs.kind': 'bench'}, root=root)
        with trk.active(rid):
            trk.log_model(model, train[INPUT_COLUMNS].head(5)); mlflow.log_metrics({'test_roc_auc': 0.7, 'test_brier': 0.2})
        trk.log_files(rid, pngs, 'evaluation'); trk.finish_run(rid)
        times.append(time.perf_counter() - t0)
    print(json.dumps(times[1:]))  # the first run pays lazy imports of the model flavour: reported apart
''')

# one task's work three ways: features (read 2 parquets, join, split, write 2 parquets). plain and engine both start
# from the state `nbs build` runs its tasks in (nbs_lib.cli._warm_up, and the modules the task imports), so
# the difference is the notebook machinery alone; papermill's kernel pays its own imports, which is the point of it.
TASK = textwrap.dedent('''
    import json, sys, time, tempfile, os
    from pathlib import Path
    mode, root = sys.argv[1], Path.cwd()
    nb = root/'notebooks/tasks/02_features.ipynb'
    import yaml
    p = yaml.safe_load((root/'params.yaml').read_text())
    out = Path(tempfile.mkdtemp())
    params = dict(upstream={'ingest': {'flights': str(root/'build/ingest/flights.parquet'), 'weather': str(root/'build/ingest/weather.parquet')}},
                  product={'nb': str(out/'f.ipynb'), 'train': str(out/'train.parquet'), 'test': str(out/'test.parquet')},
                  table=p['table'], split=p['split'])
    if mode in ('plain', 'engine'):  # as in `nbs build`: heavy imports paid once before the tasks run
        from nbs_lib.cli import _warm_up
        _warm_up()
        from nbs_lib.config import check_stage
        from nbs_lib.data import DataSpec, check_table, model_table, read_table, split_table, write_parquet
        from nbs_lib.features import join_raw
    if mode == 'engine':
        from ploomber_engine import execute_notebook
    t0 = time.perf_counter()
    if mode == 'plain':
        spec = DataSpec.from_params(p)
        t = model_table(join_raw({k: read_table(v) for k, v in params['upstream']['ingest'].items() if k not in ('nb', 'html')}), spec)
        check_table(t, spec); tr, te = split_table(t, p['split'], spec)
        write_parquet(tr, out/'train.parquet'); write_parquet(te, out/'test.parquet')
    elif mode == 'engine':
        execute_notebook(str(nb), str(out/'f.ipynb'), parameters=params, progress_bar=False, log_output=False)
    else:
        import papermill as pm
        pm.execute_notebook(str(nb), str(out/'f.ipynb'), parameters=params, progress_bar=False, kernel_name='python3')
    print(json.dumps({'seconds': time.perf_counter() - t0}))
''')

# the researcher's loop without the workflow: one process that fits the model of params.yaml and scores the test set
FIT_SCORE = textwrap.dedent('''
    import json
    from nbs_lib.config import load_params, check_params, project_root
    from nbs_lib.data import DataSpec, read_table
    from nbs_lib.models import model_from_params, predict_scores
    from nbs_lib import metrics as mt
    p = check_params(load_params()); root = project_root(); spec = DataSpec.from_params(p)
    train, test = read_table(root/'build/features/train.parquet'), read_table(root/'build/features/test.parquet')
    model = model_from_params(p).fit(train[spec.inputs], train[spec.target])
    m = mt.task_metrics(spec.task, test[spec.target], predict_scores(model, test[spec.inputs], spec.task), p['evaluate']['threshold'])
    print(json.dumps(m))
''')


def _test_metrics_logged(root: Path, run_id: str) -> bool:
    "Whether the build's run has its test metrics in the project's sqlite MLflow store (read directly: no MLflow import in the timer's loop)."
    import sqlite3
    try:
        with sqlite3.connect(f"file:{root/'mlflow.db'}?mode=ro", uri=True, timeout=1) as db:
            return db.execute("select count(*) from metrics where run_uuid = ? and key like 'test_%'", (run_id,)).fetchone()[0] > 0
    except sqlite3.Error: return False


def edit_to_result(root: Path, value) -> tuple[float, float]:
    "Set a `train:` hyperparameter, run `nbs build`: (seconds until metrics.json holds a new run's test metrics and MLflow has them, seconds until the build exits)."
    import yaml
    p = yaml.safe_load((root/'params.yaml').read_text()); fam = p['train']['family']
    mf = root/'build/evaluate/metrics.json'
    before = json.loads(mf.read_text())['run_id'] if mf.exists() else None
    t0 = time.perf_counter()
    set_params(root, **{f'train.hyperparams.{fam}.l2_regularization': value})
    proc = subprocess.Popen([str(BIN/'nbs'), 'build'], cwd=root, env=env_for(root), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen = None
    while seen is None:
        try: rid = json.loads(mf.read_text()).get('run_id')
        except (OSError, ValueError): rid = None
        if rid and rid != before and _test_metrics_logged(root, rid): seen = time.perf_counter() - t0
        elif proc.poll() is not None: break
        else: time.sleep(0.05)
    out, err = proc.communicate(); total = time.perf_counter() - t0
    if proc.returncode or seen is None: raise SystemExit(f"nbs build after the edit failed:\n{out[-2000:]}\n{err[-3000:]}")
    return seen, total


def edit_rows(full: Path, repeats: int, row) -> None:
    "Row 1e on a built full-data project: the researcher's loop, a hyperparameter changed, until the test metrics are there."
    runs, fits = [], []
    for i in range(repeats):  # interleaved, so that both see the same load
        runs.append(edit_to_result(full, 1.0 + 0.01*(i + 1))); fits.append(timed([PY, '-c', FIT_SCORE], full))
    fit = statistics.median(fits)
    row('1e. edit-to-result: `train:` changed -> test metrics in metrics.json and MLflow (full data)',
        statistics.median(r[0] for r in runs), fit, 'plain fit + test scoring', goal='<= 2x')
    row("1e'. the same build, until `nbs build` exits (importance, plots, monitor, HTML done)",
        statistics.median(r[1] for r in runs), fit, 'plain fit + test scoring')


DVC_STAGE = textwrap.dedent('''
    stages:
      features:
        cmd: python -c "open('out.txt', 'w').write('stage')"
        deps: [data.txt]
        outs: [out.txt]
''')


def _task_params(root: Path, out: Path) -> dict:
    import yaml
    p = yaml.safe_load((root/'params.yaml').read_text())
    return {'upstream': {'ingest': {'flights': str(root/'build/ingest/flights.parquet'), 'weather': str(root/'build/ingest/weather.parquet')}},
            'product': {'nb': str(out/'x.ipynb'), 'train': str(out/'tr.parquet'), 'test': str(out/'te.parquet')},
            'table': p['table'], 'split': p['split']}


def rows_2(root: Path, tmp: Path, repeats: int, row) -> dict:
    "Rows 2a-2d: per-task overhead; returns the fastest build's profile."
    # 2. per-task overhead (features task): papermill kernel vs ploomber-engine vs plain call, all in-process timers
    def task(mode):
        r = subprocess.run([PY, '-c', TASK, mode], cwd=root, env=env_for(root), capture_output=True, text=True, check=True)
        return json.loads(r.stdout.strip().splitlines()[-1])['seconds']
    t_plain = median_of(lambda: task('plain'), repeats)
    row('2a. task via ploomber-engine (in-process, warm as in the build)', median_of(lambda: task('engine'), repeats), t_plain, 'plain call', goal='<= 0.5 s over')
    row('2b. task via papermill (kernel)', median_of(lambda: task('papermill'), repeats), t_plain, 'plain call')
    row('2c. task via papermill CLI (new process + kernel)',
        median_of(lambda: timed([str(BIN/'papermill'), '-y', json.dumps(_task_params(root, tmp)), 'notebooks/tasks/02_features.ipynb',
                                 str(tmp/'x.ipynb')], root), repeats), t_plain, 'plain call')

    # 2d. per-task overhead inside the real build: each task's wall time in `nbs build --force`'s executor
    # against the run time of its notebook's cells (timestamps ploomber-engine writes into the executed notebook)
    profiles = []
    for _ in range(repeats):
        r = subprocess.run([PY, str(HERE/'profile_build.py'), str(root), '--json'], cwd=root, env=env_for(root),
                           capture_output=True, text=True)
        if r.returncode: raise SystemExit(f"profile_build.py failed:\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}")
        profiles.append(json.loads(r.stdout.strip().splitlines()[-1]))
    prof = min(profiles, key=lambda q: q['total'])  # the breakdown shown below the table: the fastest build
    walls = [statistics.mean(t['task: wall in the executor'] for t in q['tasks'].values()) for q in profiles]
    cells = [statistics.mean(t['notebook cells (the work itself)'] for t in q['tasks'].values()) for q in profiles]
    row('2d. task inside `nbs build --force` (mean of 5 tasks)', statistics.median(walls), statistics.median(cells),
        'its notebook cells', goal='<= 0.5 s over')

    return prof


def rows_3(root: Path, tmp: Path, repeats: int, row) -> None:
    "Rows 3a-3c: no-op rebuilds against dvc repro on an up-to-date stage."
    nbs = str(BIN/'nbs')
    # 3. no-op rebuild vs dvc repro on an up-to-date stage
    noop = median_of(lambda: timed([nbs, 'build'], root), repeats)
    noop_pl = median_of(lambda: timed([str(BIN/'ploomber'), 'build'], root), repeats)
    dv = tmp/'dvc'; dv.mkdir()
    subprocess.run(['git', 'init', '-q'], cwd=dv, check=True)
    (dv/'data.txt').write_text('x'); (dv/'dvc.yaml').write_text(DVC_STAGE)
    timed([str(BIN/'dvc'), 'init', '-q'], dv); timed([str(BIN/'dvc'), 'repro', '-q'], dv)
    dvc_noop = median_of(lambda: timed([str(BIN/'dvc'), 'repro', '-q'], dv), repeats)
    row('3a. no-op rebuild: nbs build', noop, dvc_noop, 'dvc repro, up to date', goal='< 2 s')
    row('3b. no-op rebuild: ploomber build', noop_pl, dvc_noop, 'dvc repro, up to date', goal='< 2 s')
    # 3c. the no-op right after a verb that writes into build/ (nbs monitor rewrites the monitor task's own products)
    for verb in (['monitor'], ['register']):
        def after(verb=verb):
            timed([nbs, *verb], root); return timed([nbs, 'build'], root)
        row(f'3c. no-op rebuild after `nbs {verb[0]}`', median_of(after, repeats), noop, 'no-op right after a build', goal='<= 0.2 s')


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--repeats', type=int, default=3)
    ap.add_argument('--frac', type=float, default=0.03, help='sample of the data for figures 1-4')
    ap.add_argument('--full', action='store_true', help='also measure figure 5 (and figure 1) on the full data')
    ap.add_argument('--out', default=str(HERE/'results.md'))
    ap.add_argument('--only', help="comma-separated row groups to measure (1,2,3,4,5,1e), printed only: results.md is left as it is")
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix='nbs-bench-'))
    rows = []
    def row(what, value, baseline, base_name, unit='s', goal=''):
        over = value - baseline
        rows.append((what, f'{value:.2f} {unit}', f'{baseline:.2f} {unit} ({base_name})', f'{over:+.2f} {unit}', f'{value/baseline:.2f}x' if baseline else '', goal))
        print(rows[-1], flush=True)
    only = set(a.only.split(',')) if a.only else None
    def want(g): return only is None or g in only
    if only == {'1e'}:
        full = copy_project(tmp/'full'); timed([str(BIN/'nbs'), 'build'], full)
        edit_rows(full, a.repeats, row); shutil.rmtree(tmp, ignore_errors=True); return
    root = copy_project(tmp/'proj'); set_params(root, **{'data.sample_frac': a.frac})

    # 1. cold build vs plain script (tracking on in both: the difference is orchestration)
    nbs = str(BIN/'nbs')
    timed([nbs, 'build'], root)  # warm the OS cache, create the store
    def plain():
        t0 = time.perf_counter(); subprocess.run([PY, '-c', PLAIN, 'track'], cwd=root, env=env_for(root), check=True, capture_output=True)
        return time.perf_counter() - t0
    if want('1'):
        builds, bases = [], []
        for _ in range(a.repeats):  # interleaved, so that both see the same load
            builds.append(timed([nbs, 'build', '--force'], root)); bases.append(plain())
        row(f'1. cold build, 5 tasks (sample {a.frac})', statistics.median(builds), statistics.median(bases), 'plain script',
            goal=f'<= {5*0.5:.1f} s over')
    prof = rows_2(root, tmp, a.repeats, row) if want('2') else None
    if want('3'): rows_3(root, tmp, a.repeats, row)
    # 4. tracking cost per run
    if want('4'):
        r = subprocess.run([PY, '-c', TRACK, str(max(a.repeats, 3))], cwd=root, env=env_for(root), capture_output=True, text=True, check=True)
        tr = statistics.median(json.loads(r.stdout.strip().splitlines()[-1]))
        row('4. MLflow tracking per run (params, metrics, model, 4 plots)', tr, 0.0, 'no tracking', goal='< 0.5 s')

    # 5. full data: cold build time and peak memory, against the plain script; 1e, edit-to-result
    if a.full and (want('5') or want('1e')):
        full = copy_project(tmp/'full')
        timed([nbs, 'build'], full)
        if want('5'):
            secs, mb = peak_rss([nbs, 'build', '--force'], full)
            psecs, pmb = peak_rss([PY, '-c', PLAIN, 'track'], full)
            row('1f. cold build, full data (336,776 flights)', secs, psecs, 'plain script')
            row('5. peak memory, full-data build (process tree RSS)', mb, pmb, 'plain script', unit='MB', goal='< 1536 MB')
        if want('1e'): edit_rows(full, a.repeats, row)

    head = '| figure | measured | baseline (same run) | overhead | ratio | goal |\n|---|---|---|---|---|---|\n'
    table = head + ''.join('| ' + ' | '.join(r) + ' |\n' for r in rows)
    if only or prof is None:
        print('\n' + table); shutil.rmtree(tmp, ignore_errors=True); return
    note = (f"\nMedians of {a.repeats} runs, measured together by `python bench/bench_pipeline.py --repeats {a.repeats}"
            f"{' --full' if a.full else ''}` on {os.cpu_count()} cores, {time.strftime('%Y-%m-%d')}.\n")
    note += ("\n2a and the plain call both start warm, as `nbs build` runs its tasks (nbs_lib.cli._warm_up, then the task's "
             "modules imported); 2a is notebook execution alone (no HTML export). 2b/2c start a kernel, which pays its own imports. "
             "2d is the real build: per task, its wall time in Ploomber's executor against its notebook's cells (not counted: the IPython shell each task leaves behind, whose atexit the process pays at exit); where the rest "
             "goes (`python bench/profile_build.py PROJECT`, fastest of the repeats, seconds):\n\n" + pb_markdown(prof) + '\n')
    print('\n' + table + note)
    Path(a.out).write_text('# Workflow overhead benchmarks\n\n' + table + note)
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == '__main__':
    main()
