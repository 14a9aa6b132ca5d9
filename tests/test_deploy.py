"""Deployment patterns on the registry (issue 15): the promotion gate's move of `champion` is a compare-and-set under
a lock held in the registry itself, so two `nbs register` started at once never both promote over the same old
champion; every move is recorded, and `nbs rollback` walks one back. Real sqlite MLflow registry, real processes."""
from __future__ import annotations
import json, subprocess, threading, time
import httpx
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient
from conftest import BIN, PROJECT_FILES, copy_project, env_for, nbs, set_params
from servers import json_records, serving

NAME = 'flights-delay'


def _run_id(root):
    return json.loads((root/'build/train/run.json').read_text())['run_id']


@pytest.fixture(scope='module')
def registry(sample_project, tmp_path_factory):
    """Three runs of the sample: a deliberately weak one (champion first), and two good ones that both beat it."""
    root = copy_project(tmp_path_factory.mktemp('deploy')/'p', src=sample_project, files=PROJECT_FILES + ['build', 'mlflow.db'])
    set_params(root, **{'gate.bootstrap.n_resamples': 300, 'gate.min_metric': 0.5})
    good = _run_id(root)
    set_params(root, **{'train.hyperparams.hist_gradient_boosting.max_iter': 2, 'train.hyperparams.hist_gradient_boosting.max_leaf_nodes': 2})
    nbs(root, 'build'); weak = _run_id(root)
    set_params(root, **{'train.hyperparams.hist_gradient_boosting.max_iter': 200, 'train.hyperparams.hist_gradient_boosting.max_leaf_nodes': 31,
                        'train.hyperparams.hist_gradient_boosting.learning_rate': 0.05})
    nbs(root, 'build'); other = _run_id(root)
    r = nbs(root, 'register', '--run', weak, '--json')
    assert json.loads(r.stdout[r.stdout.index('{'):r.stdout.rindex('}') + 1])['decision'] == 'promoted'
    return {'root': root, 'weak': weak, 'good': good, 'other': other, 'client': MlflowClient(f"sqlite:///{root/'mlflow.db'}")}


def _report(stdout: str) -> dict:
    return json.loads(stdout[stdout.index('{\n'):stdout.rindex('\n}') + 2])


def test_two_gates_at_once_never_promote_over_the_same_champion(registry):
    root, c = registry['root'], registry['client']
    weak_version = c.get_model_version_by_alias(NAME, 'champion').version
    procs = [subprocess.Popen([str(BIN/'nbs'), 'register', '--run', registry[k], '--json'], cwd=root, env=env_for(root),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for k in ('good', 'other')]
    outs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode in (0, 3) for p in procs), [o[1][-2000:] for o in outs]
    reports = [_report(o[0]) for o in outs]
    history = json.loads(c.get_registered_model(NAME).tags['nbs.champion_history'])
    # every move starts from the champion of the move before it: no two promotions over the same old champion
    assert [e['previous'] for e in history[1:]] == [e['version'] for e in history[:-1]], history
    promoted = [r for r in reports if r['decision'] == 'promoted']
    assert promoted, [r['reason'] for r in reports]  # both beat the weak champion: at least one is promoted over it
    assert sum(r['champion']['version'] == int(weak_version) for r in promoted) == 1, [(r['decision'], r['champion']) for r in reports]
    if len(promoted) == 1:  # the other was judged (again, if it raced) against the new champion, not the weak one
        other = next(r for r in reports if r['decision'] != 'promoted')
        assert other['champion']['version'] == promoted[0]['candidate']['version'], other['reason']
    assert str(c.get_model_version_by_alias(NAME, 'champion').version) == history[-1]['version']
    assert [m.name for m in c.search_registered_models()] == [NAME]  # the lock is gone


def test_blue_green_rollback_switches_a_running_service_with_no_failed_request(registry):
    """Serve the champion, keep a light load on it, roll back and import: the service swaps models between requests."""
    root, c = registry['root'], registry['client']
    copy_project(root, files=['service.py', 'bentofile.yaml'])
    history = json.loads(c.get_registered_model(NAME).tags['nbs.champion_history'])
    current, before = history[-1]['version'], history[-2]['version']
    home = str(root/'build/bentoml')
    nbs(root, 'serve', 'import', BENTOML_HOME=home)
    with serving(root, env_for(root, BENTOML_HOME=home, MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR='false')) as (url, _, _):
        client = httpx.Client(base_url=url, timeout=30)
        example = client.get('/docs.json').json()['components']['schemas']['Record']['example']
        answers, stop = [], threading.Event()
        def load():  # about 30 requests a second, one at a time
            while not stop.is_set():
                r = client.post('/predict', json={'records': [example]})
                answers.append((r.status_code, r.json()[0]['model_version'] if r.status_code == 200 else r.text))
                time.sleep(0.03)
        t = threading.Thread(target=load); t.start()
        try:
            time.sleep(1)
            r = nbs(root, 'rollback', '--reason', 'the test says so')
            assert f'champion version {current} -> {before}' in r.stdout
            nbs(root, 'serve', 'import', BENTOML_HOME=home)
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and not (answers and answers[-1][1] == before): time.sleep(0.2)
            time.sleep(1)
        finally:
            stop.set(); t.join()
    assert answers and all(code == 200 for code, _ in answers), [a for a in answers if a[0] != 200][:5]
    versions = [v for _, v in answers]
    switch = versions.index(before)
    assert set(versions[:switch]) == {current} and set(versions[switch:]) == {before}, versions  # one switch, never back
    assert str(c.get_model_version_by_alias(NAME, 'champion').version) == before
    last = json.loads(c.get_registered_model(NAME).tags['nbs.champion_history'])[-1]
    assert (last['by'], last['version'], last['previous'], last['reason']) == ('rollback', before, current, 'the test says so')
    assert 'nbs.rolled_back' in c.get_model_version(NAME, current).tags
    assert 'champion switched' in (root/'server.log').read_text()


def test_rollback_refuses_in_one_line_when_there_is_no_previous_champion(registry):
    root, c = registry['root'], registry['client']
    champion = c.get_model_version_by_alias(NAME, 'champion').version
    history = json.loads(c.get_registered_model(NAME).tags['nbs.champion_history'])
    r = nbs(root, 'rollback', check=False)
    assert r.returncode == 2 and r.stderr.strip().count('\n') == 0 and 'has no previous champion' in r.stderr, r.stderr
    assert c.get_model_version_by_alias(NAME, 'champion').version == champion
    assert json.loads(c.get_registered_model(NAME).tags['nbs.champion_history']) == history  # nothing moved or recorded


def test_a_canary_answers_its_share_on_a_running_service_and_the_monitor_compares_both(registry):
    """`nbs canary` on a running service: the challenger answers about that share, each answer names its version; the
    monitor then reports each version's predictions side by side; `--fraction 0` ends it. No restart."""
    root, c = registry['root'], registry['client']
    champ, chall = (str(c.get_model_version_by_alias(NAME, a).version) for a in ('champion', 'challenger'))
    if chall == champ:  # which gate of the race above set `challenger` last decides this: make it another version
        chall = next(v.version for v in c.search_model_versions(f"name = '{NAME}'") if str(v.version) != champ)
        c.set_registered_model_alias(NAME, 'challenger', chall)
    set_params(root, **{'serve.log_flush_seconds': 0.2, 'monitor.min_rows': 50})
    copy_project(root, files=['service.py', 'bentofile.yaml'])
    home = str(root/'build/bentoml')
    nbs(root, 'serve', 'import', BENTOML_HOME=home)
    with serving(root, env_for(root, BENTOML_HOME=home, MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR='false')) as (url, _, _):
        client = httpx.Client(base_url=url, timeout=30)
        rows = json_records(pd.read_parquet(root/'build/features/test.parquet').drop(columns=['late']).head(400))
        sent = iter(range(10**6))
        def ask(n):  # one record a request, the test rows in turn
            out = [client.post('/predict', json={'records': [rows[next(sent) % len(rows)]]}) for _ in range(n)]
            assert all(r.status_code == 200 for r in out), [r.text for r in out if r.status_code != 200][:3]
            return [r.json()[0]['model_version'] for r in out]
        assert set(ask(20)) == {champ}
        r = nbs(root, 'canary', '--fraction', '0.5', BENTOML_HOME=home)
        assert 'serve.canary.fraction: 0.5' in r.stdout and 'fraction: 0.5' in (root/'params.yaml').read_text()
        deadline = time.monotonic() + 60
        while chall not in ask(10) and time.monotonic() < deadline: time.sleep(0.3)
        versions = ask(300)
        assert set(versions) == {champ, chall} and 0.38 < versions.count(chall) / 300 < 0.62, versions.count(chall)
        nbs(root, 'canary', '--fraction', '0', BENTOML_HOME=home)
        deadline = time.monotonic() + 60
        while chall in ask(20) and time.monotonic() < deadline: time.sleep(0.3)
        assert set(ask(40)) == {champ}
    nbs(root, 'monitor', '--no-mlflow')
    batches = json.loads((root/'build/monitor/drift.json').read_text())['batches']
    for v in (champ, chall):
        b = batches[f'serving v{v}']
        assert b['source'] == 'prediction log' and b['rows'] >= 50 and b['prediction']['psi'] >= 0, b.get('message')
    assert batches[f'serving v{champ}']['prediction']['mean'] != batches[f'serving v{chall}']['prediction']['mean']
