"""Any project of this template, on its own data: what every generated project's `make test` proves (this file is
copied into each, see copier.yml). It reads the data spec from params.yaml and names no column: the sample build and
its MLflow run, an incremental no-op, a bad parameter, then the gate and the champion served over HTTP by a real
`bentoml serve`, its answers equal to the registered model's. Nothing is mocked."""
from __future__ import annotations
import httpx
import numpy as np
import pandas as pd
import pytest
import yaml
from mlflow.tracking import MlflowClient
from conftest import PROJECT_FILES, copy_project, env_for, metrics, nbs, ran_tasks, set_params
from servers import json_records, serving

TASK_METRICS = {'binary': {'roc_auc', 'log_loss', 'brier'}, 'regression': {'rmse', 'mae', 'r2'}}


def _params(root):
    return yaml.safe_load((root/'params.yaml').read_text())


def test_the_sample_build_logs_the_metrics_of_its_task_to_mlflow(sample_project):
    p = _params(sample_project); task = p['table']['target']['task']
    m = metrics(sample_project)
    assert m['task'] == task and TASK_METRICS[task] <= set(m['test']), m['test']
    run = MlflowClient(f"sqlite:///{sample_project/'mlflow.db'}").get_run(m['run_id'])
    assert run.info.status == 'FINISHED'
    for k in TASK_METRICS[task]:
        assert run.data.metrics[f'test_{k}'] == pytest.approx(m['test'][k], rel=1e-9)
    assert run.data.params['table.target.column'] == p['table']['target']['column']
    train = pd.read_parquet(sample_project/'build/features/train.parquet')
    assert list(train.columns) == list(p['table']['columns']) + [p['table']['target']['column']]


def test_a_second_build_runs_nothing_and_a_bad_param_is_named(built_copy):
    assert ran_tasks(nbs(built_copy, 'build')) == []
    set_params(built_copy, **{'train.seed': 'seven'})
    r = nbs(built_copy, 'build', check=False)
    assert r.returncode == 2 and 'train.seed' in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


@pytest.fixture(scope='module')
def served(sample_project, tmp_path_factory):
    """The sample build's model through the gate, then served by `bentoml serve` (1 worker)."""
    root = copy_project(tmp_path_factory.mktemp('served')/'p', src=sample_project, files=PROJECT_FILES + ['build', 'mlflow.db'])
    copy_project(root, files=['service.py', 'bentofile.yaml'])
    set_params(root, **{'gate.bootstrap.n_resamples': 200, 'serve.batching.max_latency_ms': 10000})
    g = nbs(root, 'register', '--from-build', check=False)
    assert g.returncode == 0, g.stdout[-2000:] + g.stderr[-2000:]  # the first candidate that reaches gate.min_metric
    home = str(root/'build/bentoml')
    nbs(root, 'serve', 'import', BENTOML_HOME=home)
    with serving(root, env_for(root, BENTOML_HOME=home, MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR='false')) as (url, _, _):
        yield {'root': root, 'client': httpx.Client(base_url=url, timeout=60)}


def test_the_champion_answers_over_http_as_the_registered_model_does(served):
    root, c = served['root'], served['client']
    p = _params(root); target = p['table']['target']['column']; task = p['table']['target']['task']
    record = c.get('/docs.json').json()['components']['schemas']['Record']
    assert set(record['required']) == set(p['table']['columns'])
    r = c.post('/predict', json={'records': [record['example']]})  # the Swagger page's example is accepted
    assert r.status_code == 200, r.text
    rows = pd.read_parquet(root/'build/features/test.parquet').head(50)
    got = c.post('/predict', json={'records': json_records(rows.drop(columns=[target]))})
    assert got.status_code == 200, got.text
    import mlflow
    from nbs_lib.tracking import load_model
    mlflow.set_tracking_uri(f"sqlite:///{root/'mlflow.db'}")
    model = load_model(f"models:/{p['registry']['model_name']}@champion")
    X = rows.drop(columns=[target])
    want = model.predict_proba(X)[:, 1] if task == 'binary' else model.predict(X)
    key = 'probability' if task == 'binary' else 'prediction'
    assert np.allclose([a[key] for a in got.json()], want, rtol=0, atol=1e-9)


def test_a_bad_request_is_a_400_naming_the_field(served):
    c = served['client']
    record = c.get('/docs.json').json()['components']['schemas']['Record']
    first = record['required'][0]
    r = c.post('/predict', json={'records': [{k: v for k, v in record['example'].items() if k != first}]})
    assert r.status_code == 400 and first in r.text, r.text
    assert c.post('/predict', content=b'{"records": [', headers={'content-type': 'application/json'}).status_code == 400
