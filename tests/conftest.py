"""Shared fixtures: a throw-away copy of the project, built on a small sample of the real data, with its own
sqlite MLflow store. Everything runs the real components (notebooks, ploomber, MLflow), nothing is mocked."""
from __future__ import annotations
import json, os, shutil, subprocess, sys, tomllib
from pathlib import Path
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
# the share of the raw rows a test build keeps (pyproject's [tool.nbs] test_sample_frac; `nbs new` sets it for your data)
SAMPLE_FRAC = float(tomllib.loads((ROOT/'pyproject.toml').read_text()).get('tool', {}).get('nbs', {}).get('test_sample_frac', 0.03))
# a test build's params: that sample, and permutation importance on 300 rows (a second of evaluate a build, none of it checked)
TEST_PARAMS = {'data.sample_frac': SAMPLE_FRAC, 'evaluate.importance_rows': 300}
# what a project copy needs: the sources of the pipeline, not products or stores
PROJECT_FILES = ['params.yaml', 'pipeline.yaml', 'pyproject.toml', 'requirements.lock', 'notebooks', 'nbs_lib', 'data/raw']
OFFLINE = {'MLFLOW_DISABLE_TELEMETRY': 'true', 'BENTOML_DO_NOT_TRACK': 'true', 'DVC_NO_ANALYTICS': '1',
           'PLOOMBER_VERSION_CHECK_DISABLED': '1', 'PLOOMBER_STATS_ENABLED': 'false', 'DO_NOT_TRACK': '1',
           'PLOOMBER_ENV_FILENAME': 'params.yaml'}
os.environ.update(OFFLINE)


def copy_project(dst: Path, src: Path = ROOT, files=PROJECT_FILES) -> Path:
    """Copy the project's sources to `dst` (data/raw included, products and stores excluded)."""
    dst.mkdir(parents=True, exist_ok=True)
    for f in files:
        s = src/f
        if s.is_dir():
            shutil.copytree(s, dst/f, ignore=shutil.ignore_patterns('__pycache__', '.ipynb_checkpoints'))
        elif s.exists():
            (dst/f).parent.mkdir(parents=True, exist_ok=True); shutil.copy2(s, dst/f)
    return dst


def set_params(root: Path, **updates) -> dict:
    """Set dotted keys in root/params.yaml (e.g. **{'train.seed': 3}); returns the new params."""
    p = yaml.safe_load((root/'params.yaml').read_text())
    for key, value in updates.items():
        cur = p; *parents, last = key.split('.')
        for k in parents: cur = cur.setdefault(k, {})
        if value is DELETE: cur.pop(last, None)
        else: cur[last] = value
    (root/'params.yaml').write_text(yaml.safe_dump(p, sort_keys=False))
    return p

DELETE = object()


def env_for(root: Path, **extra) -> dict:
    """Environment for a subprocess working in the project copy at `root` (its nbs_lib imported first)."""
    env = {k: v for k, v in os.environ.items() if k not in ('MLFLOW_TRACKING_URI', 'NBS_ROOT')}
    env.update(OFFLINE); env['PYTHONPATH'] = str(root); env['PATH'] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env.update(extra)
    return env


def run(cmd: list[str], root: Path, check: bool = True, timeout: int = 900, **extra) -> subprocess.CompletedProcess:
    """Run a command in the project copy; on an unexpected exit code, fail with its output."""
    r = subprocess.run(cmd, cwd=root, env=env_for(root, **extra), capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        pytest.fail(f"{' '.join(map(str, cmd))} exited {r.returncode}\n--- stdout\n{r.stdout[-4000:]}\n--- stderr\n{r.stderr[-6000:]}")
    return r


def nbs(root: Path, *args: str, **kw) -> subprocess.CompletedProcess:
    """Run the project's CLI (`nbs ...`) in `root`."""
    return run([str(BIN/'nbs'), *args], root, **kw)


def nbs_here(root: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    """`nbs ARGS` in `root` (with the environment variables `env` set) through the same entry point, in this process: no
    interpreter start-up and the imports shared between tests (about 1.5 s a call). For the calls that stop before
    anything runs (params and argument checks) and a test's set-up steps; their exit code, stdout and stderr are
    returned as `nbs` would give them."""
    import contextlib, io
    from nbs_lib.cli import main
    env = {'NBS_ROOT': str(root), **env}
    out, err, before = io.StringIO(), io.StringIO(), {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err): code = main(list(args))
    finally:
        for k, v in before.items():
            if v is None: os.environ.pop(k, None)
            else: os.environ[k] = v
    return subprocess.CompletedProcess(['nbs', *args], code, out.getvalue(), err.getvalue())


def ran_tasks(r: subprocess.CompletedProcess) -> list[str]:
    """Tasks a `nbs build` says it ran, from its closing line."""
    line = next(l for l in r.stdout.splitlines() if l.startswith('build done'))
    tail = line.split(': ran ', 1)[1]
    return [] if tail.startswith('nothing') else [t.strip() for t in tail.split(',')]


def run_statuses(root: Path) -> dict:
    """{run id: status} of every run in every experiment of the project's sqlite MLflow store."""
    from mlflow.tracking import MlflowClient
    client = MlflowClient(f"sqlite:///{root/'mlflow.db'}")
    return {r.info.run_id: r.info.status for r in client.search_runs([e.experiment_id for e in client.search_experiments()])}


def metrics(root: Path) -> dict:
    return json.loads((root/'build/evaluate/metrics.json').read_text())


@pytest.fixture(scope='session')
def sample_project(tmp_path_factory, request) -> Path:
    """A project copy built once per test run on a small sample of the real data, shared by the xdist workers (the first
    to ask builds it, under a lock); tests must not modify it."""
    from filelock import FileLock
    base = tmp_path_factory.getbasetemp()
    if hasattr(request.config, 'workerinput'): base = base.parent  # an xdist worker: the run's folder, above each worker's own
    root, done = base/'sample', base/'sample.built'
    with FileLock(str(base/'sample.lock')):
        if not done.exists():
            shutil.rmtree(root, ignore_errors=True)  # a build that failed in another worker: again, to fail here too
            copy_project(root); set_params(root, **TEST_PARAMS)
            r = nbs(root, 'build')
            (root/'.build.stdout').write_text(r.stdout); (root/'.build.stderr').write_text(r.stderr)  # what a first build prints
            done.touch()
    return root


@pytest.fixture
def fresh_project(tmp_path) -> Path:
    """A project copy of this test's own, on the small sample, not built yet."""
    root = copy_project(tmp_path/'proj')
    set_params(root, **TEST_PARAMS)
    return root


@pytest.fixture
def built_copy(sample_project, tmp_path) -> Path:
    """A copy of the built sample project (products, ploomber metadata, MLflow store) that a test may change."""
    return copy_project(tmp_path/'built', src=sample_project, files=PROJECT_FILES + ['build', 'mlflow.db'])


# `make test` runs on every core (pytest-xdist: -n auto --dist loadfile, in pyproject.toml): each file on one worker, so
# a file's module and session fixtures (a registry built from real runs, a running server, the team stack) are built
# once and its tests keep their order. The longest files first (slow tests first within a file that has no fixture of
# its own to keep in order), so that the workers finish together: the order of the suite's costs on CI's 2 cores
# (bench/bench_suite.py). --no-loadscope-reorder keeps this order: by default xdist orders files by their number of tests.
LONGEST_FIRST = ['test_pipeline.py', 'test_team.py', 'test_template.py', 'test_sweep.py', 'test_gate.py', 'test_deploy.py',
                 'test_serving.py', 'test_onnx.py', 'test_versioning.py', 'test_spec.py', 'test_reliability.py', 'test_loop.py',
                 'test_monitor.py', 'test_hostile.py', 'test_repo.py', 'test_fuzz.py', 'test_project.py']


def _has_own_fixture(item) -> bool:
    """Whether `item` uses a module or session fixture defined in its test file (its tests may depend on their order)."""
    return any(d[-1].scope in ('module', 'session') and d[-1].baseid.endswith('.py')
               for d in getattr(item, '_fixtureinfo').name2fixturedefs.values())


def pytest_collection_modifyitems(config, items):
    rank = {f: i for i, f in enumerate(LONGEST_FIRST)}
    own = {Path(str(it.fspath)).name for it in items if _has_own_fixture(it)}
    def key(it):
        f = Path(str(it.fspath)).name
        return rank.get(f, len(rank)), f, f not in own and it.get_closest_marker('slow') is None
    items.sort(key=key)
