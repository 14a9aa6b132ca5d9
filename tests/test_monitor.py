"""Monitoring: a constructed shift is flagged and the same distribution is not (numeric and categorical), a small batch
says "insufficient data", and the monitor runs in the pipeline and on demand (`nbs monitor`) against a prediction
log written in the service's schema. Real notebooks, real sqlite MLflow stores, real parquet/jsonl files."""
from __future__ import annotations
import json
from pathlib import Path
import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient
from conftest import nbs, set_params
from nbs_lib import monitor as mon
from nbs_lib.config import ParamsError
from nbs_lib.config import load_params
from nbs_lib.data import DataSpec

INPUT_COLUMNS = DataSpec.from_params(load_params(Path(__file__).resolve().parents[1]/'params.yaml')).inputs

CFG = {'prediction_log': 'build/serving/predictions', 'min_rows': 500, 'n_bins': 10, 'max_categories': 20,
       'psi_threshold': 0.2, 'p_value': 0.01, 'prediction_psi_threshold': 0.1, 'min_auc': 0.65,
       'max_calibration_gap': 0.05, 'max_error_ratio': 1.25, 'max_drifted_share': 0.3, 'batch_by': None}


def _drifted(d: dict) -> bool:
    return mon.is_drifted(d, CFG['psi_threshold'], CFG['p_value'])


# --- the statistics, on constructed samples -------------------------------------------------------------------------

@pytest.mark.parametrize('shift', ['mean', 'spread', 'missing'])
def test_numeric_shift_is_flagged_and_same_distribution_is_not(shift):
    rng = np.random.default_rng(1)
    ref = rng.normal(50, 10, 30_000)
    same = rng.normal(50, 10, 3_000)
    cur = {'mean': rng.normal(58, 10, 3_000), 'spread': rng.normal(50, 25, 3_000),
           'missing': np.where(rng.random(3_000) < 0.4, np.nan, rng.normal(50, 10, 3_000))}[shift]
    d_same, d_cur = mon.numeric_drift(ref, same, 10), mon.numeric_drift(ref, cur, 10)
    assert not _drifted(d_same) and d_same['psi'] < 0.05, d_same['psi']
    assert _drifted(d_cur), (shift, d_cur['psi'], d_cur['p_value'])


def test_categorical_shift_is_flagged_and_same_distribution_is_not():
    rng = np.random.default_rng(2)
    cats, p = ['AA', 'B6', 'DL', 'EV', 'UA'], [0.3, 0.25, 0.2, 0.15, 0.1]
    ref = pd.Series(rng.choice(cats, 30_000, p=p))
    same = pd.Series(rng.choice(cats, 3_000, p=p))
    swapped = pd.Series(rng.choice(cats, 3_000, p=p[::-1]))
    unseen = pd.Series(rng.choice(cats + ['ZZ'], 3_000, p=[0.2, 0.2, 0.15, 0.1, 0.05, 0.3]))  # a new carrier
    assert not _drifted(mon.categorical_drift(ref, same, 20))
    for cur in (swapped, unseen):
        d = mon.categorical_drift(ref, cur, 20)
        assert _drifted(d) and d['test'] == 'chi2', (d['psi'], d['p_value'])
    d = mon.categorical_drift(ref, unseen, 20)
    assert d['shares'][d['bins'].index('(other)')] == pytest.approx(0.3, abs=0.03)


def test_a_tiny_shift_in_a_big_sample_is_significant_but_not_drift():
    """With many rows every test rejects: the effect size (PSI) decides."""
    rng = np.random.default_rng(3)
    d = mon.numeric_drift(rng.normal(0, 1, 80_000), rng.normal(0.05, 1, 80_000), 10)
    assert d['p_value'] < 1e-6 and d['psi'] < 0.01 and not _drifted(d)


def test_a_small_batch_says_insufficient_data_instead_of_statistics():
    ref = pd.DataFrame({'x': np.arange(1000.0)})
    b = mon.compare_batch(ref, np.full(1000, 0.2), ref.head(49), np.full(49, 0.9), None, ['x'], [], CFG)
    assert b['status'] == 'insufficient' and b['message'] == 'insufficient data: 49 rows < min_rows (500)'
    assert 'features' not in b and 'prediction' not in b and not b['retrain']


def test_bad_monitor_params_name_the_key():
    with pytest.raises(ParamsError, match=r"'monitor.psi_threshold' must be a number, got 'high'"):
        mon.monitor_settings({**CFG, 'psi_threshold': 'high'})
    with pytest.raises(ParamsError, match=r"missing key 'monitor.min_rows'"):
        mon.monitor_settings({k: v for k, v in CFG.items() if k != 'min_rows'})


# --- on a built sample project ---------------------------------------------------------------------------------------

def _drift(root: Path) -> dict:
    return json.loads((root/'build/monitor/drift.json').read_text())


def test_monitor_task_runs_in_the_pipeline_and_logs_to_mlflow(sample_project):
    root = sample_project
    d = _drift(root)
    assert list(d['batches']) == ['2013-10', '2013-11', '2013-12']  # the later months; no prediction log here
    assert d['sources']['prediction_log']['present'] is False and d['verdict'] in mon.VERDICTS
    for b in d['batches'].values():
        assert b['status'] != 'insufficient' and b['rows'] >= CFG['min_rows']
        assert set(b['features']) == set(d['reference']['features']['numeric'] + d['reference']['features']['categorical'])
        assert {'psi', 'statistic', 'p_value', 'drifted'} <= set(b['features']['temp'])
        assert 0.5 < b['performance']['roc_auc'] < 0.9 and b['prediction']['psi'] >= 0
    # the seasons: Oct-Dec weather is far from Jan-Sep, the carriers and routes are not
    assert all('temp' in b['drifted_features'] for b in d['batches'].values())
    assert not any({'carrier', 'origin'} & set(b['drifted_features']) for b in d['batches'].values())
    page = (root/'build/monitor/report/index.html').read_text()
    assert page.index(d['headline']) < page.index('<h2>Batches') and page.count('<img') >= 3
    assert (root/'build/notebooks/05_monitor.html').exists()
    # MLflow: a monitor run nested under the build's run, with the report; the build run points at it
    build = json.loads((root/'build/train/run.json').read_text())['run_id']
    client = MlflowClient(f"sqlite:///{root/'mlflow.db'}")
    b = client.get_run(build)
    r = client.get_run(b.data.tags['monitor.run_id'])
    assert r.data.tags['nbs.kind'] == 'monitor' and r.data.tags['mlflow.parentRunId'] == build and r.info.status == 'FINISHED'
    assert b.data.tags['monitor.verdict'] == r.data.tags['monitor.verdict'] == d['verdict']
    assert r.data.metrics['retrain'] == float(d['retrain']) and 'prediction_psi/2013-12' in r.data.metrics
    files = {a.path for p in ('monitoring', 'monitoring/report') for a in client.list_artifacts(r.info.run_id, p)}
    assert {'monitoring/drift.json', 'monitoring/report/index.html', 'monitoring/report/summary.png'} <= files, files
    assert 'notebooks/05_monitor.html' in {a.path for a in client.list_artifacts(build, 'notebooks')}


def _log_rows(root: Path, n: int, seed: int, shift: bool = False) -> pd.DataFrame:
    """`n` flights of the training period, as the service would log them (scored by the build's model)."""
    from nbs_lib import tracking as trk
    rows = pd.read_parquet(root/'build/features/train.parquet').sample(n, random_state=seed)[INPUT_COLUMNS].reset_index(drop=True)
    if shift:  # a hot, humid, low-pressure summer... for an airline nobody has heard of
        rows = rows.assign(temp=rows.temp + 25, dewp=rows.dewp + 25, humid=rows.humid*0.4, pressure=rows.pressure - 20, carrier='ZZ')
    client_uri = f"sqlite:///{root/'mlflow.db'}"
    import mlflow
    mlflow.set_tracking_uri(client_uri)
    p = trk.load_model(json.loads((root/'build/train/run.json').read_text())['model_uri']).predict_proba(rows)[:, 1]
    return rows.assign(probability=p, decision=p >= 0.3, model_version='flights-delay/1',
                       timestamp=pd.Timestamp('2024-03-01', tz='UTC') + pd.to_timedelta(np.arange(n), unit='s'),
                       request_id=[f'r{seed}-{i}' for i in range(n)], shadow=False)


def _write_log(root: Path, parts: list[pd.DataFrame]) -> Path:
    folder = root/'build/serving/predictions'; folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob('*'): old.unlink()
    for i, df in enumerate(parts):
        df.to_parquet(folder/f'predictions-20240301T000000000000-{100 + i}-000001.parquet', index=False)
    return folder


def test_nbs_monitor_reads_the_prediction_log_skips_shadow_rows_and_flags_a_shift(built_copy):
    root = built_copy
    same, shadow = _log_rows(root, 1200, seed=5), _log_rows(root, 1200, seed=6, shift=True).assign(shadow=True)
    _write_log(root, [same.iloc[:700], same.iloc[700:], shadow])
    r = nbs(root, 'monitor')
    s = _drift(root)['batches']['serving']
    log = _drift(root)['sources']['prediction_log']
    assert log['present'] and log['files'] == 3 and log['rows'] == 1200 and log['shadow_rows_skipped'] == 1200
    assert s['rows'] == 1200 and s['drifted_features'] == [] and s['status'] == 'ok', s['message']
    assert not s['prediction']['drifted'] and s['performance'] is None  # the log has no labels
    assert 'serving' in r.stdout and 'MLflow run:' in r.stdout

    _write_log(root, [_log_rows(root, 1200, seed=7, shift=True)])
    r = nbs(root, 'monitor', '--fail-on-drift', check=False)
    d = _drift(root); s = d['batches']['serving']
    assert {'temp', 'dewp', 'humid', 'pressure', 'carrier'} <= set(s['drifted_features']), s['drifted_features']
    assert s['status'] == 'retrain' and 'features drifted' in s['message'] and d['verdict'] == 'retrain'
    assert r.returncode == 1, r.stdout + r.stderr  # --fail-on-drift: a scheduler sees the verdict
    assert 'serving' in (root/'build/monitor/report/index.html').read_text()


def test_a_small_log_says_insufficient_data(built_copy):
    root = built_copy
    folder = root/'build/serving/predictions'; folder.mkdir(parents=True)
    rows = _log_rows(root, 50, seed=8)
    rows.assign(timestamp=rows.timestamp.astype(str)).to_json(folder/'predictions.jsonl', orient='records', lines=True)
    r = nbs(root, 'monitor', '--no-mlflow')
    s = _drift(root)['batches']['serving']
    assert s['status'] == 'insufficient' and s['message'] == 'insufficient data: 50 rows < min_rows (500)'
    assert 'insufficient data: 50 rows < min_rows (500)' in r.stdout
    assert 'insufficient data: 50 rows' in (root/'build/monitor/report/index.html').read_text()


def test_nbs_monitor_errors_are_one_line(fresh_project, built_copy):
    r = nbs(fresh_project, 'monitor', check=False)
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith('error: ')
    assert 'train.parquet: training data not found: build first (`make pipeline`)' in r.stderr
    set_params(built_copy, **{'monitor.p_value': 'small'})
    r = nbs(built_copy, 'monitor', check=False)
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1] == "error: params.yaml: 'monitor.p_value' must be a number, got 'small'"
