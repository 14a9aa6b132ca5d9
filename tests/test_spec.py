"""The data spec drives every stage. One project of the sample, changed through params.yaml only: a raw column the
example never used (`tailnum`) is added as a feature, and the target becomes a regression one (the arrival delay in
minutes). It is then built, swept, gated, served over HTTP by a real `bentoml serve`, and monitored on the
prediction log that service wrote. Nothing is mocked; the workflow's modules are also checked to name no column."""
from __future__ import annotations
import ast, json
from pathlib import Path
import httpx
import numpy as np
import pandas as pd
import pytest
import yaml
from mlflow.tracking import MlflowClient
from conftest import PROJECT_FILES, ROOT, copy_project, env_for, metrics, nbs, set_params
from servers import json_records, serving

MODEL = 'delay-minutes'
# the whole change, in params.yaml: a new input column and a regression target; metrics of the task for sweep and gate
SPEC = {'table.columns.tailnum': {'dtype': 'category', 'role': 'categorical', 'doc': 'aircraft tail number'},
        'table.target': {'column': 'arr_delay', 'task': 'regression'},
        'train.hyperparams.hist_gradient_boosting.max_iter': 60,
        'sweep.metric': 'test_rmse', 'sweep.grid': {'hyperparams.hist_gradient_boosting.learning_rate': [0.05, 0.2]},
        'gate.metric': 'rmse', 'gate.min_metric': 1000.0, 'gate.bootstrap.n_resamples': 200,
        'registry.model_name': MODEL, 'tracking.experiment': 'delay-minutes',
        'serve.log_flush_seconds': 0.2, 'serve.batching.max_latency_ms': 10000,
        'monitor.min_rows': 50}


@pytest.fixture(scope='module')
def project(sample_project, tmp_path_factory):
    """The sample project with SPEC applied, built (the raw data and ingest products of the sample are reused)."""
    root = copy_project(tmp_path_factory.mktemp('spec')/'proj', src=sample_project, files=PROJECT_FILES)
    copy_project(root, files=['service.py', 'bentofile.yaml'])
    set_params(root, **SPEC)
    r = nbs(root, 'build')
    return {'root': root, 'build': r}


def _params(root: Path) -> dict:
    return yaml.safe_load((root/'params.yaml').read_text())


def test_a_column_added_in_params_reaches_the_table_and_the_model(project):
    root = project['root']
    train = pd.read_parquet(root/'build/features/train.parquet')
    assert 'tailnum' in train.columns and train['tailnum'].notna().all()
    assert list(train.columns)[-1] == 'arr_delay' and train['arr_delay'].dtype == 'float64'
    from nbs_lib.tracking import load_model
    import mlflow
    mlflow.set_tracking_uri(f"sqlite:///{root/'mlflow.db'}")
    model = load_model(json.loads((root/'build/train/run.json').read_text())['model_uri'])
    assert 'tailnum' in list(model.feature_names_in_)
    assert 'tailnum' in model.named_steps['prep'].transformers_[0][2]  # a categorical feature of the model
    drift = json.loads((root/'build/monitor/drift.json').read_text())
    assert 'tailnum' in drift['reference']['features']['categorical']


def test_regression_metrics_plots_and_by_period_slices(project):
    root = project['root']
    m = metrics(root)
    assert m['task'] == 'regression' and {'rmse', 'mae', 'r2'} <= set(m['test'])
    assert 10 < m['test']['rmse'] < 100 and m['test']['mae'] < m['test']['rmse']
    assert {r['month'] for r in m['by_month']} == {10, 11, 12} and all('rmse' in r for r in m['by_month'])
    plots = {p.name for p in (root/'build/evaluate/plots').glob('*.png')}
    assert {'predicted.png', 'residuals.png', 'rmse_by_month.png', 'importance.png'} <= plots, plots
    run = MlflowClient(f"sqlite:///{root/'mlflow.db'}").get_run(m['run_id'])
    assert run.data.metrics['test_rmse'] == pytest.approx(m['test']['rmse'])
    assert 'test_roc_auc' not in run.data.metrics


def test_regression_sweep_ranks_by_rmse_and_the_gate_promotes(project):
    root = project['root']
    nbs(root, 'sweep', '--jobs', '1')
    table = pd.read_csv(next((root/'build/sweep').glob('*/results.csv')))
    assert len(table) == 2 and table['test_rmse'].is_monotonic_increasing  # lower is better, best first
    g = nbs(root, 'register', check=False)
    assert g.returncode == 0, g.stdout + g.stderr
    rep = json.loads((root/'build/gate/report.json').read_text())
    assert rep['decision'] == 'promoted' and rep['metric'] == 'rmse' and rep['greater_is_better'] is False
    assert rep['candidate']['metric'] == pytest.approx(table['test_rmse'].iloc[0], rel=1e-6)
    c = MlflowClient(f"sqlite:///{root/'mlflow.db'}")
    parent = c.search_runs([c.get_experiment_by_name('delay-minutes').experiment_id], "tags.`nbs.kind` = 'sweep'")[0]
    assert parent.data.tags['nbs.metric'] == 'test_rmse' and parent.data.tags['nbs.greater_is_better'] == 'false'


@pytest.fixture(scope='module')
def served(project):
    """The regression champion, imported and served by `bentoml serve` (1 worker)."""
    root = project['root']
    if not (root/'build/gate/report.json').exists():
        nbs(root, 'register', '--from-build')
    env = env_for(root, BENTOML_HOME=str(root/'build/bentoml'), MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR='false')
    nbs(root, 'serve', 'import', BENTOML_HOME=str(root/'build/bentoml'))
    with serving(root, env) as (url, _, _):
        yield {'root': root, 'client': httpx.Client(base_url=url, timeout=60)}


def test_the_service_schema_carries_the_new_column_and_its_example_is_accepted(served):
    c = served['client']
    schema = c.get('/docs.json').json()['components']['schemas']
    record = schema['Record']
    assert 'tailnum' in record['properties'] and 'tailnum' in record['required']
    example = record['example']
    assert isinstance(example['year'], int) and 'tailnum' in example  # integers stay integers in the example
    r = c.post('/predict', json={'records': [example]})  # "Try it out" on the Swagger page
    assert r.status_code == 200, r.text
    answer = r.json()[0]
    assert set(answer) >= {'prediction', 'model_version', 'request_id'} and 'probability' not in answer
    bad = c.post('/predict', json={'records': [{k: v for k, v in example.items() if k != 'tailnum'}]})
    assert bad.status_code == 400 and 'tailnum' in bad.text


def test_served_regression_answers_equal_the_model_and_the_monitor_reads_the_log(served):
    root, c = served['root'], served['client']
    test = pd.read_parquet(root/'build/features/test.parquet')
    rows = test.sample(120, random_state=1).reset_index(drop=True)
    recs = json_records(rows.drop(columns=['arr_delay']))
    got = [p for i in range(0, len(recs), 40) for p in c.post('/predict', json={'records': recs[i:i + 40]}).json()]
    import mlflow
    from nbs_lib.tracking import load_model
    mlflow.set_tracking_uri(f"sqlite:///{root/'mlflow.db'}")
    want = load_model(f'models:/{MODEL}@champion').predict(rows.drop(columns=['arr_delay']))
    assert np.allclose([p['prediction'] for p in got], want, rtol=0, atol=1e-9)
    # the prediction log holds the values answered; the monitor reads it as a batch of its own, with labels joined
    from nbs_lib.data import DataSpec
    from nbs_lib.predlog import read_prediction_log
    spec = DataSpec.from_params(_params(root))
    folder = root/_params(root)['serve']['prediction_log']
    import time
    deadline = time.monotonic() + 30
    while len(log := read_prediction_log(folder, spec)) < 120 and time.monotonic() < deadline: time.sleep(0.3)
    assert len(log) >= 120 and 'prediction' in log.columns and 'probability' not in log.columns and 'tailnum' in log.columns
    r = nbs(root, 'monitor', '--no-mlflow')
    d = json.loads((root/'build/monitor/drift.json').read_text())
    serving = d['batches']['serving']
    assert serving['source'] == 'prediction log' and serving['rows'] >= 120 and 'tailnum' in serving['features']
    assert 'serving' in r.stdout
    # the later months carry labels: the regression's performance decay, RMSE against the training period's
    months = {k: b for k, b in d['batches'].items() if k.startswith('2013-')}
    assert set(months) == {'2013-10', '2013-11', '2013-12'} and all('rmse' in b['performance'] for b in months.values())
    assert 'rmse' in d['reference']['performance_in_sample']


def test_pyfunc_clients_score_the_project_table_unchanged(served):
    """Any MLflow client loading the registered model scores the project's own test rows (int64 columns included)."""
    import mlflow
    root = served['root']
    mlflow.set_tracking_uri(f"sqlite:///{root/'mlflow.db'}")
    test = pd.read_parquet(root/'build/features/test.parquet').drop(columns=['arr_delay']).head(200)
    assert (test.dtypes == 'int64').any()
    out = mlflow.pyfunc.load_model(f'models:/{MODEL}@champion').predict(test)
    assert len(out) == 200 and np.isfinite(np.asarray(out, dtype=float)).all()


# --- the workflow knows no column of the example --------------------------------------------------------------------

WORKFLOW = ['project', 'config', 'data', 'models', 'metrics', 'tracking', 'tasks', 'sweep', 'gate', 'versioning', 'schema', 'scoring', 'predlog',
            'guard', 'serving', 'monitor', 'cli', 'scaffold']


# names a module may hold for a reason of its own: scaffold proposes a split column from common time-column names
GENERIC = {'scaffold': {'year', 'month'}}


def test_workflow_modules_name_no_column_of_the_example():
    """No string constant of a workflow module is a column of the example's spec, its raw files or its target."""
    from nbs_lib.features import FLIGHTS_SCHEMA, WEATHER_SCHEMA
    p = yaml.safe_load((ROOT/'params.yaml').read_text())
    names = set(p['table']['columns']) | set(FLIGHTS_SCHEMA) | set(WEATHER_SCHEMA) | {p['table']['target']['column'], 'arr_delay'}
    names |= set(p['table'].get('derive', {}).get('columns', []))
    hits = []
    for mod in WORKFLOW:
        tree = ast.parse((ROOT/'nbs_lib'/f'{mod}.py').read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in names - GENERIC.get(mod, set()):
                hits.append(f'{mod}.py:{node.lineno}: {node.value!r}')
            if isinstance(node, (ast.ImportFrom,)) and node.module and node.module.endswith('features'):
                hits.append(f'{mod}.py:{node.lineno}: imports the example module nbs_lib.features')
    assert not hits, hits


def _imports() -> dict[str, set[str]]:
    """{module: the nbs_lib modules it imports} from the source of every module of the package (lazy imports too)."""
    out = {}
    for f in sorted((ROOT/'nbs_lib').glob('*.py')):
        if f.name.startswith('_'): continue
        deps = set()
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                mod = node.module.removeprefix('nbs_lib.') if node.module.startswith('nbs_lib') else node.module if node.level else None
                if mod == 'nbs_lib': deps |= {a.name for a in node.names}
                elif mod: deps.add(mod)
            elif isinstance(node, ast.Import):
                deps |= {a.name.removeprefix('nbs_lib.') for a in node.names if a.name.startswith('nbs_lib.')}
        out[f.stem] = deps & {g.stem for g in (ROOT/'nbs_lib').glob('*.py')} - {f.stem}
    return out


def test_import_graph_has_no_cycle_and_nothing_imports_cli():
    g = _imports()
    assert not [m for m, deps in g.items() if 'cli' in deps], {m: d for m, d in g.items() if 'cli' in d}
    assert 'tracking' not in g['versioning'] and 'versioning' in g['tracking']  # one way only
    seen, stack = set(), []
    def visit(m):
        assert m not in stack, f"import cycle: {' -> '.join(stack[stack.index(m):] + [m])}"
        if m in seen: return
        stack.append(m)
        for d in sorted(g.get(m, ())): visit(d)
        stack.pop(); seen.add(m)
    for m in g: visit(m)
