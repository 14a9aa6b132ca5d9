"""The team setup, for real on loopback: `mlflow server` on PostgreSQL (Debian's server) with its artifacts on an S3
API (moto's server mode), DVC's remote on the same S3 endpoint. One stack for the whole session (team/stack.py, as
`make team-up` starts it); the project copies change nothing but MLFLOW_TRACKING_URI. Nothing is mocked: the S3
outage is a real loopback relay in front of moto that stops answering (moto keeps objects in memory only, so killing
it would also drop what was logged), the database outage is PostgreSQL stopped for real (`pg_ctl -m immediate`)."""
from __future__ import annotations
import hashlib, json, re, socket, subprocess, sys, threading, time
from pathlib import Path
import pytest
import yaml
from conftest import BIN, PROJECT_FILES, ROOT, TEST_PARAMS, copy_project, env_for, nbs, run, set_params

sys.path.insert(0, str(ROOT/'team'))
from stack import HOST, S3_CLIENT, S3_KEYS, SERVER, SETTINGS, Stack, free_port  # noqa: E402

EXPERIMENT = 'flights-delay'
TEAM_FILES = PROJECT_FILES + ['Makefile']


class Relay:
    """A TCP relay 127.0.0.1:port -> moto: `cut()` refuses and drops every connection, `restore()` listens again."""

    def __init__(self, target: int):
        self.port, self.target, self.conns = free_port(), target, []
        self.restore()

    def restore(self) -> None:
        self.srv = socket.socket(); self.srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.srv.bind((HOST, self.port)); self.srv.listen(128)
        threading.Thread(target=self._accept, args=(self.srv,), daemon=True).start()

    def _accept(self, srv) -> None:
        while True:
            try: c, _ = srv.accept()
            except OSError: return
            try: u = socket.create_connection((HOST, self.target))
            except OSError: c.close(); continue
            self.conns += [c, u]
            for a, b in ((c, u), (u, c)): threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(a, b) -> None:
        try:
            while (data := a.recv(65536)): b.sendall(data)
        except OSError: pass
        finally:
            for s in (a, b):
                try: s.shutdown(socket.SHUT_RDWR)
                except OSError: pass

    def cut(self) -> None:
        try: self.srv.shutdown(socket.SHUT_RDWR)
        except OSError: pass
        self.srv.close()
        for s in self.conns:
            try: s.shutdown(socket.SHUT_RDWR); s.close()
            except OSError: pass
        self.conns = []


@pytest.fixture(scope='session')
def team(tmp_path_factory):
    """One team stack for the session: PostgreSQL, moto S3 (behind a relay) and mlflow server, on free loopback ports."""
    state = tmp_path_factory.mktemp('team-stack')
    s3_port = free_port()
    relay = Relay(s3_port)
    t0 = time.time()
    st = Stack(state, s3_port=s3_port, s3_endpoint_port=relay.port)
    try:
        st.up()
        st.started_in = time.time() - t0
        st.relay = relay
        yield st
    finally:
        st.down(remove=True); relay.cut()


def s3(st):
    import boto3
    return boto3.client('s3', endpoint_url=f'http://{HOST}:{st.s3_port}', region_name=SETTINGS['region'],
                        aws_access_key_id=S3_KEYS['AWS_ACCESS_KEY_ID'], aws_secret_access_key=S3_KEYS['AWS_SECRET_ACCESS_KEY'])


def s3_keys(st, prefix: str) -> list[str]:
    pages = s3(st).get_paginator('list_objects_v2').paginate(Bucket=SETTINGS['bucket'], Prefix=prefix)
    return [o['Key'] for p in pages for o in p.get('Contents', [])]


def client(st):
    from mlflow.tracking import MlflowClient
    return MlflowClient(st.tracking_uri)


def runs_of(st, root: Path) -> dict:
    """{run id: status} of every run a project copy made on the server."""
    c = client(st); exp = c.get_experiment_by_name(EXPERIMENT)
    if exp is None: return {}
    return {r.info.run_id: r.info.status for r in c.search_runs([exp.experiment_id], f"tags.`nbs.root` = '{root}'", max_results=1000)}


def make(root: Path, target: str, st, **vars) -> subprocess.CompletedProcess:
    """A Makefile target in a project copy, with this venv (`-o` keeps make from installing another one)."""
    args = [f'{k}={v}' for k, v in vars.items()]
    return run(['make', '-s', '-o', '.venv/.installed', target, f'BIN={BIN}', *args], root, MLFLOW_TRACKING_URI=st.tracking_uri)


@pytest.fixture(scope='session')
def team_project(team, tmp_path_factory) -> Path:
    """A project copy built with `make pipeline` against the team stack (only MLFLOW_TRACKING_URI set)."""
    root = copy_project(tmp_path_factory.mktemp('team-proj'), files=TEAM_FILES)
    set_params(root, **TEST_PARAMS)
    make(root, 'pipeline', team)
    return root


@pytest.mark.slow
def test_pipeline_register_serve_monitor_against_the_team_stack(team, team_project):
    root, c = team_project, client(team)
    run_id = json.loads((root/'build/train/run.json').read_text())['run_id']
    r = c.get_run(run_id)
    assert r.info.status == 'FINISHED' and r.data.metrics['test_roc_auc'] > 0.5 and r.data.tags['nbs.kind'] == 'build'
    # the run is in PostgreSQL and its artifacts (notebooks, the model) on S3, under the tracking server's destination
    import psycopg2
    with psycopg2.connect(host=HOST, port=team.pg_port, user=SETTINGS['db_user'], dbname=SETTINGS['db_name']) as con, con.cursor() as cur:
        cur.execute('select status from runs where run_uuid = %s', (run_id,))
        assert cur.fetchone() == ('FINISHED',)
    keys = s3_keys(team, 'mlflow/')
    assert any(k.endswith(f'{run_id}/artifacts/notebooks/03_train.ipynb') for k in keys), keys[:20]
    assert any(k.endswith('/MLmodel') for k in keys)
    assert not (root/'mlflow.db').exists() and not (root/'mlartifacts').exists()  # nothing went to the embedded store

    out = make(root, 'register', team).stdout
    assert 'promoted' in out, out
    mv = c.get_model_version_by_alias('flights-delay', 'champion')
    assert mv.run_id == run_id

    # `make serve` imports the champion from the remote registry first (nbs serve import), then serves it
    out = nbs(root, 'serve', 'import', MLFLOW_TRACKING_URI=team.tracking_uri).stdout
    assert f'MLflow flights-delay v{mv.version}, run {run_id}' in out, out
    got = run([str(BIN/'bentoml'), 'models', 'get', 'flights-delay-champion:latest', '-o', 'json'], root,
              BENTOML_HOME=str(root/'build/bentoml'))
    labels = json.loads(got.stdout)['labels']
    assert labels['run_id'] == run_id and labels['version'] == str(mv.version)

    out = make(root, 'monitor', team).stdout
    mon = re.search(r'MLflow run: (\w+) \(nbs.kind=monitor', out).group(1)
    assert c.get_run(mon).info.status == 'FINISHED'
    assert any(f'{mon}/artifacts/monitoring/drift.json' in k for k in s3_keys(team, 'mlflow/'))


def _git_project(dst: Path, **params) -> Path:
    """A git repository of the project (DVC metadata committed, data bytes ignored, `params` set), as a team shares it."""
    root = copy_project(dst, files=TEAM_FILES + ['.dvc/config', '.dvc/.gitignore', '.dvcignore', '.gitignore'])
    if params: set_params(root, **params)
    git = lambda *a: subprocess.run(['git', *a], cwd=root, check=True, capture_output=True, text=True)
    git('init', '-q', '-b', 'main'); git('add', '-A')
    git('-c', 'user.name=t', '-c', 'user.email=t@t', 'commit', '-qm', 'project')
    return root


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


@pytest.mark.slow
def test_data_push_then_a_fresh_clone_pulls_from_s3_and_verifies_md5(team, tmp_path):
    repo = _git_project(tmp_path/'repo')
    team.configure_dvc(repo)
    make(repo, 'data-push', team)
    recorded = {f: yaml.safe_load((repo/f'data/raw/{f}.dvc').read_text())['outs'][0]['md5'] for f in ('flights.csv.zip', 'weather.csv')}
    keys = s3_keys(team, 'dvc/')
    for md5 in recorded.values(): assert any(k.replace('/', '').endswith(md5) for k in keys), (md5, keys)

    clone = tmp_path/'clone'
    subprocess.run(['git', 'clone', '-q', str(repo), str(clone)], check=True)
    assert not (clone/'data/raw/flights.csv.zip').exists() and not (clone/'.dvc/cache').exists()
    team.configure_dvc(clone)  # each clone's endpoint and keys: .dvc/config.local, never committed
    out = make(clone, 'data-pull', team).stdout
    assert '2 files fetched' in out and 'data/raw: md5 verified' in out and 'regenerated' not in out, out  # dvc pull, then nbs data
    for f, md5 in recorded.items(): assert _md5(clone/'data/raw'/f) == md5


@pytest.mark.slow
def test_a_fresh_clone_builds_registers_and_reproduces_against_the_team_stack(team, tmp_path):
    """The whole loop of a second team member: a fresh clone pulls its data from S3, builds into the tracking server,
    registers the champion there, and `nbs reproduce models:/<name>@champion` re-runs that very run with identical metrics."""
    repo = _git_project(tmp_path/'repo', **TEST_PARAMS, **{'registry.model_name': 'team-repro', 'tracking.experiment': 'team-repro'})
    team.configure_dvc(repo)
    make(repo, 'data-push', team)
    clone = tmp_path/'clone'
    subprocess.run(['git', 'clone', '-q', str(repo), str(clone)], check=True)
    team.configure_dvc(clone)
    make(clone, 'pipeline', team)  # nbs data pulls data/raw from S3 first
    g = nbs(clone, 'register', '--from-build', MLFLOW_TRACKING_URI=team.tracking_uri)
    assert 'promoted' in g.stdout, g.stdout
    r = nbs(clone, 'reproduce', 'models:/team-repro@champion', check=False, timeout=1500, MLFLOW_TRACKING_URI=team.tracking_uri)
    assert r.returncode == 0 and 'reproduced: every metric is identical' in r.stdout, r.stdout[-3000:] + r.stderr[-3000:]
    run_id = json.loads((clone/'build/train/run.json').read_text())['run_id']
    assert f'run {run_id} (models:/team-repro@champion)' in r.stdout
    assert client(team).get_run(run_id).info.status == 'FINISHED'  # the team's record untouched by the reproduction


def _wait_running(st, root: Path, proc, timeout: float = 300) -> str:
    old = set(runs_of(st, root))  # a run left RUNNING by an earlier outage is not this build's
    t0 = time.time()
    while time.time() - t0 < timeout:
        assert proc.poll() is None, proc.communicate()
        running = [r for r, s in runs_of(st, root).items() if s == 'RUNNING' and r not in old]
        if running: return running[0]
        time.sleep(0.3)
    pytest.fail('the build never created its run')


def _build_then(st, root: Path, fault) -> tuple[subprocess.CompletedProcess, float, str]:
    """Start `nbs build`, apply `fault` once its run is RUNNING; (result, seconds from the fault to the exit, run id)."""
    # one OpenMP thread: on a busy 2-core machine a 2-thread fit can take a minute, which would be counted here
    env = env_for(root, MLFLOW_TRACKING_URI=st.tracking_uri, OMP_NUM_THREADS='1')
    p = subprocess.Popen([str(BIN/'nbs'), 'build'], cwd=root, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    rid = _wait_running(st, root, p)
    fault(); t0 = time.time()
    out, err = p.communicate(timeout=300)
    return subprocess.CompletedProcess(p.args, p.returncode, out, err), time.time() - t0, rid


@pytest.mark.slow
def test_database_then_s3_stopped_mid_build_fail_fast_and_the_next_build_closes_the_run(team, team_project, tmp_path):
    root = copy_project(tmp_path/'faults', src=team_project, files=TEAM_FILES + ['build'])
    before = json.loads((team_project/'build/train/run.json').read_text())['run_id']
    c = client(team); logged = c.get_run(before).data
    set_params(root, **{'train.seed': 7})  # train, evaluate and monitor re-run, each writing to the run

    # 1. PostgreSQL stops (as if it crashed) while train runs
    r, secs, rid_db = _build_then(team, root, lambda: team.stop_postgres('immediate'))
    try:
        last = r.stderr.strip().splitlines()[-1]
        assert r.returncode == 2 and f'tracking server {team.tracking_uri} cannot reach its database' in last, r.stderr[-3000:]
        assert secs < 30, (secs, last)
        print(f'database stopped: the build failed {secs:.1f} s later: {last}')
    finally:
        team.start_postgres()
    assert runs_of(team, root)[rid_db] == 'RUNNING'  # its failure hook could not reach the database either

    # 2. S3 stops answering while train runs: the database is back, the artifact store is not
    r, secs, rid_s3 = _build_then(team, root, team.relay.cut)
    try:
        last = r.stderr.strip().splitlines()[-1]
        assert r.returncode == 2 and f'tracking server {team.tracking_uri} cannot reach its artifact store' in last, r.stderr[-3000:]
        assert secs < 30, (secs, last)
        print(f'S3 stopped: the build failed {secs:.1f} s later: {last}')
    finally:
        team.relay.restore()
    st = runs_of(team, root)
    assert st[rid_db] == 'KILLED', st  # the next build closed the run the database outage left RUNNING
    assert st[rid_s3] in ('FAILED', 'RUNNING'), st

    # 3. both back: the next build closes what is left and succeeds; nothing logged before was lost
    nbs(root, 'build', MLFLOW_TRACKING_URI=team.tracking_uri)
    st = runs_of(team, root)
    assert st[rid_s3] in ('FAILED', 'KILLED') and 'RUNNING' not in st.values(), st
    new = json.loads((root/'build/train/run.json').read_text())['run_id']
    assert st[new] == 'FINISHED'
    again = c.get_run(before).data
    assert again.metrics == logged.metrics and again.params == logged.params
    files = {a.path for a in c.list_artifacts(before, 'notebooks')}
    assert 'notebooks/03_train.ipynb' in files
    assert c.get_model_version_by_alias('flights-delay', 'champion') is not None


@pytest.mark.slow
def test_two_clones_build_and_sweep_at_once_lose_no_run(team, team_project, tmp_path):
    """Two clones at once: `a` (a copy of the built project: its build is a no-op) sweeps in its own worker while `b`
    builds from scratch, then sweeps on a Dask scheduler; then both run the gate at once."""
    a = copy_project(tmp_path/'a', src=team_project, files=TEAM_FILES + ['build'])
    b = copy_project(tmp_path/'b', files=TEAM_FILES); set_params(b, **TEST_PARAMS)
    grid = tmp_path/'grid.yaml'; grid.write_text('hyperparams.hist_gradient_boosting.learning_rate: [0.05, 0.2]\n')
    sf, env = tmp_path/'scheduler.json', env_for(b, MLFLOW_TRACKING_URI=team.tracking_uri)
    sched = subprocess.Popen([str(BIN/'dask'), 'scheduler', '--host', HOST, '--port', '0', '--no-dashboard', '--scheduler-file', str(sf)],
                             cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    worker = None
    try:
        for _ in range(300):
            if sf.exists() and json.loads(sf.read_text() or '{}').get('address'): break
            time.sleep(0.2)
        address = json.loads(sf.read_text())['address']
        worker = subprocess.Popen([str(BIN/'dask'), 'worker', address, '--nworkers', '1', '--nthreads', '1', '--no-dashboard',
                                   '--local-directory', str(tmp_path/'dask')], cwd=tmp_path, env=env,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        procs = [subprocess.Popen(['make', '-s', '-o', '.venv/.installed', 'sweep', f'BIN={BIN}',
                                   f'SWEEP_ARGS=--grid {grid} --no-progress ' + ('--jobs 1' if root == a else f'--scheduler {address}')],
                                  cwd=root, env=env_for(root, MLFLOW_TRACKING_URI=team.tracking_uri),
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for root in (a, b)]
        outs = [p.communicate(timeout=900)[0] for p in procs]
        for p, out in zip(procs, outs): assert p.returncode == 0, out[-4000:]
    finally:
        for p in (worker, sched):
            if p and p.poll() is None: p.terminate(); p.wait(timeout=30)
    c = client(team)
    for root in (a, b):
        st = runs_of(team, root)
        kinds = {}
        for rid in st: kinds.setdefault(c.get_run(rid).data.tags.get('nbs.kind'), []).append(st[rid])
        assert set(kinds.get('build', [])) <= {'FINISHED'} and len(kinds.get('build', [])) == (root == b), kinds
        assert kinds.get('sweep') == ['FINISHED'] and all(s == 'FINISHED' for s in kinds.get('monitor', [])), kinds
        assert sorted(kinds.get('sweep-config', [])) == ['FINISHED', 'FINISHED'], kinds
    # both gates at once on the same registered model: the alias ends on a version that exists, of one of our runs
    procs = [subprocess.Popen([str(BIN/'nbs'), 'register'], cwd=root, env=env_for(root, MLFLOW_TRACKING_URI=team.tracking_uri),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for root in (a, b)]
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode in (0, 3), err[-3000:]
    mv = c.get_model_version_by_alias('flights-delay', 'champion')
    assert c.get_run(mv.run_id).info.status == 'FINISHED'
    versions = c.search_model_versions("name = 'flights-delay'")
    sources = [v.source for v in versions]
    assert len(sources) == len(set(sources)), sources  # the same model registered twice keeps one version


def test_compose_names_the_tested_stack():
    """docker-compose.yml describes the stack tests run: the same PostgreSQL major, mlflow and moto versions, bucket,
    database, artifact destination and ports, the Bento's image."""
    comp = yaml.safe_load((ROOT/'docker-compose.yml').read_text())
    lock = dict(l.strip().split('==') for l in (ROOT/'requirements.lock').read_text().splitlines() if re.match(r'^[A-Za-z0-9].*==', l))
    sv = comp['services']
    assert set(sv) >= {'postgres', 's3', 'mlflow', 'service'}
    assert sv['postgres']['image'] == f"postgres:{SETTINGS['postgres_major']}"
    pg_env = sv['postgres']['environment']
    assert pg_env['POSTGRES_USER'] == SETTINGS['db_user'] and pg_env['POSTGRES_DB'] == SETTINGS['db_name']
    assert sv['s3']['image'] == f"motoserver/moto:{lock['moto']}"
    ml = sv['mlflow']
    assert ml['image'] == f"ghcr.io/mlflow/mlflow:v{lock['mlflow']}"
    cmd = ' '.join(ml['command']) if isinstance(ml['command'], list) else ml['command']
    assert f"--artifacts-destination {SETTINGS['artifacts_destination']}" in cmd
    assert re.search(rf"--backend-store-uri postgresql\+psycopg2://{SETTINGS['db_user']}(:[^@]*)?@postgres:5432/{SETTINGS['db_name']}", cmd), cmd
    assert f"psycopg2-binary=={lock['psycopg2-binary']}" in cmd and f"boto3=={lock['boto3']}" in cmd
    assert ml['environment']['MLFLOW_S3_ENDPOINT_URL'] == 'http://s3:5000'
    assert ml['environment']['MLFLOW_DISABLE_TELEMETRY'] == 'true'
    for k, v in {**S3_CLIENT, **S3_KEYS, **SERVER}.items(): assert ml['environment'][k] == v, k
    assert f"--workers {Stack.__init__.__defaults__[-1]}" in cmd
    assert f"create_bucket(Bucket='{SETTINGS['bucket']}')" in cmd
    ports = {n: int(str(s['ports'][0]).split(':')[-2]) for n, s in sv.items() if s.get('ports')}
    assert ports['postgres'] == SETTINGS['ports']['postgres'] and ports['s3'] == SETTINGS['ports']['s3']
    assert ports['mlflow'] == SETTINGS['ports']['mlflow']
    assert all(str(s['ports'][0]).startswith('127.0.0.1:') for s in sv.values() if s.get('ports'))  # loopback only
    assert sv['service']['image'].split(':')[0] == yaml.safe_load((ROOT/'bentofile.yaml').read_text())['name']  # bentoml containerize's tag
    assert int(str(sv['service']['ports'][0]).split(':')[-1]) == yaml.safe_load((ROOT/'params.yaml').read_text())['serve']['port']


def test_actionlint_passes_every_workflow():
    files = sorted((ROOT/'.github/workflows').glob('*.y*ml'))
    assert {f.name for f in files} >= {'ci.yml', 'release.yml'}
    r = subprocess.run([str(BIN/'actionlint'), '-no-color', *map(str, files)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
