"""The pipeline end to end through its real CLI: incremental builds, determinism, MLflow contents, bad input."""
from __future__ import annotations
import json
from pathlib import Path
import mlflow
import pytest
from mlflow.tracking import MlflowClient
from conftest import DELETE, copy_project, metrics, nbs, nbs_here, ran_tasks, run, run_statuses, set_params, BIN

TASKS = ['ingest', 'features', 'train', 'evaluate', 'monitor']


def test_build_writes_every_product(sample_project):
    b = sample_project/'build'
    for f in ['ingest/flights.parquet', 'ingest/weather.parquet', 'features/train.parquet', 'features/test.parquet',
              'train/run.json', 'evaluate/metrics.json', 'evaluate/plots/roc.png', 'evaluate/plots/calibration.png',
              'evaluate/plots/auc_by_month.png', 'evaluate/plots/importance.png']:
        assert (b/f).stat().st_size > 0, f
    for t in ['01_ingest', '02_features', '03_train', '04_evaluate']:
        assert (b/'notebooks'/f'{t}.ipynb').exists() and (b/'notebooks'/f'{t}.html').exists()
    m = metrics(sample_project)['test']
    assert 0.6 < m['roc_auc'] < 0.8 and m['n'] > 1000
    assert {r['month'] for r in metrics(sample_project)['by_month']} == {10, 11, 12}


def test_mlflow_run_has_params_metrics_model_plots_notebooks_lineage(sample_project):
    mlflow.set_tracking_uri(f"sqlite:///{sample_project/'mlflow.db'}")
    run_id = json.loads((sample_project/'build/train/run.json').read_text())['run_id']
    r = MlflowClient().get_run(run_id)
    assert r.info.status == 'FINISHED'
    assert r.data.params['train.family'] == 'hist_gradient_boosting'
    assert r.data.params['train.hyperparams.hist_gradient_boosting.learning_rate'] == '0.1'
    assert r.data.params['data.sample_frac'] == '0.03'
    for k in ['test_roc_auc', 'test_log_loss', 'test_brier', 'test_accuracy', 'test_f1', 'train_roc_auc', 'fit_seconds']:
        assert k in r.data.metrics, k
    assert r.data.metrics['test_roc_auc'] == pytest.approx(metrics(sample_project)['test']['roc_auc'])
    hist = MlflowClient().get_metric_history(run_id, 'test_roc_auc_by_month')
    assert sorted(m.step for m in hist) == [10, 11, 12]
    for tag in ['git.commit', 'git.dirty', 'data.train.md5', 'data.test.md5', 'data.raw_flights.md5', 'data.raw_weather.md5',
                'lock.md5', 'python', 'platform']:
        assert r.data.tags.get(tag), tag
    files = {a.path for d in ['', 'notebooks', 'evaluation']
             for a in MlflowClient().list_artifacts(run_id, d or None)}
    for f in ['params.yaml', 'notebooks/03_train.ipynb', 'notebooks/04_evaluate.html', 'notebooks/01_ingest.html',
              'evaluation/metrics.json', 'evaluation/roc.png', 'evaluation/importance.png']:
        assert f in files, (f, sorted(files))
    model_uri = json.loads((sample_project/'build/train/run.json').read_text())['model_uri']
    assert model_uri.startswith('models:/m-')
    lm = mlflow.get_logged_model(model_uri.split('/')[-1])
    assert lm.source_run_id == run_id


def test_noop_rebuild_runs_nothing(sample_project):
    r = nbs(sample_project, 'build')
    assert ran_tasks(r) == []
    r = nbs(sample_project, 'build', '--data')  # what make pipeline runs: the raw data checked, then the build, in one process
    assert r.stdout.startswith('data/raw: ') and ran_tasks(r) == []


def test_train_param_change_reruns_train_and_evaluate_only(built_copy):
    root = built_copy
    set_params(root, **{'train.hyperparams.hist_gradient_boosting.max_iter': 50})
    assert ran_tasks(nbs(root, 'build')) == ['train', 'evaluate', 'monitor']  # monitor scores with the new model
    assert ran_tasks(nbs(root, 'build')) == []


def test_library_change_reruns_the_tasks_that_use_it(built_copy):
    root = built_copy
    f = root/'nbs_lib/metrics.py'  # train scores its training set with it, evaluate the test set
    f.write_text(f.read_text() + '\n# a change to the exported code\n')
    assert ran_tasks(nbs(root, 'build')) == ['train', 'evaluate', 'monitor']
    f = root/'nbs_lib/gate.py'  # no task uses the gate
    f.write_text(f.read_text() + '\n# a change to the exported code\n')
    assert ran_tasks(nbs(root, 'build')) == []
    f = root/'nbs_lib/features.py'  # the example's raw files, join and derived features: every task
    f.write_text(f.read_text() + '\n# a change to the exported code\n')
    assert ran_tasks(nbs(root, 'build')) == ['ingest', 'features', 'train', 'evaluate', 'monitor']


def test_plain_ploomber_build_reads_params_yaml(built_copy):
    """`ploomber build` from an activated venv (PLOOMBER_ENV_FILENAME=params.yaml) sees the same pipeline."""
    root = built_copy
    r = run([str(BIN/'ploomber'), 'status'], root)
    for t in TASKS: assert t in r.stdout
    set_params(root, **{'evaluate.threshold': 0.4})
    r = run([str(BIN/'ploomber'), 'build'], root)
    assert 'evaluate' in r.stdout and json.loads((root/'build/evaluate/metrics.json').read_text())['test']['n'] > 0


def _products(root: Path) -> dict:
    return {p.relative_to(root): p.read_bytes() for p in (root/'build').rglob('*') if p.is_file() and not p.name.startswith('.')}


@pytest.mark.parametrize('updates, expected', [
    ({'train.family': 'xgboost'}, "'train.family' must be one of"),
    ({'train.seed': DELETE}, "missing key 'train.seed'"),
    ({'split.train': [10, 11]}, "'split': 'train' and 'test' overlap in ['10', '11']"),
    ({'data.sample_frac': 'half'}, "'data.sample_frac' must be a number"),
    ({'train.hyperparams.hist_gradient_boosting.learnin_rate': 0.1}, "'train.hyperparams.hist_gradient_boosting.learnin_rate' is not a HistGradientBoostingClassifier hyperparameter"),
    ({'monitor.psi_threshold': 'high'}, "'monitor.psi_threshold' must be a number, got 'high'"),  # the last task's stage
])
def test_bad_params_fail_in_one_line_and_keep_products(built_copy, updates, expected):
    root = built_copy
    before = _products(root)
    set_params(root, **updates)
    for args in (['build'], ['build', '--data']):  # nbs build, and make pipeline's nbs build --data (params checked before the data)
        r = nbs_here(root, *args)
        assert r.returncode == 2, r.stdout + r.stderr
        last = r.stderr.strip().splitlines()[-1]
        assert last.startswith('error: ') and expected in last, (args, last)
    assert _products(root) == before  # checked before any task ran: nothing touched


@pytest.mark.parametrize('updates, expected', [
    ({'monitor.p_value': 2}, "'monitor.p_value' must be <= 1.0, got 2"),
    ({'serve.port': 0}, "'serve.port' must be >= 1, got 0"),
    ({'gate.metric': 'accuracy'}, "'gate.metric' must be one of ['roc_auc', 'log_loss', 'brier'] for task binary, got 'accuracy'"),
    ({'sweep.grid': [1]}, "'sweep.grid' must be a mapping, got [1]"),
    ({'train.hyperparams.random_forest.n_estimator': 10}, "'train.hyperparams.random_forest.n_estimator' is not a RandomForestClassifier hyperparameter"),
    ({'table.target.rule': 'arr_delay late'}, "'table.target.rule' must read '<column> <op> <number>'"),
    ({'split.by': 'mnth'}, "'split.by' must be an input column of table.columns"),
    ({'table.columns.year.dtype': 'integer'}, "'table.columns.year.dtype' must be one of 'int', 'float', 'category', 'hhmm', got 'integer'"),
    ({'table.target.task': 'regression'}, "'table': a regression target takes no rule"),
])
def test_nbs_check_validates_every_stage(tmp_path, updates, expected):
    """`nbs check` checks the stages only other verbs read (gate, sweep, serve, monitor), not just the pipeline's."""
    root = copy_project(tmp_path/'p', files=['params.yaml', 'pipeline.yaml'])
    assert nbs_here(root, 'check').stdout.strip() == 'params.yaml: ok'
    set_params(root, **updates)
    r = nbs_here(root, 'check')
    assert r.returncode == 2 and r.stderr.startswith('error: params.yaml: ') and expected in r.stderr, r.stderr


def test_impossible_split_names_the_empty_side(fresh_project):
    """Months that exist in params but hold no flights after sampling/filtering: a data error, not a crash."""
    root = fresh_project
    (root/'data/raw').mkdir(parents=True, exist_ok=True)
    import pandas as pd
    f = pd.read_csv(root/'data/raw/flights.csv.zip')
    f[f.month <= 9].to_csv(root/'data/raw/flights.csv.zip', index=False, compression='zip')
    r = nbs(root, 'build', check=False)
    assert r.returncode == 2
    last = r.stderr.strip().splitlines()[-1]
    assert "task 'features' failed" in last and 'the test set is empty' in last, last


@pytest.mark.parametrize('corrupt, expected', [
    (lambda f: f.drop(columns=['arr_delay']), "missing column 'arr_delay'"),
    (lambda f: f.assign(distance='far'), "column 'distance' has type"),
])
def test_bad_data_file_names_the_column_and_keeps_runs(built_copy, corrupt, expected):
    import pandas as pd
    root = built_copy
    before = _products(root)
    runs_before = run_statuses(root)
    f = pd.read_csv(root/'data/raw/flights.csv.zip', nrows=20_000)  # a file of its own: what is wrong is a column, not the rows
    corrupt(f).to_csv(root/'data/raw/flights.csv.zip', index=False, compression='zip')
    r = nbs(root, 'build', check=False)
    assert r.returncode == 2
    last = r.stderr.strip().splitlines()[-1]
    assert "task 'ingest' failed" in last and 'flights.csv.zip' in last and expected in last, last
    # earlier products: untouched (the failing task writes nothing; its partial notebook aside)
    after = _products(root)
    for k, v in before.items():
        if 'notebooks/01_ingest' not in str(k): assert after.get(k) == v, k
    assert run_statuses(root) == runs_before


def test_two_forced_clean_builds_give_identical_metrics(sample_project, fresh_project):
    nbs(fresh_project, 'build', '--force')
    assert metrics(fresh_project)['test'] == metrics(sample_project)['test']
    assert metrics(fresh_project)['by_month'] == metrics(sample_project)['by_month']


@pytest.mark.slow
def test_full_data_build(tmp_path):
    """The default params.yaml, all 336,776 flights: the reference AUC of about 0.69 on Oct-Dec."""
    root = copy_project(tmp_path/'full')
    nbs(root, 'build')
    m = metrics(root)['test']
    assert m['n'] > 80_000 and 0.67 < m['roc_auc'] < 0.72, m
