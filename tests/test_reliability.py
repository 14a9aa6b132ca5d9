"""Faults: a build killed mid-task, corrupt inputs. Nothing is lost, nothing partial is taken as up to date."""
from __future__ import annotations
import json, os, signal, sqlite3, subprocess, time
from pathlib import Path
import pytest
from conftest import BIN, env_for, metrics, nbs, ran_tasks, run_statuses, set_params


def _running_build(root: Path) -> bool:
    db = root/'mlflow.db'
    if not db.exists(): return False
    try:
        with sqlite3.connect(db, timeout=1) as con:
            return bool(con.execute("select count(*) from runs where status='RUNNING'").fetchone()[0])
    except sqlite3.Error: return False


@pytest.mark.slow
def test_build_killed_mid_task_reruns_it_and_closes_its_run(sample_project, built_copy):
    root = built_copy
    set_params(root, **{'train.hyperparams.hist_gradient_boosting.max_iter': 400})  # train re-runs, and takes a while
    p = subprocess.Popen([str(BIN/'nbs'), 'build'], cwd=root, env=env_for(root), start_new_session=True,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not _running_build(root):  # the train notebook has created its run: we are inside the task
        assert p.poll() is None and time.time() < deadline, 'train never started'
        time.sleep(0.2)
    time.sleep(1.0)
    os.killpg(p.pid, signal.SIGKILL); p.wait()
    killed = [rid for rid, st in run_statuses(root).items() if st == 'RUNNING']
    assert len(killed) == 1
    r = nbs(root, 'build')
    assert ran_tasks(r) == ['train', 'evaluate', 'monitor']
    assert run_statuses(root)[killed[0]] == 'KILLED'
    new = json.loads((root/'build/train/run.json').read_text())['run_id']
    assert new != killed[0] and run_statuses(root)[new] == 'FINISHED'
    assert ran_tasks(nbs(root, 'build')) == []


def test_second_concurrent_build_is_refused(built_copy):
    import fcntl
    with open(built_copy/'build'/'.lock', 'w') as f:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as a running build holds it
        r = nbs(built_copy, 'build', '--force', check=False)
    assert r.returncode == 2 and 'another build is running' in r.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize('name, write, expected', [
    ('flights.parquet', lambda src, dst: dst.write_bytes(src.read_bytes()[:5000]), 'cannot be read as parquet'),
    ('flights.csv.zip', lambda src, dst: dst.write_bytes(b''), 'file is empty'),
    ('flights.csv', lambda src, dst: dst.write_bytes('year,month,carrier\n2013,1,Caf\xe9\n'.encode('latin-1')), 'not UTF-8'),
    ('flights.csv.zip', lambda src, dst: dst.write_bytes(src.read_bytes()[:len(src.read_bytes())//2]), 'cannot be read as CSV'),
])
def test_corrupt_raw_inputs_fail_in_one_line_and_keep_products(built_copy, name, write, expected):
    root = built_copy
    before = {p: p.read_bytes() for p in (root/'build').rglob('*.parquet')}
    runs = run_statuses(root)
    src = root/'build/ingest/flights.parquet' if name.endswith('.parquet') else root/'data/raw/flights.csv.zip'
    tmp = root/'data/raw'/('bad-' + name)
    write(src, tmp)
    set_params(root, **{'data.files.flights': tmp.name})
    r = nbs(root, 'build', check=False)
    assert r.returncode == 2
    last = r.stderr.strip().splitlines()[-1]
    assert "task 'ingest' failed" in last and tmp.name in last and expected in last, last
    assert {p: p.read_bytes() for p in (root/'build').rglob('*.parquet')} == before
    assert run_statuses(root) == runs
    assert metrics(root)['test']['n'] > 0


def test_unreachable_tracking_server_fails_fast_and_keeps_products(built_copy):
    import socket
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0)); port = s.getsockname()[1]  # closed once we leave: nothing listens there
    before = {p: p.read_bytes() for p in (built_copy/'build').rglob('*.parquet')}
    r = nbs(built_copy, 'build', '--force', check=False, timeout=120, MLFLOW_TRACKING_URI=f'http://127.0.0.1:{port}')
    assert r.returncode == 2
    last = r.stderr.strip().splitlines()[-1]
    assert f'tracking server http://127.0.0.1:{port} is unreachable' in last, last
    assert {p: p.read_bytes() for p in (built_copy/'build').rglob('*.parquet')} == before
