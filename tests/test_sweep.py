"""`nbs sweep` end to end: real notebooks run by ploomber-engine in worker processes (or papermill kernels), real
MLflow stores (sqlite, and a real `mlflow server`), a real Dask scheduler with workers; nothing is mocked."""
from __future__ import annotations
import json, os, re, signal, subprocess, sys, time, urllib.request
from pathlib import Path
import mlflow
import pytest
import yaml
from mlflow.tracking import MlflowClient
from conftest import BIN, ROOT, env_for, metrics, nbs, nbs_here, set_params
from servers import free_port

sys.path.insert(0, str(ROOT/'team'))
from stack import SERVER  # noqa: E402 (a tracking server's settings: no GenAI job runners, as the team's)

# the fastest family, a few seconds a configuration; the grid's hist_gradient_boosting values then do not apply, so
# the 6 points of params.yaml's grid collapse to one configuration per value of C
LR = ['--set', 'family=logistic_regression']
TEST_METRICS = ['test_roc_auc', 'test_log_loss', 'test_brier', 'test_accuracy', 'test_f1']


def _store(root: Path, uri: str | None = None):
    c = MlflowClient(uri or f"sqlite:///{root/'mlflow.db'}")
    exp = c.get_experiment_by_name('flights-delay')
    return c, exp.experiment_id


def _parent_id(out: str) -> str:
    return re.search(r'MLflow parent run: (\w+)', out).group(1)


def _children(c, exp, parent) -> list:
    return c.search_runs([exp], f"tags.`mlflow.parentRunId` = '{parent}'", max_results=1000)


def _table(out: str) -> list[dict]:
    """The markdown results table printed by `nbs sweep`, as rows of strings."""
    lines = [l for l in out.splitlines() if l.startswith('|')]
    head = [h.strip() for h in lines[0].strip('|').split('|')]
    return [dict(zip(head, (v.strip() for v in l.strip('|').split('|')))) for l in lines[2:]]


def _counts(out: str) -> tuple[int, int, int]:
    m = re.search(r'(\d+) ran on .*?, (\d+) cached .*?, (\d+) failed', out)
    return tuple(int(x) for x in m.groups())


def _check_child(c, r, parent: str, sweep_id: str, root: Path):
    """The contract with the promotion gate: tags, metrics like a build's, the model logged by the train notebook."""
    t = r.data.tags
    assert r.info.status == 'FINISHED'
    assert t['nbs.kind'] == 'sweep-config' and t['mlflow.parentRunId'] == parent and t['nbs.sweep_id'] == sweep_id
    assert re.fullmatch(r'[0-9a-f]{64}', t['nbs.config_hash']) and t['nbs.root'] == str(root)
    for tag in ['git.commit', 'git.dirty', 'data.train.md5', 'data.test.md5', 'lock.md5', 'python']:
        assert t.get(tag), tag
    for k in TEST_METRICS + ['train_roc_auc', 'fit_seconds']: assert k in r.data.metrics, k
    assert sorted(m.step for m in c.get_metric_history(r.info.run_id, 'test_roc_auc_by_month')) == [10, 11, 12]
    files = {a.path for d in [None, 'notebooks', 'evaluation'] for a in c.list_artifacts(r.info.run_id, d)}
    for f in ['params.yaml', 'notebooks/03_train.ipynb', 'notebooks/04_evaluate.ipynb', 'evaluation/metrics.json', 'evaluation/roc.png']:
        assert f in files, (f, sorted(files))
    models = mlflow.search_logged_models(experiment_ids=[r.info.experiment_id], output_format='list',
                                         filter_string=f"source_run_id = '{r.info.run_id}'")
    assert len(models) == 1


def test_sweep_runs_each_configuration_as_a_child_run_then_skips_them(built_copy):
    root = built_copy
    build_run = json.loads((root/'build/train/run.json').read_text())['run_id']
    args = ['sweep', '--set', 'hyperparams.hist_gradient_boosting.learning_rate=0.1,0.3',
            '--set', 'train.hyperparams.hist_gradient_boosting.max_leaf_nodes=31', '--jobs', '2', '--no-progress']
    r = nbs(root, *args)
    assert _counts(r.stdout) == (2, 0, 0) and '2 worker processes' in r.stdout
    c, exp = _store(root); mlflow.set_tracking_uri(f"sqlite:///{root/'mlflow.db'}")
    parent = c.get_run(_parent_id(r.stdout))
    sid = parent.data.tags['nbs.sweep_id']
    assert parent.info.status == 'FINISHED' and parent.data.tags['nbs.kind'] == 'sweep' and parent.data.tags['nbs.root'] == str(root)
    assert {'results.csv', 'results.md', 'params.yaml'} <= {a.path for a in c.list_artifacts(parent.info.run_id)}
    kids = _children(c, exp, parent.info.run_id)
    assert len(kids) == 2
    for k in kids: _check_child(c, k, parent.info.run_id, sid, root)
    lrs = {k.data.params['train.hyperparams.hist_gradient_boosting.learning_rate']: k for k in kids}
    assert set(lrs) == {'0.1', '0.3'}
    # learning_rate 0.1 is the build's own configuration: the same notebooks give the build's metrics
    assert lrs['0.1'].data.metrics['test_roc_auc'] == pytest.approx(metrics(root)['test']['roc_auc'], abs=1e-9)
    assert lrs['0.1'].data.metrics['test_roc_auc'] != lrs['0.3'].data.metrics['test_roc_auc']
    # the printed table is sorted by the metric, best first, and names the runs
    rows = _table(r.stdout)
    assert [float(x['test_roc_auc']) for x in rows] == sorted((float(x['test_roc_auc']) for x in rows), reverse=True)
    assert {x['run_id'] for x in rows} == {k.info.run_id for k in kids} and parent.data.tags['nbs.best_run_id'] == rows[0]['run_id']
    # executed notebooks kept under build/sweep/<sweep_id>/<config_id>/, with the injected parameters
    for k in kids:
        nb = json.loads((root/'build/sweep'/sid/k.data.tags['nbs.config_id']/'notebooks/03_train.ipynb').read_text())
        injected = [c_ for c_ in nb['cells'] if 'injected-parameters' in c_['metadata'].get('tags', [])]
        assert len(injected) == 1 and 'parent_run_id' in ''.join(injected[0]['source'])
    # the same sweep again: everything is skipped, nothing new in MLflow, the build's run untouched
    before = {x.info.run_id for x in c.search_runs([exp], max_results=1000)}
    r2 = nbs(root, *args)
    assert _counts(r2.stdout) == (0, 2, 0) and _parent_id(r2.stdout) == parent.info.run_id
    assert {x.info.run_id for x in c.search_runs([exp], max_results=1000)} == before
    assert c.get_run(build_run).data.tags['nbs.kind'] == 'build' and c.get_run(parent.info.run_id).info.status == 'FINISHED'


def test_a_failing_configuration_is_named_and_the_others_finish(built_copy, tmp_path):
    root = built_copy
    grid = tmp_path/'grid.yaml'
    grid.write_text(yaml.safe_dump({'family': ['logistic_regression'], 'hyperparams.logistic_regression.C': [1.0, -1.0]}))
    r = nbs(root, 'sweep', '--grid', str(grid), '--jobs', '1', check=False)
    assert r.returncode == 1, r.stdout + r.stderr
    assert r.stderr.strip().splitlines()[-1] == 'error: 1 of 2 configurations failed (see above)'
    c, exp = _store(root)
    kids = {k.data.params['train.hyperparams.logistic_regression.C']: k for k in _children(c, exp, _parent_id(r.stdout))}
    bad, good = kids['-1.0'], kids['1.0']
    cid = bad.data.tags['nbs.config_id']
    line = next(l for l in r.stdout.splitlines() if l.startswith('failed:'))
    assert line.startswith(f"failed: config {cid} in build/sweep/{bad.data.tags['nbs.sweep_id']}/{cid}/notebooks/03_train.ipynb: InvalidParameterError: The 'C' parameter of LogisticRegression"), line
    assert bad.info.status == 'FAILED' and bad.data.tags['nbs.error'] in line
    assert 'notebooks/03_train.ipynb' in {a.path for a in c.list_artifacts(bad.info.run_id, 'notebooks')}
    assert good.info.status == 'FINISHED' and c.get_run(_parent_id(r.stdout)).info.status == 'FAILED'
    rows = _table(r.stdout)
    assert [x['status'] for x in rows] == ['ran', 'failed']  # failures last
    # re-run: the finished one is skipped, the failed one is tried again (and fails again)
    r2 = nbs(root, 'sweep', '--grid', str(grid), '--jobs', '1', check=False)
    assert r2.returncode == 1 and _counts(r2.stdout) == (1, 1, 1)


def _group(pid: int) -> int | None:
    try: return os.getpgid(pid)
    except OSError: return None  # gone meanwhile


def test_an_interrupted_sweep_resumes(built_copy):
    root = built_copy
    values = [0.25, 0.5, 1, 2, 4]  # a configuration takes about 2.5 s: a window of four to interrupt in
    args = [str(BIN/'nbs'), 'sweep', *LR, '--set', f"hyperparams.logistic_regression.C={','.join(map(str, values))}",
            '--jobs', '1', '--no-progress']
    c, exp = _store(root)
    # SIGINT as at a terminal: to the whole process group (nbs and its worker), with the default handler (a test run
    # started in the background, `make test &`, has SIGINT ignored, and children inherit that)
    p = subprocess.Popen(args, cwd=root, env=env_for(root), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 600
    while time.time() < deadline and p.poll() is None:
        time.sleep(0.1)  # catch the first finished configuration before the last one ends, even under load
        # a configuration's evaluate notebook is written once it has finished (its MLflow run closed inside it)
        if any((root/'build/sweep').glob('*/*/notebooks/04_evaluate.ipynb')): break
    os.killpg(p.pid, signal.SIGINT)
    out, err = p.communicate(timeout=300)
    assert p.returncode == 130, out + err
    time.sleep(1)
    left = [d for d in os.listdir('/proc') if d.isdigit() and _group(int(d)) == p.pid]
    assert not left, f"processes of the interrupted sweep still running: {left}"  # its workers were stopped
    assert 'interrupted: re-run the same command to resume' in err
    assert 'could not mark' not in err, err
    sweep = c.search_runs([exp], "tags.`nbs.kind` = 'sweep'")[0]
    assert sweep.info.status == 'KILLED', err
    assert not c.search_runs([exp], "attributes.status = 'RUNNING'"), err  # nothing left dangling
    finished = {k.data.tags['nbs.config_hash'] for k in _children(c, exp, sweep.info.run_id) if k.info.status == 'FINISHED'}
    assert 1 <= len(finished) < len(values)
    r = nbs(root, *args[1:])
    assert _counts(r.stdout) == (len(values) - len(finished), len(finished), 0) and _parent_id(r.stdout) == sweep.info.run_id
    kids = _children(c, exp, sweep.info.run_id)
    done = [k for k in kids if k.info.status == 'FINISHED']
    assert len(done) == len(values) and len({k.data.tags['nbs.config_hash'] for k in done}) == len(values)
    assert all(k.info.status == 'KILLED' for k in kids if k.info.status != 'FINISHED')
    assert c.get_run(sweep.info.run_id).info.status == 'FINISHED'


def test_bad_grid_fails_in_one_line_before_anything_runs(built_copy):
    root = built_copy
    c, exp = _store(root)
    runs_before = {r.info.run_id for r in c.search_runs([exp], max_results=1000)}
    cases = [(['--set', 'hyperparams.hist_gradient_boosting.learnin_rate=0.1,0.2'],
              "'train.hyperparams.hist_gradient_boosting.learnin_rate' is not a HistGradientBoostingClassifier hyperparameter"),
             (['--set', 'familly=random_forest'], "--set 'familly' is not a key of train"),
             (['--set', 'family=xgboost,random_forest'], "'train.family' must be one of")]
    for args, expected in cases:
        r = nbs_here(root, 'sweep', *args)
        assert r.returncode == 2, r.stdout + r.stderr
        last = r.stderr.strip().splitlines()[-1]
        assert last.startswith('error: ') and expected in last, last
    set_params(root, **{'sweep.grid': {'hyperparams.hist_gradient_boosting.max_iter': 100}})
    r = nbs_here(root, 'sweep')
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1] == "error: params.yaml: 'sweep.grid.hyperparams.hist_gradient_boosting.max_iter' must be a non-empty list of values, got 100"
    assert not (root/'build/sweep').exists()
    assert {r.info.run_id for r in c.search_runs([exp], max_results=1000)} == runs_before


def test_sweep_without_a_build_says_to_build_first(fresh_project):
    r = nbs(fresh_project, 'sweep', check=False)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1] == ('error: build/features/train.parquet not found: run `nbs build` (or `make pipeline`) '
                                                 "first; a sweep trains on the latest build's features")


@pytest.mark.slow
def test_eight_parallel_runs_on_sqlite_lose_nothing(built_copy):
    """8 worker processes write to the embedded sqlite store at once: every run, param, metric and model is there."""
    root = built_copy
    cs = ['0.01', '0.03', '0.1', '0.3', '1', '3', '10', '30']
    r = nbs(root, 'sweep', *LR, '--set', f"hyperparams.logistic_regression.C={','.join(cs)}", '--jobs', '8', '--no-progress')
    assert _counts(r.stdout) == (8, 0, 0) and '8 worker processes' in r.stdout
    c, exp = _store(root); mlflow.set_tracking_uri(f"sqlite:///{root/'mlflow.db'}")
    parent = _parent_id(r.stdout); sid = c.get_run(parent).data.tags['nbs.sweep_id']
    kids = _children(c, exp, parent)
    assert len(kids) == 8
    p = yaml.safe_load((root/'params.yaml').read_text())
    from nbs_lib.tracking import flatten
    for k in kids:
        _check_child(c, k, parent, sid, root)
        hp = {'logistic_regression': {**p['train']['hyperparams']['logistic_regression'], 'C': 0}}  # its family's only
        train = {**p['train'], 'family': 'logistic_regression', 'hyperparams': hp}
        expected = set(flatten({s: p[s] for s in ('data', 'split', 'table')} | {'train': train}))
        assert set(k.data.params) == expected, set(k.data.params) ^ expected
        assert len(k.data.metrics) == 16, sorted(k.data.metrics)  # 7 train_, 7 test_ (+ by month), fit_seconds
    assert sorted(float(k.data.params['train.hyperparams.logistic_regression.C']) for k in kids) == sorted(float(x) for x in cs)


def _wait(check, what: str, proc: subprocess.Popen, log: Path, timeout: float = 180):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None: pytest.fail(f"{what} exited {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if check(): return
        except Exception: pass
        time.sleep(1)
    pytest.fail(f"{what} not ready after {timeout}s:\n{log.read_text()[-3000:]}")


def _stop(*procs):
    for p in procs:
        if p.poll() is None: p.terminate()
    for p in procs:
        try: p.wait(timeout=30)
        except subprocess.TimeoutExpired: p.kill()


@pytest.mark.slow
def test_sweep_against_a_remote_mlflow_tracking_server(built_copy, tmp_path):
    root = built_copy
    port, log = free_port(), tmp_path/'server.log'
    server = subprocess.Popen([str(BIN/'mlflow'), 'server', '--backend-store-uri', f"sqlite:///{tmp_path/'server.db'}",
                               '--artifacts-destination', str(tmp_path/'artifacts'), '--host', '127.0.0.1', '--port', str(port),
                               '--workers', '1'], cwd=tmp_path, env=env_for(root, **SERVER), stdout=log.open('w'), stderr=subprocess.STDOUT)
    uri = f'http://127.0.0.1:{port}'
    try:
        _wait(lambda: urllib.request.urlopen(f'{uri}/health', timeout=5).status == 200, 'mlflow server', server, log)
        local_runs = len(MlflowClient(f"sqlite:///{root/'mlflow.db'}").search_runs([_store(root)[1]], max_results=1000))
        r = nbs(root, 'sweep', *LR, '--set', 'hyperparams.logistic_regression.C=0.5,2', '--jobs', '2', '--no-progress',
                MLFLOW_TRACKING_URI=uri)
        assert _counts(r.stdout) == (2, 0, 0)
        c, exp = _store(root, uri); mlflow.set_tracking_uri(uri)
        parent = _parent_id(r.stdout); sid = c.get_run(parent).data.tags['nbs.sweep_id']
        kids = _children(c, exp, parent)
        assert len(kids) == 2
        for k in kids: _check_child(c, k, parent, sid, root)
        # artifacts went through the server to its destination; the project's own store got nothing
        assert list((tmp_path/'artifacts').rglob('03_train.ipynb')) and list((tmp_path/'artifacts').rglob('MLmodel'))
        assert len(MlflowClient(f"sqlite:///{root/'mlflow.db'}").search_runs([_store(root)[1]], max_results=1000)) == local_runs
    finally:
        _stop(server)


@pytest.mark.slow
def test_sweep_runs_on_a_dask_cluster(built_copy, tmp_path):
    """A real scheduler and two worker processes on loopback; the configurations run in those workers."""
    import psutil
    from distributed import Client
    root = built_copy
    env, sf = env_for(root), tmp_path/'scheduler.json'
    slog, wlog = tmp_path/'scheduler.log', tmp_path/'workers.log'
    sched = subprocess.Popen([str(BIN/'dask'), 'scheduler', '--host', '127.0.0.1', '--port', '0', '--no-dashboard',
                              '--scheduler-file', str(sf)], cwd=tmp_path, env=env, stdout=slog.open('w'), stderr=subprocess.STDOUT)
    workers = None
    try:
        _wait(lambda: sf.exists() and json.loads(sf.read_text())['address'], 'dask scheduler', sched, slog)
        address = json.loads(sf.read_text())['address']
        workers = subprocess.Popen([str(BIN/'dask'), 'worker', address, '--nworkers', '2', '--nthreads', '1', '--no-dashboard',
                                    '--local-directory', str(tmp_path/'dask')], cwd=tmp_path, env=env,
                                   stdout=wlog.open('w'), stderr=subprocess.STDOUT)
        with Client(address, timeout=60) as client: client.wait_for_workers(2, timeout=180)
        r = nbs(root, 'sweep', *LR, '--set', 'hyperparams.logistic_regression.C=0.5,2', '--scheduler', address, '--no-progress')
        assert _counts(r.stdout) == (2, 0, 0) and f'Dask scheduler {address} (2 workers, 2 threads)' in r.stdout
        c, exp = _store(root); mlflow.set_tracking_uri(f"sqlite:///{root/'mlflow.db'}")
        parent = _parent_id(r.stdout); sid = c.get_run(parent).data.tags['nbs.sweep_id']
        kids = _children(c, exp, parent)
        assert len(kids) == 2
        for k in kids: _check_child(c, k, parent, sid, root)
        worker_pids = {p.pid for p in psutil.Process(workers.pid).children(recursive=True)}
        ran_in = {int(k.data.tags['nbs.worker'].rsplit(':', 1)[1]) for k in kids}
        assert ran_in <= worker_pids, (ran_in, worker_pids)
    finally:
        _stop(*(p for p in (workers, sched) if p))


def _readme_papermill_block() -> str:
    text = (ROOT/'README.md').read_text().split('## Parameter sweeps', 1)[1]
    return next(b for b in re.findall(r'```bash\n(.*?)```', text, re.S) if 'papermill notebooks/tasks/03_train.ipynb' in b)


@pytest.mark.slow
def test_plain_papermill_commands_of_the_readme_work(built_copy):
    """The README's `papermill ... -f params.yaml -y ... -p parent_run_id ...` commands, run as they are written."""
    root = built_copy
    c, exp = _store(root)
    parent = c.create_run(exp, run_name='a parent', tags={'nbs.kind': 'manual-parent'}).info.run_id
    r = subprocess.run(['bash', '-ec', _readme_papermill_block()], cwd=root, env=env_for(root, PARENT_RUN_ID=parent),
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-4000:]
    run = json.loads((root/'build/manual/train/run.json').read_text())
    got = c.get_run(run['run_id'])
    assert got.info.status == 'FINISHED' and got.data.tags['mlflow.parentRunId'] == parent and got.data.tags['nbs.kind'] == 'manual'
    assert got.data.params['train.family'] == 'logistic_regression'
    m = json.loads((root/'build/manual/evaluate/metrics.json').read_text())['test']
    assert got.data.metrics['test_roc_auc'] == pytest.approx(m['roc_auc']) and 0.6 < m['roc_auc'] < 0.8
