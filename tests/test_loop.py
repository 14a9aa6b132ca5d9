"""The researcher's everyday loop with the real clients (issue 14): a Jupyter server's contents API and git, the
papermill CLI, the MLflow client, `nbs dag`, and what a build prints."""
from __future__ import annotations
import json, os, shutil, signal, subprocess, time, urllib.request
from pathlib import Path
import pytest
from mlflow.tracking import MlflowClient
from conftest import BIN, ROOT, env_for, nbs, ran_tasks, run
from servers import free_port

VOLATILE_LANGUAGE_INFO = {'codemirror_mode': {'name': 'ipython', 'version': 3}, 'file_extension': '.py', 'mimetype': 'text/x-python',
                          'name': 'python', 'nbconvert_exporter': 'python', 'pygments_lexer': 'ipython3', 'version': '3.11.7'}


def _git(root: Path, *args: str) -> str:
    return subprocess.run(['git', *args], cwd=root, capture_output=True, text=True, check=True).stdout


@pytest.fixture
def clone(tmp_path) -> Path:
    """A fresh clone of the committed project, set up for git by its own `make git-setup`, using this venv."""
    root = tmp_path/'clone'
    subprocess.run(['git', 'clone', '-q', str(ROOT), str(root)], check=True)
    (root/'.venv').symlink_to(BIN.parent)
    r = subprocess.run(['make', '-o', '.venv/.installed', 'git-setup'], cwd=root, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert '--keep-id' in _git(root, 'config', 'filter.nbstripout.clean')
    # a fresh checkout is 'racily clean' (files as new as the index): git would run the filter on every notebook at
    # the next status; an index dated later makes the stat data trusted, as after any later git command
    later = time.time() + 2; os.utime(root/'.git/index', (later, later))
    assert _git(root, 'check-attr', 'filter', 'diff', 'merge', '--', 'notebooks/tasks/03_train.ipynb').split() == [
        'notebooks/tasks/03_train.ipynb:', 'filter:', 'nbstripout', 'notebooks/tasks/03_train.ipynb:', 'diff:', 'jupyternotebook',
        'notebooks/tasks/03_train.ipynb:', 'merge:', 'jupyternotebook']
    return root


def _api(base: str, token: str, method: str, path: str, body: dict | None = None) -> dict:
    req = urllib.request.Request(f'{base}{path}', method=method, data=None if body is None else json.dumps(body).encode(),
                                 headers={'Authorization': f'token {token}', 'Content-Type': 'application/json'})
    with urllib.request.urlopen(req, timeout=30) as r: return json.loads(r.read() or b'{}')


def test_save_through_jupyter_and_make_export_leave_git_clean(clone):
    """Open and save every committed notebook through a real Jupyter server's contents API, as Lab does (a notebook not
    in the filter's form would show here), then a task and a library notebook as after running them (outputs, counts,
    the kernel's kernelspec and language_info), then `make export`: git stays clean, `git status` included."""
    port, token = free_port(), 'test-token'
    server = subprocess.Popen([str(BIN/'jupyter-server'), '--no-browser', f'--port={port}', '--ip=127.0.0.1',
                               f'--ServerApp.root_dir={clone}', f'--IdentityProvider.token={token}', '--allow-root'],
                              cwd=clone, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              env={**os.environ, 'JUPYTER_CONFIG_PATH': str(clone)})  # as `make lab`: the project's jupyter_server_config.py
    base = f'http://127.0.0.1:{port}'
    try:
        for _ in range(150):
            try: _api(base, token, 'GET', '/api/status'); break
            except OSError: time.sleep(0.2)
        spec = _api(base, token, 'GET', '/api/kernelspecs')['kernelspecs']['python3']['spec']
        kernelspec = {'display_name': spec['display_name'], 'language': spec['language'], 'name': 'python3'}
        notebooks = _git(clone, 'ls-files', '*.ipynb').split()
        assert len(notebooks) >= 15
        for nb in notebooks:
            model = _api(base, token, 'GET', f'/api/contents/{nb}?content=1')
            assert model['content']['metadata']['kernelspec'] == kernelspec, f'{nb}: Lab would rewrite its kernelspec'
            _api(base, token, 'PUT', f'/api/contents/{nb}', {'type': 'notebook', 'format': 'json', 'content': model['content']})
        assert _git(clone, 'status', '--porcelain') == '', 'an open and save in Lab changed a notebook'
        for nb in ['notebooks/tasks/03_train.ipynb', 'notebooks/lib/06_cli.ipynb']:  # as after running them in Lab (each costs filter runs)
            content = _api(base, token, 'GET', f'/api/contents/{nb}?content=1')['content']
            content['metadata'].update(kernelspec=kernelspec, language_info=VOLATILE_LANGUAGE_INFO)
            for i, c in enumerate(content['cells']):
                if c['cell_type'] == 'code':
                    c.update(execution_count=i + 1, outputs=[{'output_type': 'stream', 'name': 'stdout', 'text': 'ran\n'}])
                    c['metadata']['execution'] = {'iopub.status.busy': '2026-01-01T00:00:00.000Z'}
            _api(base, token, 'PUT', f'/api/contents/{nb}', {'type': 'notebook', 'format': 'json', 'content': content})
        assert '"ran\\n"' in (clone/'notebooks/tasks/03_train.ipynb').read_text()  # the outputs are in the working copy...
        for _ in range(300):  # the post-save hook re-stages in the background
            if _git(clone, 'status', '--porcelain') == '': break
            time.sleep(0.5)
        assert _git(clone, 'status', '--porcelain') == ''  # ...the clean filter keeps them out of git, the post-save hook out of `git status`
        assert _git(clone, 'diff', 'HEAD', '--no-ext-diff') == '' and _git(clone, 'diff', '--cached', '--no-ext-diff') == ''
    finally:
        server.terminate(); server.wait(timeout=30)
    for nb in _git(clone, 'ls-files', '*.ipynb').split(): (clone/nb).unlink()  # the outputs stay in the working copy, as in Lab...
    _git(clone, 'checkout', '--', '.')
    for nb in _git(clone, 'ls-files', '*.ipynb').split():  # ...and a fresh checkout has none
        assert '"ran\\n"' not in (clone/nb).read_text(), nb
    r = subprocess.run(['make', '-o', '.venv/.installed', 'export'], cwd=clone, capture_output=True, text=True, env={**os.environ, 'PYTHONPATH': str(clone)})
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert _git(clone, 'status', '--porcelain') == '', 'make export on a clean clone changed files'


def _products(root: Path) -> dict:
    return {p.relative_to(root): p.read_bytes() for p in (root/'build').rglob('*')
            if p.is_file() and 'explore' not in p.relative_to(root).parts}


def _explore_runs(root: Path) -> list:
    c = MlflowClient(f"sqlite:///{root/'mlflow.db'}")
    return c.search_runs([e.experiment_id for e in c.search_experiments()], "tags.`nbs.kind` = 'explore'")


def test_papermill_run_by_hand_is_an_exploration_that_leaves_the_build_alone(built_copy, tmp_path):
    """The train notebook through the papermill CLI with an override and no products: params merged over params.yaml,
    products in build/explore/, its own FINISHED run with the notebook; the build's products and run untouched.
    A failing one ends FAILED; one that names the pipeline's own products is refused in one line; `nbs build` runs nothing."""
    root = built_copy
    before, build_run = _products(root), json.loads((root/'build/train/run.json').read_text())['run_id']
    c = MlflowClient(f"sqlite:///{root/'mlflow.db'}")
    build_before = c.get_run(build_run)
    pm = [str(BIN/'papermill'), '--no-progress-bar', '-k', 'python3', 'notebooks/tasks/03_train.ipynb']
    run([*pm, str(tmp_path/'ok.ipynb'), '-y', '{train: {family: logistic_regression, hyperparams: {logistic_regression: {C: 0.5}}}}'], root)
    out = json.loads((tmp_path/'ok.ipynb').read_text())
    printed = ''.join(''.join(o.get('text', '')) for cell in out['cells'] for o in cell.get('outputs', []) if o.get('output_type') == 'stream')
    assert "exploration of 'train' (not a build)" in printed and 'Warning' not in printed, printed
    rec = json.loads((root/'build/explore/train/run.json').read_text())
    r = c.get_run(rec['run_id'])
    assert r.info.status == 'FINISHED' and r.data.tags['nbs.kind'] == 'explore' and r.data.tags['nbs.task'] == 'train'
    assert r.data.params['train.family'] == 'logistic_regression' and r.data.params['train.hyperparams.logistic_regression.C'] == '0.5'
    assert r.data.params['train.seed'] == '42' and r.data.params['train.hyperparams.logistic_regression.max_iter'] == '2000'  # from params.yaml
    assert r.data.tags['mlflow.source.name'] == 'notebooks/tasks/03_train.ipynb'
    assert 'notebooks/03_train.ipynb' in {a.path for a in c.list_artifacts(r.info.run_id, 'notebooks')}
    # a failure after the run started: the run ends FAILED, not RUNNING
    bad = run([*pm, str(tmp_path/'bad.ipynb'), '-y', '{train: {family: logistic_regression, hyperparams: {logistic_regression: {C: -1}}}}'],
              root, check=False)
    assert bad.returncode != 0
    assert sorted(x.info.status for x in _explore_runs(root)) == ['FAILED', 'FINISHED']
    # products given, and they are the pipeline's: refused with one line
    own = run([*pm, str(tmp_path/'own.ipynb'), '-f', 'params.yaml', '-y',
               '{upstream: {features: {train: build/features/train.parquet, test: build/features/test.parquet}}, product: {run: build/train/run.json}}'],
              root, check=False)
    assert own.returncode != 0 and "would write the pipeline's own products (build/train/run.json)" in own.stderr + own.stdout
    assert len(_explore_runs(root)) == 2
    # the build is still the build
    assert _products(root) == before
    after = c.get_run(build_run)
    assert (after.info.status, after.data.params, after.data.metrics) == (build_before.info.status, build_before.data.params, build_before.data.metrics)
    assert ran_tasks(nbs(root, 'build')) == []


def test_build_run_record_reads_back_through_the_mlflow_client(sample_project):
    """Experiment kind, datasets (train and test: digest, schema, source, md5, DVC sources), source, description and
    every stage's parameters, as the MLflow UI shows them."""
    c = MlflowClient(f"sqlite:///{sample_project/'mlflow.db'}")
    r = c.get_run(json.loads((sample_project/'build/train/run.json').read_text())['run_id'])
    assert c.get_experiment(r.info.experiment_id).tags['mlflow.experimentKind'] == 'custom_model_development'
    ds = {d.dataset.name: d for d in r.inputs.dataset_inputs}
    assert set(ds) == {'train', 'test'}
    for name, context in [('train', 'training'), ('test', 'testing')]:
        d, tags = ds[name].dataset, {t.key: t.value for t in ds[name].tags}
        assert d.digest and json.loads(d.source) == {'uri': f'build/features/{name}.parquet'}
        assert json.loads(d.schema)['mlflow_colspec']
        assert json.loads(d.profile)['num_rows'] > 1000
        assert tags['mlflow.data.context'] == context and tags['md5'] == r.data.tags[f'data.{name}.md5']
        assert tags['dvc.source'] == 'data/raw/flights.csv.zip, data/raw/weather.csv'
        assert tags['dvc.md5'] == f"{r.data.tags['dvc.raw_flights.md5']}, {r.data.tags['dvc.raw_weather.md5']}"
    assert r.data.tags['mlflow.source.name'] == 'pipeline.yaml' and r.data.tags['mlflow.source.type'] == 'LOCAL'
    assert r.data.tags['mlflow.note.content'].startswith('A build of pipeline.yaml')
    for stage, key in [('data', 'sample_frac'), ('split', 'test'), ('table', 'target.task'), ('train', 'family'),
                       ('evaluate', 'threshold'), ('monitor', 'psi_threshold')]:
        assert f'{stage}.{key}' in r.data.params, (stage, key)


def test_a_build_prints_a_line_per_task_and_the_summary(sample_project):
    out, err = (sample_project/'.build.stdout').read_text(), (sample_project/'.build.stderr').read_text()
    lines = out.strip().splitlines()
    assert [l.split()[0] for l in lines[:5]] == ['ingest', 'features', 'train', 'evaluate', 'monitor'] and all('ran in' in l for l in lines[:5])
    assert lines[5].startswith('build done') and len(lines) == 10, out
    run_id = json.loads((sample_project/'build/train/run.json').read_text())['run_id']  # its page, in the Model training view
    exp = MlflowClient(f"sqlite:///{sample_project/'mlflow.db'}").get_run(run_id).info.experiment_id
    assert lines[-1] == f'open it: make mlflow-ui, then http://127.0.0.1:5000/#/experiments/{exp}/runs/{run_id}?workflowType=machine_learning'
    assert err == '', err  # no warnings, no progress bars, no MLflow log lines


def test_dag_renders_offline_as_a_self_contained_file(built_copy):
    r = nbs(built_copy, 'dag')
    page = (built_copy/'build/pipeline.html').read_text()
    assert r.stdout.split() == [str(built_copy/'build/pipeline.svg'), str(built_copy/'build/pipeline.html')]
    assert '<script' not in page and 'src=' not in page and 'http' not in page.replace('http://www.w3.org/2000/svg', '')
    assert page.count('<rect') == 5 and page.count('marker-end') == 6
    assert page.count('up to date</title>') == 5  # built: nothing outdated
    assert not (built_copy/'pipeline.html').exists()


def _session_commands(sid: int) -> list[str]:
    """The command lines of the processes in session `sid` (a server started with start_new_session and its children)."""
    out = []
    for p in Path('/proc').iterdir():
        try:
            if p.name.isdigit() and int((p/'stat').read_text().rsplit(')', 1)[1].split()[3]) == sid:
                out.append((p/'cmdline').read_bytes().replace(b'\0', b' ').decode())
        except (OSError, IndexError, ValueError): pass  # gone meanwhile
    return out


def test_make_mlflow_ui_shows_the_builds_run_from_one_worker_without_job_runners(built_copy, tmp_path):
    root = built_copy
    shutil.copy2(ROOT/'Makefile', root/'Makefile'); (root/'.venv').symlink_to(BIN.parent)
    port, log = free_port(), tmp_path/'ui.log'
    ui = subprocess.Popen(['make', '-s', '-o', '.venv/.installed', 'mlflow-ui', f'UI_PORT={port}'], cwd=root, env=env_for(root),
                          start_new_session=True, stdout=log.open('w'), stderr=subprocess.STDOUT)
    base = f'http://127.0.0.1:{port}'
    try:
        deadline = time.monotonic() + 120
        while True:
            assert ui.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            try:
                with urllib.request.urlopen(f'{base}/health', timeout=5) as r:
                    if r.status == 200: break
            except OSError: time.sleep(0.2)
        run_id = json.loads((root/'build/train/run.json').read_text())['run_id']
        client = MlflowClient(f"sqlite:///{root/'mlflow.db'}")
        exp = client.get_run(run_id).info.experiment_id
        req = urllib.request.Request(f'{base}/ajax-api/2.0/mlflow/runs/search', method='POST',
                                     data=json.dumps({'experiment_ids': [exp]}).encode(), headers={'Content-Type': 'application/json'})
        with urllib.request.urlopen(req, timeout=30) as r: runs = json.loads(r.read())['runs']
        assert run_id in {x['info']['run_id'] for x in runs}  # the UI's own API serves the project's store
        with urllib.request.urlopen(f'{base}/', timeout=30) as r: assert b'<div id="root"' in r.read()  # the UI's page
        assert f'http://127.0.0.1:{port}/#/experiments' in log.read_text()  # the link it prints has the port asked for
        cmds = _session_commands(ui.pid)
        assert any('uvicorn' in c and '--workers 1' in c for c in cmds), cmds
        assert not [c for c in cmds if 'mlflow.server.jobs' in c or 'huey' in c], cmds  # no GenAI job runners
    finally:
        os.killpg(ui.pid, signal.SIGTERM)
        try: ui.wait(30)
        except subprocess.TimeoutExpired: os.killpg(ui.pid, signal.SIGKILL); ui.wait()
