"""ONNX (issue 15): the champion converted by `nbs onnx`, checked against sklearn on the whole test set and logged to
MLflow with the onnx flavor; a step that cannot convert named in one line; the service's answers with serve.runtime
onnx equal to those with sklearn over HTTP. Real MLflow store, onnxruntime and `bentoml serve`."""
from __future__ import annotations
import json, re
from pathlib import Path
import httpx
import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient
from conftest import PROJECT_FILES, copy_project, env_for, nbs, set_params
from servers import json_records, serving

NAME = 'flights-delay'


@pytest.fixture(scope='module')
def champion(sample_project, tmp_path_factory):
    root = copy_project(tmp_path_factory.mktemp('onnx')/'p', src=sample_project, files=PROJECT_FILES + ['build', 'mlflow.db'])
    copy_project(root, files=['service.py', 'bentofile.yaml'])
    set_params(root, **{'gate.bootstrap.n_resamples': 200, 'serve.batching.max_latency_ms': 10000})
    nbs(root, 'register', '--from-build')
    return root


def test_onnx_export_checks_parity_on_the_whole_test_set_and_logs_the_onnx_flavor(champion):
    import mlflow, mlflow.onnx, onnxruntime
    from nbs_lib.onnx_model import feeds, pipeline_parts
    from nbs_lib.tracking import load_model
    c = MlflowClient(f"sqlite:///{champion/'mlflow.db'}")
    refused = nbs(champion, 'onnx', '--tolerance', '1e-18', check=False)  # the float64 sums differ in the last bits: fails parity
    assert refused.returncode == 2 and 'fails parity' in refused.stderr and 'nothing logged' in refused.stderr, refused.stderr
    assert 'onnx.model_uri' not in c.get_model_version_by_alias(NAME, 'champion').tags
    r = nbs(champion, 'onnx')
    diff = float(re.search(r'parity: max \|onnxruntime - sklearn\| = (\S+) over ([\d,]+) test rows', r.stdout).group(1))
    assert diff <= 1e-6, r.stdout
    v = c.get_model_version_by_alias(NAME, 'champion'); tags = v.tags
    assert float(tags['onnx.parity_max_abs_diff']) == pytest.approx(diff) and int(tags['onnx.parity_rows']) > 1000
    # the test's own check: the logged graph, loaded by MLflow's onnx flavor and run by onnxruntime, on every test row
    mlflow.set_tracking_uri(f"sqlite:///{champion/'mlflow.db'}")
    proto = mlflow.onnx.load_model(tags['onnx.model_uri'])
    test = pd.read_parquet(champion/'build/features/test.parquet').drop(columns=['late'])
    sk = load_model(f'models:/{NAME}@champion'); _, inputs, cat, *_ = pipeline_parts(sk)
    got = onnxruntime.InferenceSession(proto.SerializeToString()).run(['score'], feeds(test, inputs, cat))[0]
    assert np.max(np.abs(got - sk.predict_proba(test)[:, 1])) <= 1e-6
    info = mlflow.models.get_model_info(tags['onnx.model_uri'])
    assert 'onnx' in info.flavors and {i['name'] for i in info.signature.inputs.to_dict()} == set(inputs)
    from importlib.metadata import version  # its requirements: pinned to this environment (given, not inferred by MLflow)
    reqs = set(Path(mlflow.pyfunc.get_model_dependencies(tags['onnx.model_uri'])).read_text().split())
    assert reqs == {f'{p}=={version(p)}' for p in ('mlflow', 'onnx', 'onnxruntime', 'numpy')}, reqs


def test_a_runs_model_converts_too(champion):
    run_id = json.loads((champion/'build/train/run.json').read_text())['run_id']
    r = nbs(champion, 'onnx', '--run', run_id)
    assert f'run {run_id} of {NAME}' in r.stdout
    assert MlflowClient(f"sqlite:///{champion/'mlflow.db'}").get_run(run_id).data.tags['onnx.model_uri'].startswith('models:/m-')
    # the gate still finds the run's sklearn model, not its ONNX copy logged beside it
    g = nbs(champion, 'register', '--run', run_id, check=False)
    assert g.returncode == 0 and 'kept' in g.stdout, g.stdout[-1500:] + g.stderr[-1500:]


def test_a_model_that_cannot_convert_is_named_in_one_line(champion, tmp_path):
    root = copy_project(tmp_path/'lr', src=champion, files=PROJECT_FILES + ['build', 'mlflow.db'])
    set_params(root, **{'train.family': 'logistic_regression'})
    nbs(root, 'build')
    nbs(root, 'register', '--from-build', check=False)  # promoted or rejected, it is registered as challenger
    r = nbs(root, 'onnx', '--alias', 'challenger', check=False)
    assert r.returncode == 2 and r.stderr.strip().count('\n') == 0, r.stderr
    assert "pipeline step 'prep' cannot be converted: transformer 'cat' is a OneHotEncoder" in r.stderr
    assert 'onnx.model_uri' not in MlflowClient(f"sqlite:///{root/'mlflow.db'}").get_model_version_by_alias(NAME, 'challenger').tags


def test_served_answers_with_onnxruntime_equal_sklearns_over_http(champion):
    rows = pd.read_parquet(champion/'build/features/test.parquet').drop(columns=['late']).head(300)
    recs = json_records(rows)
    home = str(champion/'build/bentoml')
    nbs(champion, 'serve', 'import', BENTOML_HOME=home)
    answers = {}
    for runtime in ('onnx', 'sklearn'):
        set_params(champion, **{'serve.runtime': runtime})
        with serving(champion, env_for(champion, BENTOML_HOME=home, MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR='false')) as (url, _, _):
            c = httpx.Client(base_url=url, timeout=60)
            got = [c.post('/predict', json={'records': recs[i:i + 50]}) for i in range(0, len(recs), 50)]
            assert all(g.status_code == 200 for g in got), [g.text for g in got if g.status_code != 200][:2]
            answers[runtime] = np.array([a['probability'] for g in got for a in g.json()])
            one = c.post('/predict', json={'records': recs[:1]}).json()[0]  # one row, the latency path
            assert one['probability'] == pytest.approx(answers[runtime][0], abs=1e-12)
        log = (champion/'server.log').read_text()
        assert f"champion version 1 scored by {'onnxruntime' if runtime == 'onnx' else 'scikit-learn'}" in log, log[-2000:]
    assert np.max(np.abs(answers['onnx'] - answers['sklearn'])) <= 1e-6
