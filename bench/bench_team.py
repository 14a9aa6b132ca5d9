"""A build against the team stack next to the embedded default, measured in one run.

    .venv/bin/python bench/bench_team.py [--repeats 3] [--sample 0.03] [--out bench/results-team.md]

Starts the team stack of `make team-up` (team/stack.py: PostgreSQL, moto S3, mlflow server) on free loopback ports,
makes two copies of the project on the same sample, and, alternating them in each repeat so that both see the same
machine load, times in each:
  cold build   `nbs build --force`: every task, one MLflow run with its params, metrics, model, plots, notebooks
  no-op build  `nbs build` right after it: nothing to run (the fingerprint matches; the store is not even opened)
  register     `nbs register --from-build`: the gate loads the candidate (and champion) from the store and scores them
The embedded copy uses the default sqlite store (`sqlite:///mlflow.db`, artifacts in mlartifacts/); the team copy
differs only by MLFLOW_TRACKING_URI. Medians over the repeats; the table goes to stdout and, with --out, to a file.
"""
from __future__ import annotations
import argparse, os, platform, shutil, signal, statistics, subprocess, sys, tempfile, time
from pathlib import Path
import yaml

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
BIN = Path(sys.executable).parent
sys.path.insert(0, str(ROOT/'team'))
from stack import Stack  # noqa: E402

FILES = ['params.yaml', 'pipeline.yaml', 'pyproject.toml', 'requirements.lock', 'notebooks', 'nbs_lib', 'data/raw']
OFFLINE = {'MLFLOW_DISABLE_TELEMETRY': 'true', 'BENTOML_DO_NOT_TRACK': 'true', 'DVC_NO_ANALYTICS': '1', 'DO_NOT_TRACK': '1',
           'PLOOMBER_VERSION_CHECK_DISABLED': '1', 'PLOOMBER_STATS_ENABLED': 'false', 'PLOOMBER_ENV_FILENAME': 'params.yaml'}


def project(dst: Path, sample: float) -> Path:
    for f in FILES:
        s = ROOT/f
        if s.is_dir(): shutil.copytree(s, dst/f, ignore=shutil.ignore_patterns('__pycache__', '.ipynb_checkpoints'))
        else: (dst/f).parent.mkdir(parents=True, exist_ok=True); shutil.copy2(s, dst/f)
    p = yaml.safe_load((dst/'params.yaml').read_text())
    p['data']['sample_frac'] = sample
    (dst/'params.yaml').write_text(yaml.safe_dump(p, sort_keys=False))
    return dst


def timed(cmd: list[str], root: Path, uri: str | None, ok=(0,)) -> float:
    env = {**os.environ, **OFFLINE, 'PYTHONPATH': str(root)}
    env.pop('MLFLOW_TRACKING_URI', None); env.pop('NBS_ROOT', None)
    if uri: env['MLFLOW_TRACKING_URI'] = uri
    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True)
    dt = time.perf_counter() - t0
    if r.returncode not in ok: raise SystemExit(f"{' '.join(cmd)} in {root} exited {r.returncode}:\n{r.stderr[-3000:]}")
    return dt


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('--repeats', type=int, default=3)
    ap.add_argument('--sample', type=float, default=0.03)
    ap.add_argument('--out', help='also write the table to this markdown file')
    a = ap.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the stack on the way out (finally below)
    tmp = Path(tempfile.mkdtemp(prefix='nbs-bench-team-'))
    t0 = time.perf_counter()
    st = Stack(tmp/'stack').up()
    startup = time.perf_counter() - t0
    try:
        roots = {'embedded': project(tmp/'embedded', a.sample), 'team': project(tmp/'team', a.sample)}
        uris = {'embedded': None, 'team': st.tracking_uri}
        nbs = str(BIN/'nbs')
        for k in roots: timed([nbs, 'build'], roots[k], uris[k])  # warm-up: first build, first experiment, first champion
        for k in roots: timed([nbs, 'register', '--from-build'], roots[k], uris[k], ok=(0, 3))
        res = {k: {'cold': [], 'noop': [], 'register': []} for k in roots}
        for i in range(a.repeats):
            for k in (list(roots) if i % 2 == 0 else list(roots)[::-1]):
                res[k]['cold'].append(timed([nbs, 'build', '--force'], roots[k], uris[k]))
                res[k]['noop'].append(timed([nbs, 'build'], roots[k], uris[k]))
                res[k]['register'].append(timed([nbs, 'register', '--from-build'], roots[k], uris[k], ok=(0, 3)))
            print(f'repeat {i+1}/{a.repeats} done', file=sys.stderr)
    finally:
        st.down(remove=True); shutil.rmtree(tmp, ignore_errors=True)
    med = {k: {m: statistics.median(v) for m, v in d.items()} for k, d in res.items()}
    rows = [('cold build, 5 tasks (`nbs build --force`)', 'cold'), ('no-op build (`nbs build`)', 'noop'),
            ('gate (`nbs register --from-build`)', 'register')]
    lines = [f'Build against the team stack vs the embedded default, one run: medians of {a.repeats}, sample {a.sample}, '
             f'{os.cpu_count()} cores, Python {platform.python_version()}, alternating order.', '',
             '| figure | embedded (sqlite:///mlflow.db, local artifacts) | team stack (mlflow server, PostgreSQL, S3) | difference |',
             '|---|---|---|---|']
    for label, m in rows:
        e, t = med['embedded'][m], med['team'][m]
        lines.append(f'| {label} | {e:.2f} s | {t:.2f} s | {t - e:+.2f} s ({t / e:.2f}x) |')
    lines.append(f'| starting the team stack (`make team-up`, fresh PostgreSQL) | | {startup:.1f} s | |')
    text = '\n'.join(lines)
    print(text)
    if a.out: Path(a.out).write_text(text + '\n')
    return 0


if __name__ == '__main__':
    sys.exit(main())
