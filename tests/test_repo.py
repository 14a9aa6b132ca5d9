"""The repository's own invariants: generated code in sync, clean notebooks, consistent environments."""
from __future__ import annotations
import json, re, subprocess
import pytest
from conftest import BIN, ROOT, copy_project, env_for


def test_nbs_lib_is_in_sync_with_library_notebooks(tmp_path):
    """nbdev-export over notebooks/lib reproduces nbs_lib/ byte for byte (nbs_lib is generated, never edited)."""
    root = copy_project(tmp_path/'p', files=['pyproject.toml', 'README.md', 'params.yaml', 'pipeline.yaml', 'notebooks', 'nbs_lib'])
    r = subprocess.run([str(BIN/'nbdev-export')], cwd=root, env=env_for(root), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    diffs = [p.name for p in sorted((ROOT/'nbs_lib').glob('*.py')) if p.read_text() != (root/'nbs_lib'/p.name).read_text()]
    new = sorted({p.name for p in (root/'nbs_lib').glob('*.py')} - {p.name for p in (ROOT/'nbs_lib').glob('*.py')})
    assert not diffs and not new, f"nbs_lib out of sync with notebooks/lib (run `make export`): changed {diffs}, missing {new}"
    assert (root/'pyproject.toml').read_text() == (ROOT/'pyproject.toml').read_text(), 'nbdev-export rewrote pyproject.toml'


def test_library_notebooks_inline_tests_pass():
    r = subprocess.run([str(BIN/'nbdev-test'), '--n-workers', '2'], cwd=ROOT, env=env_for(ROOT), capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]


@pytest.mark.parametrize('nb', sorted(str(p.relative_to(ROOT)) for p in (ROOT/'notebooks').rglob('*.ipynb') if '.ipynb_checkpoints' not in str(p)))
def test_committed_notebooks_have_no_outputs(nb):
    cells = json.loads((ROOT/nb).read_text())['cells']
    dirty = [i for i, c in enumerate(cells) if c['cell_type'] == 'code' and (c.get('outputs') or c.get('execution_count'))]
    assert not dirty, f"{nb}: cells {dirty} carry outputs (run `make export`, which strips them)"


def test_task_notebooks_have_a_parameters_cell_and_call_the_library():
    for nb in sorted((ROOT/'notebooks/tasks').glob('*.ipynb')):
        cells = json.loads(nb.read_text())['cells']
        params = [c for c in cells if 'parameters' in c.get('metadata', {}).get('tags', [])]
        assert len(params) == 1, nb.name
        src = ''.join(params[0]['source'])
        assert 'upstream = None' in src and 'product = None' in src, nb.name
        body = '\n'.join(''.join(c['source']) for c in cells if c['cell_type'] == 'code')
        assert 'nbs_lib' in body and not re.search(r'^\s*def ', body, re.M), f"{nb.name}: reusable logic belongs in notebooks/lib"


def _pins(lines):
    return {l.split('==')[0].strip().lower(): l.split('==')[1].strip() for l in lines if re.match(r'^\s*-?\s*[A-Za-z0-9][^=\s]*==', l)}


def test_environment_yml_lists_the_lock():
    lock = _pins((ROOT/'requirements.lock').read_text().splitlines())
    env = _pins([l.strip().lstrip('- ').strip() for l in (ROOT/'environment.yml').read_text().splitlines()])
    assert lock and env == lock, f"environment.yml differs from requirements.lock (run `make lock`): {sorted(set(env.items()) ^ set(lock.items()))[:10]}"
    assert re.search(r'python=3\.11', (ROOT/'environment.yml').read_text())


def test_lock_pins_what_the_design_requires():
    lock = _pins((ROOT/'requirements.lock').read_text().splitlines())
    assert lock['bentoml'].split('.')[:2] >= ['1', '4'] and int(lock['networkx'].split('.')[1]) < 6
    assert lock['ploomber'] == '0.23.3' and int(lock['pyarrow'].split('.')[0]) < 26 and lock['mlflow'].startswith('3.')


def test_ruff_is_clean():
    if not (BIN/'ruff').exists(): pytest.skip('ruff not installed')
    dirs = [d for d in ('nbs_lib', 'tests', 'bench') if (ROOT/d).is_dir()]  # a generated project has no bench/
    r = subprocess.run([str(BIN/'ruff'), 'check', *dirs], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-3000:]
