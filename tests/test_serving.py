"""The BentoML service against a real `bentoml serve` on loopback: the champion of a real sample build, registered
with the real MLflow API, imported into a project-local BentoML store, served, and called over HTTP."""
from __future__ import annotations
import json, re, subprocess, time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
import httpx
import mlflow
import numpy as np
import pandas as pd
import pytest
import yaml
from mlflow.tracking import MlflowClient
from conftest import BIN, PROJECT_FILES, ROOT, copy_project, env_for, nbs, set_params
from servers import free_port, json_records, serving

MODEL = 'flights-delay'
MAX_BATCH = 50
PAGE = 'http://localhost:8888'  # a web page allowed to call the service (serve.cors_origins)
SERVE = {'serve.max_batch': MAX_BATCH, 'serve.workers': 2, 'serve.shadow': True, 'serve.log_flush_seconds': 0.2,
         'serve.batching.max_latency_ms': 10000,  # a busy shared test machine must not turn into 503s
         'serve.cors_origins': [PAGE]}


def _register(root: Path) -> None:
    """The gate's outcome, made with the real MLflow API: the build's model as version 1 (champion) and 2 (challenger)."""
    mlflow.set_tracking_uri(f"sqlite:///{root/'mlflow.db'}")
    uri = json.loads((root/'build/train/run.json').read_text())['model_uri']
    client = MlflowClient()
    for alias in ('champion', 'challenger'):
        mv = mlflow.register_model(uri, MODEL)
        client.set_registered_model_alias(MODEL, alias, mv.version)


def _env(root: Path, **extra) -> dict:
    return env_for(root, **{'BENTOML_HOME': str(root/'build/bentoml'), 'MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR': 'false', **extra})


@pytest.fixture(scope='module')
def served(sample_project, tmp_path_factory):
    """A copy of the built sample project with a champion and a challenger, imported, served (2 workers, shadow on)."""
    root = copy_project(tmp_path_factory.mktemp('serve')/'proj', src=sample_project, files=PROJECT_FILES + ['build', 'mlflow.db'])
    copy_project(root, files=['service.py', 'bentofile.yaml'])
    set_params(root, **SERVE)
    _register(root)
    r = nbs(root, 'serve', 'import', BENTOML_HOME=str(root/'build/bentoml'), MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR='false')
    with serving(root, _env(root)) as (url, proc, ready):
        print(f"\nbentoml serve ready in {ready:.1f}s (2 workers, champion + challenger)")
        yield {'root': root, 'url': url, 'import_out': r.stdout, 'client': httpx.Client(base_url=url, timeout=60)}


def _test_rows(root: Path, n: int) -> pd.DataFrame:
    """`n` test rows, missing weather included."""
    te = pd.read_parquet(root/'build/features/test.parquet')
    miss = te[te['wind_gust'].isna() & te['pressure'].isna()].head(5)
    return pd.concat([miss, te.sample(n - len(miss), random_state=0)]).drop(columns=['late']).reset_index(drop=True)


def _champion_proba(root: Path, X: pd.DataFrame) -> np.ndarray:
    from nbs_lib.tracking import load_model
    mlflow.set_tracking_uri(f"sqlite:///{root/'mlflow.db'}")
    return load_model(f'models:/{MODEL}@champion').predict_proba(X)[:, 1]


def _predict(c: httpx.Client, records: list[dict]) -> list[dict]:
    r = c.post('/predict', json={'records': records})
    assert r.status_code == 200, r.text
    return r.json()


def test_import_labels_the_bentoml_model_and_is_idempotent(served):
    root = served['root']
    m = re.search(r'champion: (flights-delay-champion:\w+) \(MLflow flights-delay v1, run (\w+)\)', served['import_out'])
    assert m, served['import_out']
    info = yaml.safe_load((root/'build/bentoml/models/flights-delay-champion'/m.group(1).split(':')[1]/'model.yaml').read_text())
    run_id = json.loads((root/'build/train/run.json').read_text())['run_id']
    lb = info['labels']
    assert lb['run_id'] == run_id == m.group(2) and lb['version'] == '1' and lb['alias'] == 'champion'
    assert float(lb['test_roc_auc']) == pytest.approx(json.loads((root/'build/evaluate/metrics.json').read_text())['test']['roc_auc'], abs=1e-5)
    assert info['metadata']['categories']['origin'] == ['EWR', 'JFK', 'LGA'] and json.loads(info['metadata']['example'])['year'] == 2013
    assert 'challenger: flights-delay-challenger:' in served['import_out']  # shadow mode imports the challenger too
    again = nbs(root, 'serve', 'import', BENTOML_HOME=str(root/'build/bentoml'))
    assert m.group(1) in again.stdout  # the store already holds that version: nothing imported
    assert len(list((root/'build/bentoml/models/flights-delay-champion').glob('*/model.yaml'))) == 1


def test_predictions_over_http_equal_the_mlflow_champion_in_process(served):
    root, c = served['root'], served['client']
    X = _test_rows(root, 120)
    expected = _champion_proba(root, X)
    recs = json_records(X)
    got = [p for i in range(0, len(recs), MAX_BATCH) for p in _predict(c, recs[i:i + MAX_BATCH])]
    assert len(got) == len(X)
    assert np.max(np.abs(np.array([g['probability'] for g in got]) - expected)) <= 1e-9
    singles = [_predict(c, [r])[0]['probability'] for r in recs[:12]]  # one flight a request, the latency path
    assert np.max(np.abs(np.array(singles) - expected[:12])) <= 1e-9
    th = yaml.safe_load((root/'params.yaml').read_text())['evaluate']['threshold']
    assert [g['decision'] for g in got] == list(expected >= th) and {g['model_version'] for g in got} == {'1'}
    # the file path: parquet in, parquet out; CSV in, CSV out; the same numbers
    for suffix in ('parquet', 'csv'):
        f = root/f'rows.{suffix}'
        X.assign(flight_id=range(len(X))).to_parquet(f) if suffix == 'parquet' else X.assign(flight_id=range(len(X))).to_csv(f, index=False)
        r = c.post('/predict_file', files={'file': (f.name, f.read_bytes())})
        assert r.status_code == 200, r.text
        out = root/f'scored.{suffix}'; out.write_bytes(r.content)
        s = pd.read_parquet(out) if suffix == 'parquet' else pd.read_csv(out)
        assert s['flight_id'].tolist() == list(range(len(X)))  # the caller's own columns come back
        assert np.max(np.abs(s['probability'].to_numpy() - expected)) <= 1e-9, suffix
        assert s['decision'].tolist() == list(expected >= th) and set(s['model_version'].astype(str)) == {'1'}


def test_unknown_categories_are_scored_as_unknown_and_named(served):
    root, c = served['root'], served['client']
    X = _test_rows(root, 6).assign(dest='ZZZ')
    got = _predict(c, json_records(X))
    assert all(g['unknown_categories'] == ['dest'] for g in got)
    assert np.max(np.abs(np.array([g['probability'] for g in got]) - _champion_proba(root, X))) <= 1e-9


def _ok(served) -> dict:
    return json_records(_test_rows(served['root'], 6))[5]


BAD_JSON = [  # (name, body builder, text that must be in the answer)
    ('wrong type', lambda ok: {'records': [dict(ok, month='ten')]}, "'month'"),
    ('float for an int', lambda ok: {'records': [dict(ok, sched_dep_time=14.5)]}, "'sched_dep_time'"),
    ('missing field', lambda ok: {'records': [{k: v for k, v in ok.items() if k != 'carrier'}]}, "'carrier'"),
    ('unknown field', lambda ok: {'records': [dict(ok, temperature=50.0)]}, "'temperature'"),
    ('month out of range', lambda ok: {'records': [dict(ok, month=13)]}, "'month'"),
    ('humidity out of range', lambda ok: {'records': [dict(ok, humid=130.0)]}, "'humid'"),
    ('not an hhmm time', lambda ok: {'records': [dict(ok, sched_arr_time=1275)]}, 'hhmm'),
    ('no such date', lambda ok: {'records': [dict(ok, month=2, day=30)]}, 'day 30 does not exist'),
    ('negative distance', lambda ok: {'records': [dict(ok, distance=-5.0)]}, "'distance'"),
    ('empty list', lambda ok: {'records': []}, 'at least 1'),
    ('over serve.max_batch', lambda ok: {'records': [ok] * (MAX_BATCH + 1)}, f'at most {MAX_BATCH}'),
    ('no records key', lambda ok: {'rows': [ok]}, "'records'"),
]


@pytest.mark.parametrize('name, body, expected', BAD_JSON, ids=[b[0] for b in BAD_JSON])
def test_bad_json_answers_400_naming_the_field(served, name, body, expected):
    r = served['client'].post('/predict', json=body(_ok(served)))
    assert r.status_code == 400, (r.status_code, r.text)
    assert expected in json.dumps(r.json()).replace('"', "'"), r.text


@pytest.mark.parametrize('raw, field', [
    ('NaN', 'temp'), ('Infinity', 'distance'), ('-Infinity', 'dewp'), ('"NaN"', 'precip'), ('1e999', 'visib')])
def test_nan_and_infinite_numbers_answer_400(served, raw, field):
    body = json.dumps({'records': [dict(_ok(served), **{field: '__raw__'})]}).replace('"__raw__"', raw)
    r = served['client'].post('/predict', content=body, headers={'content-type': 'application/json'})
    assert r.status_code == 400 and field in r.text, (raw, r.status_code, r.text)


@pytest.mark.parametrize('content, expected', [
    (b'{"records": [{"year": 2013,', 'Invalid JSON'),
    (b'\x00\x01\x02 not json at all', 'Invalid JSON'),
])
def test_malformed_json_answers_400(served, content, expected):
    r = served['client'].post('/predict', content=content, headers={'content-type': 'application/json'})
    assert r.status_code == 400 and expected in r.text, r.text


def _file_cases(X: pd.DataFrame) -> list:
    png = b'\x89PNG\r\n\x1a\n' + bytes(range(256)) * 8
    return [('image.png', png, 'not a parquet or CSV file'),
            ('notes.csv', b'just some words\nwithout the columns\n', 'not a parquet or CSV file with the input columns'),
            ('rows.csv', X.drop(columns=['dest']).to_csv(index=False).encode(), "missing columns ['dest']"),
            ('rows.csv', X.assign(month=13).to_csv(index=False).encode(), "column 'month': outside [1, 12]"),
            ('rows.csv', X.assign(distance=np.inf).to_csv(index=False).encode(), "column 'distance': infinite"),
            ('rows.csv', X.assign(carrier=None).to_csv(index=False).encode(), "column 'carrier': empty or null"),
            ('empty.csv', b'', 'not a parquet or CSV file')]


def test_bad_files_answer_400_naming_the_problem(served):
    X = _test_rows(served['root'], 6)
    for name, content, expected in _file_cases(X):
        r = served['client'].post('/predict_file', files={'file': (name, content)})
        assert r.status_code == 400 and expected in r.json()['error'], (name, r.status_code, r.text)


def test_health_readiness_metrics_and_openapi(served):
    c = served['client']
    for ep in ('/healthz', '/livez', '/readyz'): assert c.get(ep).status_code == 200, ep
    m = c.get('/metrics')
    assert m.status_code == 200 and 'bentoml_service_request_total' in m.text and 'endpoint="/predict"' in m.text
    spec = c.get('/docs.json').json()
    flight = json.dumps(spec)
    assert 'known: EWR, JFK, LGA' in flight and '"example"' in flight and f'"maxItems": {MAX_BATCH}' in flight


def test_a_page_of_an_allowed_origin_calls_predict_from_a_browser_others_cannot(served):
    """CORS (serve.cors_origins): the browser's preflight, then its POST and a bad one, carry the header; a program's
    request (no Origin) answers as before, without it; a page of another origin is refused at the preflight."""
    c, rec = served['client'], _ok(served)
    pre = c.options('/predict', headers={'origin': PAGE, 'access-control-request-method': 'POST', 'access-control-request-headers': 'content-type'})
    assert pre.status_code == 200 and pre.headers['access-control-allow-origin'] == PAGE and 'POST' in pre.headers['access-control-allow-methods']
    other = c.options('/predict', headers={'origin': 'http://elsewhere.example', 'access-control-request-method': 'POST'})
    assert other.status_code == 400 and 'access-control-allow-origin' not in other.headers
    r = c.post('/predict', json={'records': [rec]}, headers={'origin': PAGE})
    assert r.status_code == 200 and r.headers['access-control-allow-origin'] == PAGE and r.json()[0]['model_version'] == '1', r.text
    r = c.post('/predict', json={'records': [dict(rec, month=13)]}, headers={'origin': PAGE})
    assert r.status_code == 400 and r.headers['access-control-allow-origin'] == PAGE and r.json()['detail'][0]['loc'] == ['records', 0, 'month']
    r = c.post('/predict', json={'records': [rec]})
    assert r.status_code == 200 and 'access-control-allow-origin' not in r.headers and r.json()[0]['model_version'] == '1'


def test_server_stays_up_after_bad_requests(served):
    """Run after the bad-input tests (file order): still ready, still answering, no 5xx in its log."""
    c = served['client']
    assert c.get('/readyz').status_code == 200
    assert len(_predict(c, [_ok(served)])) == 1
    log = (served['root']/'server.log').read_text()
    assert 'status=400' in log and not re.search(r'status=5\d\d', log), log[-3000:]  # 4xx answers only, never a 5xx


def test_prediction_log_holds_every_prediction_and_the_shadow(served):
    """Concurrent requests over 2 workers with adaptive batching: each record is logged once by the champion with
    the probability it was answered, once by the challenger (shadow), never returned."""
    from nbs_lib.data import DataSpec
    from nbs_lib.predlog import log_columns, read_prediction_log
    spec = DataSpec.from_params(yaml.safe_load((served['root']/'params.yaml').read_text()))
    root, c = served['root'], served['client']
    recs = json_records(_test_rows(root, 30))
    t0 = pd.Timestamp.now(tz='UTC')
    with ThreadPoolExecutor(8) as ex:
        answers = list(ex.map(lambda i: _predict(c, recs[i % 27:i % 27 + 3]), range(40)))
    by_rid = {a[0]['request_id']: a for a in answers}
    assert len(by_rid) == 40 and all(len({p['request_id'] for p in a}) == 1 for a in answers)
    assert {p['model_version'] for a in answers for p in a} == {'1'}  # the challenger never answers
    folder = root/yaml.safe_load((root/'params.yaml').read_text())['serve']['prediction_log']
    deadline = time.monotonic() + 30
    while True:
        log = read_prediction_log(folder, spec)
        log = log[log['request_id'].isin(by_rid)]
        if len(log) >= 240 or time.monotonic() > deadline: break
        time.sleep(0.3)
    assert list(log.columns) == log_columns(spec)
    champ, shadow = log[~log['shadow']], log[log['shadow']]
    assert len(champ) == 120 and len(shadow) == 120, (len(champ), len(shadow))
    assert set(champ['model_version']) == {'1'} and set(shadow['model_version']) == {'2'}
    assert (champ['timestamp'] >= t0 - pd.Timedelta(seconds=1)).all()
    for rid, a in by_rid.items():
        rows = champ[champ['request_id'] == rid]
        assert sorted(rows['probability']) == sorted(p['probability'] for p in a)
    assert not list(folder.glob('.*.tmp'))


def test_no_champion_fails_in_one_line_saying_to_run_the_gate(served, tmp_path):
    root = served['root']
    # `make serve` / `nbs serve`: an MLflow store (it exists: no first-use table creation logs) without a champion
    empty = f"sqlite:///{tmp_path/'empty.db'}"
    MlflowClient(empty).search_experiments()
    r = nbs(root, 'serve', 'run', '--port', str(free_port()), check=False, MLFLOW_TRACKING_URI=empty,
            BENTOML_HOME=str(tmp_path/'bentoml'))
    assert r.returncode == 2, r.stdout + r.stderr
    line = r.stderr.strip().splitlines()
    assert len(line) == 1 and line[0].startswith('error: no champion') and 'make register' in line[0], r.stderr
    # plain `bentoml serve` on a BentoML store without the champion
    p = subprocess.run([str(BIN/'bentoml'), 'serve', 'service:Predictor', '--port', str(free_port())], cwd=root,
                       env=_env(root, BENTOML_HOME=str(tmp_path/'bentoml')), capture_output=True, text=True, timeout=300)
    assert p.returncode != 0
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('error: no champion') and 'make register' in lines[0], p.stderr


def _lock_pins() -> dict:
    return {l.split('==')[0].lower(): l.split('==')[1].split()[0] for l in (ROOT/'requirements.lock').read_text().splitlines() if '==' in l and l[0].isalnum()}


def test_bentofile_pins_follow_the_lock():
    cfg = yaml.safe_load((ROOT/'bentofile.yaml').read_text())
    assert cfg['python']['lock_packages'] is False and cfg['docker']['python_version'] == '3.11'
    lock = _lock_pins()
    for pin in cfg['python']['packages']:
        name, version = pin.split('==')
        assert lock.get(name.lower()) == version, f"bentofile.yaml pins {pin}, requirements.lock has {lock.get(name.lower())}: update bentofile.yaml"


def test_bento_build_contents_dockerfile_and_container(served):
    root = served['root']
    r = nbs(root, 'serve', 'build', BENTOML_HOME=str(root/'build/bentoml'), MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR='false')
    path = Path(re.search(r'^bento: \S+ at (\S+)$', r.stdout, re.M).group(1))
    src = {str(p.relative_to(path/'src')) for p in (path/'src').rglob('*') if p.is_file()}
    assert {'service.py', 'params.yaml', 'bentofile.yaml', 'nbs_lib/serving.py', 'nbs_lib/features.py'} <= src
    assert not any(s.startswith(('build/', 'mlartifacts/', 'data/')) or s.endswith('.db') for s in src), sorted(src)
    bento = yaml.safe_load((path/'bento.yaml').read_text())
    tags = {m['tag'].split(':')[0] for s in bento['services'] for m in s['models']}
    assert tags == {'flights-delay-champion', 'flights-delay-challenger'}  # shadow mode: both models go in
    dockerfile = (path/'env/docker/Dockerfile').read_text()
    assert re.search(r'^FROM python:3\.11-slim\b', dockerfile, re.M) and 'requirements.txt' in dockerfile
    reqs = (path/'env/python/requirements.txt').read_text().split()
    lock = _lock_pins()
    for pkg in ('bentoml', 'mlflow-skinny', 'scikit-learn', 'skops', 'pandas', 'pyarrow'):
        assert f'{pkg}=={lock[pkg]}' in reqs, (pkg, reqs)
    from nbs_lib.serving import container_engine
    if container_engine() is not None: pytest.skip('a container engine is running here: `make container` builds for real')
    c = nbs(root, 'serve', 'containerize', check=False, BENTOML_HOME=str(root/'build/bentoml'))
    assert c.returncode == 2 and c.stderr.strip().splitlines()[-1].startswith('error: no container engine'), c.stderr
    assert str(path/'env/docker/Dockerfile') in c.stderr
