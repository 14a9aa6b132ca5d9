"""The team stack on loopback: PostgreSQL (Debian's server) as MLflow's backend store, an S3 API (moto's server
mode) for MLflow's artifacts and the DVC remote, and `mlflow server` in front of both, as a team runs it.

    python team/stack.py up [--state .team] [--pg-port 5433] [--s3-port 9000] [--mlflow-port 5001]
    python team/stack.py down | status | env

`up` writes `<state>/env` (`export MLFLOW_TRACKING_URI=...`: the one variable a clone needs) and, with
`--dvc-project DIR`, points that project's DVC remote at the S3 endpoint in its git-ignored `.dvc/config.local`.
`tests/test_team.py` starts the same stack on free ports with `Stack(...).up()`; `docker-compose.yml` describes it
with the versions and settings of SETTINGS below (a test keeps them equal).
Every server listens on 127.0.0.1 only. moto keeps its objects in memory: `down` loses them (a first trial's stack).
"""
from __future__ import annotations
import argparse, contextlib, glob, json, os, shutil, signal, socket, subprocess, sys, tempfile, time, urllib.request
from pathlib import Path

HOST = '127.0.0.1'
# What docker-compose.yml must name too (tests/test_team.py::test_compose_names_the_tested_stack).
SETTINGS = {
    'postgres_major': 15,                 # Debian 12's postgresql; the compose image is postgres:15
    'db_user': 'mlflow', 'db_name': 'mlflow',
    'bucket': 'nbs-flights',
    'artifacts_destination': 's3://nbs-flights/mlflow',
    'dvc_url': 's3://nbs-flights/dvc',
    'region': 'us-east-1',
    'ports': {'postgres': 5433, 's3': 9000, 'mlflow': 5001},
}
# moto accepts any key; these are its documented test credentials, never real ones
S3_KEYS = {'AWS_ACCESS_KEY_ID': 'testing', 'AWS_SECRET_ACCESS_KEY': 'testing'}
# the tracking server's S3 client: fail over in seconds, not after botocore's default retries
S3_CLIENT = {'AWS_DEFAULT_REGION': SETTINGS['region'], 'AWS_RETRY_MODE': 'standard', 'AWS_MAX_ATTEMPTS': '2'}
OFFLINE = {'MLFLOW_DISABLE_TELEMETRY': 'true', 'DO_NOT_TRACK': '1', 'DVC_NO_ANALYTICS': '1'}
# the tracking server's own settings: no GenAI job runners (two more processes of huey consumers, unused here)
SERVER = {'MLFLOW_SERVER_ENABLE_JOB_EXECUTION': 'false'}
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0)); return s.getsockname()[1]


def pg_bindir() -> Path:
    "The newest installed PostgreSQL server's bin folder (Debian: /usr/lib/postgresql/N/bin)."
    found = sorted(glob.glob('/usr/lib/postgresql/*/bin/initdb'), key=lambda p: int(Path(p).parts[-3]))
    if found: return Path(found[-1]).parent
    if shutil.which('initdb'): return Path(shutil.which('initdb')).parent
    raise RuntimeError('no PostgreSQL server found: apt-get install postgresql (Debian), then try again')


def _wait(what: str, check, timeout: float, proc=None, log: Path | None = None) -> float:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc is not None and proc.poll() is not None:
            tail = log.read_text()[-2000:] if log and log.exists() else ''
            raise RuntimeError(f'{what} exited with {proc.returncode} while starting\n{tail}')
        with contextlib.suppress(Exception):
            if check(): return time.time() - t0
        time.sleep(0.2)
    tail = log.read_text()[-2000:] if log and log.exists() else ''
    raise RuntimeError(f'{what} not ready after {timeout:.0f} s\n{tail}')


def _http_ok(url: str) -> bool:
    with urllib.request.urlopen(url, timeout=2) as r: return r.status < 500


def _port_open(port: int) -> bool:
    with socket.create_connection((HOST, port), timeout=1): return True


class Stack:
    "PostgreSQL + moto S3 + mlflow server on loopback, its state (data, logs, pids) under `state`."

    def __init__(self, state: str | Path, pg_port: int | None = None, s3_port: int | None = None,
                 mlflow_port: int | None = None, s3_endpoint_port: int | None = None, workers: int = 2):
        self.state = Path(state).resolve(); self.state.mkdir(parents=True, exist_ok=True)
        saved = self._load()
        ports = saved.get('ports', {})
        self.pg_port = pg_port or ports.get('postgres') or free_port()
        self.s3_port = s3_port or ports.get('s3') or free_port()
        self.mlflow_port = mlflow_port or ports.get('mlflow') or free_port()
        # where clients reach S3: moto itself, or a relay in front of it (tests cut that to fake an outage)
        self.s3_endpoint_port = s3_endpoint_port or ports.get('s3_endpoint') or self.s3_port
        self.workers = workers
        self.pgdata = Path(saved['pgdata']) if saved.get('pgdata') else None
        self._procs = {}  # the servers this process started (reaped here; others are found by their pid file)

    # --- bookkeeping
    def _file(self) -> Path: return self.state/'stack.json'

    def _load(self) -> dict:
        try: return json.loads((self.state/'stack.json').read_text())
        except (OSError, ValueError): return {}

    def _save(self, **kw) -> None:
        d = self._load(); d.update(kw); self._file().write_text(json.dumps(d, indent=1))

    @property
    def tracking_uri(self) -> str: return f'http://{HOST}:{self.mlflow_port}'

    @property
    def s3_endpoint(self) -> str: return f'http://{HOST}:{self.s3_endpoint_port}'

    @property
    def db_uri(self) -> str: return f"postgresql+psycopg2://{SETTINGS['db_user']}@{HOST}:{self.pg_port}/{SETTINGS['db_name']}"

    def s3_env(self) -> dict:
        "What an S3 client (mlflow server, boto3) needs: the endpoint, moto's keys, the region, quick retries."
        return {**S3_KEYS, **S3_CLIENT, 'MLFLOW_S3_ENDPOINT_URL': self.s3_endpoint, 'AWS_ENDPOINT_URL_S3': self.s3_endpoint}

    # --- PostgreSQL
    def _as_postgres(self, cmd: list[str]) -> list[str]:
        "The server refuses to run as root: as root, run its tools as the `postgres` user."
        return ['runuser', '-u', 'postgres', '--', *cmd] if os.geteuid() == 0 else cmd

    def start_postgres(self) -> None:
        b = pg_bindir()
        if self.pgdata is None or not (self.pgdata/'PG_VERSION').exists():
            # as root the data folder must belong to `postgres`, outside folders it cannot enter (pytest's are 0700)
            self.pgdata = Path(tempfile.mkdtemp(prefix='nbs-team-pg-')) if os.geteuid() == 0 else self.state/'pg'
            if os.geteuid() == 0: shutil.chown(self.pgdata, 'postgres', 'postgres')
            subprocess.run(self._as_postgres([str(b/'initdb'), '-D', str(self.pgdata), '-U', SETTINGS['db_user'],
                                              '--auth=trust', '-E', 'UTF8', '--no-sync']),
                           check=True, capture_output=True, text=True)
            self._save(pgdata=str(self.pgdata))
        opts = f"-h {HOST} -p {self.pg_port} -k {self.pgdata} -c fsync=off -c max_connections=100"
        r = subprocess.run(self._as_postgres([str(b/'pg_ctl'), '-D', str(self.pgdata), '-l', str(self.pgdata/'server.log'),
                                              '-o', opts, '-w', '-t', '60', 'start']), capture_output=True, text=True)
        if r.returncode != 0: raise RuntimeError(f'postgres did not start: {r.stdout}{r.stderr}')
        import psycopg2
        con = psycopg2.connect(host=HOST, port=self.pg_port, user=SETTINGS['db_user'], dbname='postgres')
        con.autocommit = True
        with con.cursor() as cur:
            cur.execute('select 1 from pg_database where datname = %s', (SETTINGS['db_name'],))
            if not cur.fetchone(): cur.execute(f"create database {SETTINGS['db_name']}")
        con.close()

    def stop_postgres(self, mode: str = 'fast') -> None:
        "Stop PostgreSQL (`mode` immediate: as if it crashed, recovery on the next start)."
        if self.pgdata is None or not (self.pgdata/'postmaster.pid').exists(): return
        subprocess.run(self._as_postgres([str(pg_bindir()/'pg_ctl'), '-D', str(self.pgdata), '-m', mode, '-w', 'stop']),
                       capture_output=True, text=True)

    # --- S3 (moto's server mode)
    def start_s3(self) -> None:
        log = self.state/'s3.log'
        p = subprocess.Popen([str(BIN/'moto_server'), '-H', HOST, '-p', str(self.s3_port)], stdout=open(log, 'w'),
                             stderr=subprocess.STDOUT, env={**os.environ, **OFFLINE}, start_new_session=True)
        self._save(s3_pid=p.pid); self._procs['s3_pid'] = p
        _wait('moto S3 server', lambda: _http_ok(f'http://{HOST}:{self.s3_port}/moto-api/'), 60, p, log)
        import boto3
        s3 = boto3.client('s3', endpoint_url=f'http://{HOST}:{self.s3_port}', region_name=SETTINGS['region'],
                          aws_access_key_id=S3_KEYS['AWS_ACCESS_KEY_ID'], aws_secret_access_key=S3_KEYS['AWS_SECRET_ACCESS_KEY'])
        with contextlib.suppress(s3.exceptions.BucketAlreadyOwnedByYou): s3.create_bucket(Bucket=SETTINGS['bucket'])

    # --- the tracking server
    def start_mlflow(self) -> None:
        log = self.state/'mlflow.log'
        env = {**os.environ, **OFFLINE, **SERVER, **self.s3_env()}
        env.pop('MLFLOW_TRACKING_URI', None)
        cmd = [str(BIN/'mlflow'), 'server', '--backend-store-uri', self.db_uri,
               '--artifacts-destination', SETTINGS['artifacts_destination'],
               '--host', HOST, '--port', str(self.mlflow_port), '--workers', str(self.workers)]
        p = subprocess.Popen(cmd, stdout=open(log, 'w'), stderr=subprocess.STDOUT, env=env, start_new_session=True)
        self._save(mlflow_pid=p.pid); self._procs['mlflow_pid'] = p
        _wait('mlflow server', lambda: _http_ok(f'{self.tracking_uri}/health'), 180, p, log)

    # --- the whole stack
    def up(self) -> 'Stack':
        self._save(ports={'postgres': self.pg_port, 's3': self.s3_port, 'mlflow': self.mlflow_port,
                          's3_endpoint': self.s3_endpoint_port})
        if not self.running('postgres'): self.start_postgres()
        if not self.running('s3'): self.start_s3()
        if not self.running('mlflow'): self.start_mlflow()
        (self.state/'env').write_text(f'export MLFLOW_TRACKING_URI={self.tracking_uri}\n')
        return self

    def running(self, what: str) -> bool:
        port = {'postgres': self.pg_port, 's3': self.s3_port, 'mlflow': self.mlflow_port}[what]
        try: return _port_open(port)
        except OSError: return False

    def _kill(self, key: str) -> None:
        pid = self._load().get(key)
        if not pid: return
        proc = self._procs.pop(key, None)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGTERM)
            for _ in range(100):
                if proc is not None and proc.poll() is not None: break
                time.sleep(0.1); os.killpg(pid, 0)  # raises once the group is gone
            else: os.killpg(pid, signal.SIGKILL)
        if proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired): proc.wait(10)
        self._save(**{key: None})

    def down(self, remove: bool = False) -> None:
        "Stop the tracking server, S3 and PostgreSQL; `remove` deletes their data too."
        self._kill('mlflow_pid'); self._kill('s3_pid'); self.stop_postgres()
        if remove:
            if self.pgdata and self.pgdata.exists(): shutil.rmtree(self.pgdata, ignore_errors=True)
            shutil.rmtree(self.state, ignore_errors=True)

    def status(self) -> dict:
        return {'postgres': (self.db_uri, self.running('postgres')), 's3': (self.s3_endpoint, self.running('s3')),
                'mlflow': (self.tracking_uri, self.running('mlflow'))}

    def configure_dvc(self, project: str | Path, name: str = 'team') -> None:
        "Point `project`'s DVC remote at the stack's S3 (default remote; endpoint and keys in the git-ignored .dvc/config.local)."
        dvc = [str(BIN/'dvc')]
        cwd = Path(project)
        def run(*a): subprocess.run([*dvc, *a], cwd=cwd, check=True, capture_output=True, text=True, env={**os.environ, **OFFLINE})
        run('remote', 'add', '--local', '--force', '--default', name, SETTINGS['dvc_url'])
        run('remote', 'modify', '--local', name, 'endpointurl', self.s3_endpoint)
        run('remote', 'modify', '--local', name, 'region', SETTINGS['region'])
        run('remote', 'modify', '--local', name, 'access_key_id', S3_KEYS['AWS_ACCESS_KEY_ID'])
        run('remote', 'modify', '--local', name, 'secret_access_key', S3_KEYS['AWS_SECRET_ACCESS_KEY'])

    def unconfigure_dvc(self, project: str | Path, name: str = 'team') -> None:
        "Undo configure_dvc: back to the committed default remote."
        for a in (['remote', 'remove', '--local', name], ['config', '--local', '--unset', 'core.remote']):
            subprocess.run([str(BIN/'dvc'), *a], cwd=project, capture_output=True, text=True, env={**os.environ, **OFFLINE})


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog='team/stack.py', description=__doc__.split('\n\n')[0])
    ap.add_argument('cmd', choices=['up', 'down', 'status', 'env'])
    ap.add_argument('--state', default='.team', help='where data, logs and pids live (git-ignored)')
    ap.add_argument('--pg-port', type=int, default=SETTINGS['ports']['postgres'])
    ap.add_argument('--s3-port', type=int, default=SETTINGS['ports']['s3'])
    ap.add_argument('--mlflow-port', type=int, default=SETTINGS['ports']['mlflow'])
    ap.add_argument('--dvc-project', help="point this project's DVC remote at the stack's S3 (up) or back (down)")
    ap.add_argument('--remove', action='store_true', help='down: delete the data too')
    a = ap.parse_args(argv)
    if a.cmd != 'up' and not Path(a.state, 'stack.json').exists():
        print(f'team stack: nothing in {a.state} (make team-up starts it)'); return 0
    st = Stack(a.state, a.pg_port, a.s3_port, a.mlflow_port)
    if a.cmd == 'up':
        t0 = time.time()
        try: st.up()
        except (RuntimeError, subprocess.CalledProcessError) as e:
            print(f'error: team stack did not start: {str(e).strip()}', file=sys.stderr); return 1
        if a.dvc_project: st.configure_dvc(a.dvc_project)
        print(f'team stack up in {time.time()-t0:.1f}s: tracking server {st.tracking_uri} (PostgreSQL {st.db_uri}, '
              f"artifacts {SETTINGS['artifacts_destination']} on S3 {st.s3_endpoint})")
        if a.dvc_project: print(f"DVC remote 'team' = {SETTINGS['dvc_url']} at {st.s3_endpoint} (.dvc/config.local)")
        print(f'now: source {Path(a.state)/"env"}   (export MLFLOW_TRACKING_URI={st.tracking_uri})')
    elif a.cmd == 'down':
        if a.dvc_project: st.unconfigure_dvc(a.dvc_project)
        st.down(remove=a.remove); print('team stack stopped' + (' and its data removed' if a.remove else ''))
    elif a.cmd == 'status':
        for k, (where, up) in st.status().items(): print(f"{k:9} {'up  ' if up else 'down'} {where}")
    else: print((st.state/'env').read_text().strip())
    return 0


if __name__ == '__main__':
    sys.exit(main())
