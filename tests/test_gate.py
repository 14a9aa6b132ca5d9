"""The promotion gate (`nbs register`) on a real sqlite MLflow store holding real models from real builds of the sample:
the first candidate becomes champion, equal or worse ones are rejected (exit 3), a clearly better one is promoted,
bad input exits 2 and registers nothing. Nothing is mocked; every metric comes from a real model."""
from __future__ import annotations
import json, shutil
from pathlib import Path
from types import SimpleNamespace
import numpy as np
import pytest
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from conftest import PROJECT_FILES, copy_project, nbs, nbs_here, set_params

# the gate on the 3% sample (about 2,500 test rows); the threshold sits below the weak model
GATE = {'gate.min_metric': 0.55, 'gate.min_improvement': 0.001, 'gate.bootstrap.n_resamples': 1000, 'gate.bootstrap.seed': 7}
# deliberately weak: a logistic regression that sees the origin airport and the time of day only (AUC about 0.61)
WEAK = {'train.family': 'logistic_regression', **{f'table.columns.{c}.role': 'derive' for c in ('carrier', 'dest', 'distance', 'temp', 'dewp',
        'humid', 'wind_dir', 'wind_speed', 'wind_gust', 'precip', 'pressure', 'visib')}}
# clearly better on the sample: a gradient boosting sized for 7,000 training rows (AUC about 0.67)
STRONG = {f'train.hyperparams.hist_gradient_boosting.{k}': v for k, v in
          dict(learning_rate=0.05, max_iter=100, max_leaf_nodes=15, min_samples_leaf=100).items()}
SWEEP_ID, EMPTY_SWEEP_ID = 'gate-sweep', 'gate-empty'


def _run_id(root: Path) -> str:
    return json.loads((root/'build/train/run.json').read_text())['run_id']


@pytest.fixture(scope='module')
def gate(sample_project, tmp_path_factory):
    """Three real builds sharing one sqlite store (like a team's tracking server): `twin` and `strong` become the
    configurations of a sweep of the current project `weak` (plus one failed configuration), built last."""
    base = tmp_path_factory.mktemp('gate')
    (base/'store').mkdir()
    uri = f"sqlite:///{base/'store'/'mlflow.db'}"
    runs = {}
    for name, updates in [('twin', WEAK), ('strong', STRONG), ('weak', WEAK)]:
        root = copy_project(base/name, src=sample_project, files=PROJECT_FILES + ['build'])
        set_params(root, **updates, **GATE, **{'registry.model_name': 'gate-current'})
        nbs(root, 'build', MLFLOW_TRACKING_URI=uri)
        runs[name] = _run_id(root)
    root = (base/'weak').resolve()
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name('flights-delay').experiment_id

    def sweep(sweep_id: str, sweep_root: Path, children: list[str]) -> str:
        parent = client.create_run(exp, run_name=f'sweep-{sweep_id}', tags={
            'nbs.kind': 'sweep', 'nbs.sweep_id': sweep_id, 'nbs.root': str(sweep_root)}).info.run_id
        for rid in children:
            for k, v in {'mlflow.parentRunId': parent, 'nbs.kind': 'sweep-config', 'nbs.sweep_id': sweep_id}.items():
                client.set_tag(rid, k, v)
        failed = client.create_run(exp, run_name='config-that-failed', tags={
            'mlflow.parentRunId': parent, 'nbs.kind': 'sweep-config', 'nbs.sweep_id': sweep_id}).info.run_id
        client.set_terminated(failed, 'FAILED')
        client.set_terminated(parent, 'FINISHED')
        return parent

    parent = sweep(SWEEP_ID, root, [runs['twin'], runs['strong']])
    sweep(EMPTY_SWEEP_ID, base/'elsewhere', [])
    # a run that evaluated the weak model for real but logged no model of its own
    import mlflow
    from nbs_lib.gate import load_test
    from nbs_lib.metrics import classification_metrics
    from nbs_lib.tracking import load_model
    mlflow.set_tracking_uri(uri)
    X, y, _ = load_test(root)
    p = load_model(json.loads((root/'build/train/run.json').read_text())['model_uri']).predict_proba(X)[:, 1]
    unlogged = client.create_run(exp, run_name='evaluated-without-model', tags={'nbs.kind': 'build'}).info.run_id
    for k, v in classification_metrics(y, p).items(): client.log_metric(unlogged, f'test_{k}', v)
    client.set_terminated(unlogged, 'FINISHED')
    return SimpleNamespace(root=root, uri=uri, runs=runs, sweep_parent=parent, unlogged=unlogged, client=client)


def project(gate, tmp_path: Path, **params) -> Path:
    """A copy of the current project (its build; the store stays shared) with a registered model name of its own."""
    root = copy_project(tmp_path/'proj', src=gate.root, files=['params.yaml', 'pipeline.yaml', 'build'])
    shutil.rmtree(root/'build/gate', ignore_errors=True)  # the current project's own gate report
    set_params(root, **{'registry.model_name': f'gate-{tmp_path.name}', **params})
    return root


def name_of(root: Path) -> str:
    import yaml
    return yaml.safe_load((root/'params.yaml').read_text())['registry']['model_name']


def register(gate, root: Path, *args: str, code: int = 0):
    """`nbs register ...` in a subprocess, as a user runs it; returns the process and the report it wrote."""
    r = nbs(root, 'register', *args, check=False, MLFLOW_TRACKING_URI=gate.uri)
    assert r.returncode == code, f"exit {r.returncode}\n--- stdout\n{r.stdout[-3000:]}\n--- stderr\n{r.stderr[-3000:]}"
    return r, json.loads((root/'build/gate/report.json').read_text())


@pytest.fixture
def register_here(gate):
    """`nbs register ...` through the same entry point in this process (conftest.nbs_here): for the steps that set a
    test up; returns (exit code, stdout, stderr)."""
    def call(root: Path, *args: str) -> tuple[int, str, str]:
        r = nbs_here(root, 'register', *args, MLFLOW_TRACKING_URI=gate.uri)
        return r.returncode, r.stdout, r.stderr
    return call


def aliases(gate, name: str) -> dict:
    try: return {k: int(v) for k, v in gate.client.get_registered_model(name).aliases.items()}
    except MlflowException: return {}


def versions(gate, name: str) -> list[str]:
    return sorted(int(v.version) for v in gate.client.search_model_versions(f"name = '{name}'"))


def test_first_candidate_becomes_champion(gate, tmp_path, register_here):
    root = project(gate, tmp_path); name = name_of(root); weak = gate.runs['weak']
    r, rep = register(gate, root)  # no choice given, no sweep of this copy: the latest build
    assert f'candidate: latest build: run {weak} (no sweep of this project newer than it)' in r.stdout
    assert rep['decision'] == 'promoted' and rep['reason'].startswith('first candidate to reach gate.min_metric 0.55')
    assert rep['champion'] is None and rep['bootstrap'] is None
    assert aliases(gate, name) == {'champion': 1, 'challenger': 1}
    run = gate.client.get_run(weak)
    assert rep['candidate']['metric'] == pytest.approx(run.data.metrics['test_roc_auc'], abs=1e-12)  # same data, scored again
    assert rep['test_data']['same_as_candidate_run'] is True and rep['test_data']['rows'] > 1000
    v = gate.client.get_model_version(name, '1')
    assert v.run_id == weak and v.source == json.loads((root/'build/train/run.json').read_text())['model_uri']
    assert v.tags['run_id'] == weak and v.tags['git.commit'] == run.data.tags['git.commit']
    assert v.tags['model.family'] == 'logistic_regression'
    assert float(v.tags['metric.test_roc_auc']) == pytest.approx(run.data.metrics['test_roc_auc'], abs=1e-5)
    assert v.tags['gate.decision'] == 'promoted' and v.tags['gate.reason'] == rep['reason'] and v.tags['gate.delta'] == 'none'
    assert weak in v.description and 'logistic_regression' in v.description
    assert {'gate/report.json', 'gate/report.md'} <= {a.path for a in gate.client.list_artifacts(weak, 'gate')}
    md = (root/'build/gate/report.md').read_text()
    assert '**decision: promoted**' in md and md in r.stdout
    # the same candidate again: already the champion, nothing new registered
    code, out, err = register_here(root, '--from-build')
    rep = json.loads((root/'build/gate/report.json').read_text())
    assert code == 0 and out.strip().splitlines()[-1].startswith('kept: the candidate is already the champion (version 1)')
    assert rep['decision'] == 'kept' and versions(gate, name) == [1] and aliases(gate, name) == {'champion': 1, 'challenger': 1}


def test_equal_candidate_is_rejected_and_champion_stays(gate, tmp_path, register_here):
    """The twin build (same parameters, same data) predicts what the champion predicts: no evidence, no promotion."""
    root = project(gate, tmp_path); name = name_of(root)
    assert register_here(root, '--from-build')[0] == 0
    r, rep = register(gate, root, '--run', gate.runs['twin'], code=3)
    last = r.stderr.strip().splitlines()[-1]
    assert last == f"rejected: {rep['reason']}" and last.startswith('rejected: not distinguishable from the champion')
    assert rep['delta'] == 0 and rep['ci_low'] == 0 and rep['ci_high'] == 0
    assert rep['champion']['run_id'] == gate.runs['weak'] and rep['candidate']['run_id'] == gate.runs['twin']
    assert aliases(gate, name) == {'champion': 1, 'challenger': 2} and versions(gate, name) == [1, 2]
    assert gate.client.get_model_version(name, '2').tags['gate.decision'] == 'rejected'


def test_worse_candidate_is_rejected_and_champion_stays(gate, tmp_path, register_here):
    root = project(gate, tmp_path); name = name_of(root)
    code, out, _ = register_here(root, '--sweep', SWEEP_ID)  # best of the sweep: strong; first candidate: champion
    assert code == 0 and f'candidate: sweep {SWEEP_ID} (parent run {gate.sweep_parent}; 3 configurations, 2 finished)' in out
    rep = json.loads((root/'build/gate/report.json').read_text())
    assert rep['candidate']['run_id'] == gate.runs['strong'] and rep['decision'] == 'promoted'
    r, rep = register(gate, root, '--from-build', code=3)  # the weak build against the strong champion
    assert r.stderr.strip().splitlines()[-1].startswith('rejected: worse than the champion: roc_auc')
    assert rep['delta'] < 0 and rep['ci_low'] <= rep['delta'] <= rep['ci_high'] < 0
    assert aliases(gate, name) == {'champion': 1, 'challenger': 2} and versions(gate, name) == [1, 2]
    v = gate.client.get_model_version(name, '2').tags
    assert v['gate.decision'] == 'rejected' and float(v['gate.ci_high']) == pytest.approx(rep['ci_high'], rel=1e-5)


def test_clearly_better_candidate_from_the_latest_sweep_is_promoted(gate, register_here):
    """In the current project itself: the weak build is champion, then the default source is the latest sweep
    (newer than the build), whose best configuration beats it; the interval is the same one computed in-process."""
    from nbs_lib.gate import load_test, paired_bootstrap
    from nbs_lib.tracking import load_model
    root = gate.root; name = name_of(root)
    assert register_here(root, '--from-build')[0] == 0
    r, rep = register(gate, root)
    assert f'candidate: latest sweep {SWEEP_ID}, newer than the latest build (parent run {gate.sweep_parent}' in r.stdout
    assert rep['candidate']['run_id'] == gate.runs['strong'] and rep['champion']['run_id'] == gate.runs['weak']
    assert rep['decision'] == 'promoted' and rep['reason'].startswith('beats the champion')
    assert 0.001 <= rep['ci_low'] <= rep['delta'] <= rep['ci_high']
    assert aliases(gate, name) == {'champion': 2, 'challenger': 2} and versions(gate, name) == [1, 2]
    assert r.stdout.strip().splitlines()[-1] == f"promoted: {rep['reason']}"
    import mlflow
    mlflow.set_tracking_uri(gate.uri)
    X, y, _ = load_test(root)
    p = {k: load_model(rep[k]['model_uri']).predict_proba(X)[:, 1] for k in ('candidate', 'champion')}
    b = paired_bootstrap(y, p['candidate'], p['champion'], 'roc_auc', 1000, GATE['gate.bootstrap.seed'], 0.95)
    assert (b['delta'], b['ci_low'], b['ci_high']) == (rep['delta'], rep['ci_low'], rep['ci_high'])


def test_threshold_failure_then_first_passing_candidate_becomes_champion(gate, tmp_path, register_here):
    root = project(gate, tmp_path, **{'gate.min_metric': 0.99}); name = name_of(root)
    r, rep = register(gate, root, '--from-build', code=3)
    assert r.stderr.strip().splitlines()[-1].startswith('rejected: test roc_auc 0.') and 'does not reach gate.min_metric 0.99' in rep['reason']
    assert aliases(gate, name) == {'challenger': 1}  # registered, not champion
    set_params(root, **{'gate.min_metric': 0.55})
    assert register_here(root, '--from-build')[0] == 0
    rep = json.loads((root/'build/gate/report.json').read_text())
    assert rep['decision'] == 'promoted' and 'first candidate' in rep['reason'] and rep['candidate']['version'] == 1
    assert aliases(gate, name) == {'champion': 1, 'challenger': 1} and versions(gate, name) == [1]


def test_bootstrap_is_seeded_matches_sklearn_and_contains_the_observed_difference(gate):
    import mlflow
    from sklearn.metrics import log_loss, roc_auc_score
    from nbs_lib.gate import bootstrap_deltas, load_test, paired_bootstrap, logged_model
    from nbs_lib.tracking import load_model
    mlflow.set_tracking_uri(gate.uri)
    X, y, _ = load_test(gate.root)
    ps, pw = (load_model(logged_model(gate.client, gate.client.get_run(gate.runs[k])).model_uri).predict_proba(X)[:, 1]
              for k in ('strong', 'weak'))
    a = bootstrap_deltas(y, ps, pw, 'roc_auc', 200, seed=7)
    assert np.array_equal(a, bootstrap_deltas(y, ps, pw, 'roc_auc', 200, seed=7))
    assert not np.array_equal(a, bootstrap_deltas(y, ps, pw, 'roc_auc', 200, seed=8))
    assert np.allclose(a, bootstrap_deltas(y, ps, pw, 'roc_auc', 200, seed=7, method='sklearn'), rtol=0, atol=1e-12)
    for metric, f in [('roc_auc', roc_auc_score), ('log_loss', log_loss)]:
        b = paired_bootstrap(y, ps, pw, metric, 1000, seed=7, confidence=0.95)
        assert b['delta'] == pytest.approx(f(y, ps) - f(y, pw), abs=1e-12)
        assert b['ci_low'] < b['delta'] < b['ci_high'] and b['n_valid'] == 1000


BAD_INPUT = {  # case: (extra arguments, change to the project, what the one-line error says)
    'unknown run': (lambda g: ['--run', 'f'*32], None, f"unknown run '{'f'*32}': no such run in the tracking store"),
    'unknown sweep': (lambda g: ['--sweep', 'no-such-sweep'], None, "unknown sweep 'no-such-sweep'"),
    'sweep without candidates': (lambda g: ['--sweep', EMPTY_SWEEP_ID], None,
                                 f"sweep {EMPTY_SWEEP_ID}: no candidate: none of its 1 configuration runs is FINISHED with a metric 'test_roc_auc'"),
    'run without metrics': (lambda g: ['--run', g.sweep_parent], None, "has no metric 'test_roc_auc'"),
    'run without model': (lambda g: ['--run', g.unlogged], None, 'has no logged model to register'),
    'missing test data': (lambda g: ['--from-build'], lambda root: (root/'build/features/test.parquet').unlink(),
                          "build/features/test.parquet: not found: the gate scores candidate and champion"),
    'bad gate param': (lambda g: [], lambda root: set_params(root, **{'gate.metric': 'accuracy'}), "'gate.metric' must be one of"),
}


@pytest.mark.parametrize('case', BAD_INPUT)
def test_bad_input_exits_2_in_one_line_and_registers_nothing(gate, tmp_path, register_here, case):
    """Through the console script for the first case, in-process through the same entry point for the others."""
    args, change, expected = BAD_INPUT[case]
    root = project(gate, tmp_path); name = name_of(root)
    if change: change(root)
    if case == 'unknown run':
        r = nbs(root, 'register', *args(gate), check=False, MLFLOW_TRACKING_URI=gate.uri)
        code, err = r.returncode, r.stderr
    else: code, _, err = register_here(root, *args(gate))
    assert code == 2, err
    last = err.strip().splitlines()[-1]
    assert last.startswith('error: ') and expected in last, last
    assert 'Traceback' not in err
    assert versions(gate, name) == [] and aliases(gate, name) == {} and not (root/'build/gate').exists()
