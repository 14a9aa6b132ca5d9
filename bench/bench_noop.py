"""The no-op (issue 17): `make pipeline` when nothing changed, right after a build and right after each Makefile verb
that writes into the project (monitor, register, serve's import, sweep, export), against an interpreter start and
the no-op right after a build, measured in the same run. Each no-op is also checked to have run nothing.

    python bench/bench_noop.py [--repeats 3] [--frac 0.03]    (make bench runs it; make bench-noop alone)

The project is a git clone of this checkout (its .dvc config and Makefile, this venv linked in, the raw data copied),
built once on a sample. Writes bench/results-noop.md.
"""
from __future__ import annotations
import argparse, os, shutil, statistics, subprocess, sys, tempfile, time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent/'tests'))
from conftest import BIN, ROOT, env_for, set_params  # noqa: E402

GOAL = 0.2
# each verb as a user types it (make's own verbs where it has one), and what it leaves behind
MAKE = ['make', '-s', '-o', '.venv/.installed']  # the venv's stamp is this checkout's business, not the clone's
VERBS = [('make monitor', [*MAKE, 'monitor']),
         ('make register', [*MAKE, 'register']),
         ('nbs serve import (what make serve and make bento run first)', [str(BIN/'nbs'), 'serve', 'import']),
         ('make sweep (one configuration)', [*MAKE, 'sweep', 'SWEEP_ARGS=--set hyperparams.hist_gradient_boosting.max_iter=10 --jobs 1 --no-progress']),
         ('make export', [*MAKE, 'export'])]


def sh(cmd: list[str], root: Path) -> tuple[float, str]:
    """(seconds, stdout) of a command in the project; stops the benchmark with its output when it fails."""
    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=root, env=env_for(root, MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR='false'), capture_output=True, text=True)
    dt = time.perf_counter() - t0
    if r.returncode: raise SystemExit(f"{' '.join(cmd)} exited {r.returncode}:\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}")
    return dt, r.stdout


def noop(root: Path) -> float:
    """Seconds of one `make pipeline` that must run nothing (else the benchmark stops: the no-op would be wrong)."""
    dt, out = sh([*MAKE, 'pipeline'], root)
    if 'ran nothing' not in out: raise SystemExit(f"make pipeline was not a no-op:\n{out[-2000:]}")
    return dt


def built_clone(frac: float, prefix: str) -> tuple[Path, Path]:
    """(temporary folder, project): a git clone of this checkout in a new temporary folder, with this venv linked in
    and the raw data copied, built by `make pipeline` on a `frac` sample of the rows."""
    tmp = Path(tempfile.mkdtemp(prefix=prefix)); root = tmp/'clone'
    subprocess.run(['git', 'clone', '-q', str(ROOT), str(root)], check=True)
    (root/'.venv').symlink_to(BIN.parent)  # this venv, never re-installed from the clone: make runs with -o .venv/.installed
    for f in (ROOT/'data/raw').iterdir():
        if not f.name.startswith('.') and not f.name.endswith('.dvc'): shutil.copy2(f, root/'data/raw'/f.name)
    set_params(root, **{'data.sample_frac': frac})
    subprocess.run(['git', 'commit', '-qam', 'bench: sample'], cwd=root, check=True)
    print(f'building the sample project in {root} ...', flush=True)
    sh([*MAKE, 'pipeline'], root)
    return tmp, root


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--repeats', type=int, default=3)
    ap.add_argument('--frac', type=float, default=0.03)
    ap.add_argument('--out', default=str(HERE/'results-noop.md'))
    a = ap.parse_args(argv)
    tmp, root = built_clone(a.frac, 'nbs-bench-noop-')
    rows = []
    def row(what, value, baseline, base_name):
        rows.append(f'| {what} | {value:.3f} s | {baseline:.3f} s ({base_name}) | {value / baseline:.2f}x | <= {GOAL} s |')
        print(rows[-1], flush=True)
    python = statistics.median(sh([str(BIN/'python'), '-c', 'pass'], root)[0] for _ in range(max(a.repeats, 5)))
    after_build = statistics.median(noop(root) for _ in range(max(a.repeats, 5)))
    build_only = statistics.median(sh([str(BIN/'nbs'), 'build'], root)[0] for _ in range(max(a.repeats, 5)))
    row('3a. no-op `make pipeline` right after a build (make, then nbs build --data)', after_build, python, 'python -c pass: an interpreter start')
    row('3a. no-op `nbs build` alone, right after a build', build_only, python, 'python -c pass: an interpreter start')
    for name, cmd in VERBS:
        times = []
        for _ in range(a.repeats):
            sh(cmd, root); times.append(noop(root))
        row(f'3c. no-op `make pipeline` right after `{name}`', statistics.median(times), after_build, 'no-op right after a build')
    head = '| figure | measured | baseline (same run) | ratio | goal |\n|---|---|---|---|---|\n'
    note = (f"\nMedians of {a.repeats} (after a verb: the verb, then one `make pipeline`, which must say it ran nothing) by "
            f"`python bench/bench_noop.py --repeats {a.repeats} --frac {a.frac}` on {os.cpu_count()} cores, "
            f"{time.strftime('%Y-%m-%d %H:%M')} UTC, load average {os.getloadavg()[0]:.1f} at the end.\n")
    table = head + '\n'.join(rows) + '\n'
    Path(a.out).write_text('# No-op benchmark\n\n' + table + note)
    print('\n' + table + note + f'written to {a.out}')
    shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == '__main__':
    sys.exit(main())
