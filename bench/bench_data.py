"""Benchmark of the data check that runs before every build and test run (`make data` = `nbs data`, issue 5).

    python bench/bench_data.py [--repeats 5]

In a throw-away git+DVC copy of the project, with data/raw already present and verified, medians of:
  baseline     `nbs check`: the same interpreter start, CLI import and params.yaml read, no data check
  nbs data     the check as it runs every time: size+mtime stamps, no hashing, no DVC import
  --rehash     every file hashed again and its DVC cache entry checked (what a first run or an edit costs)
  dvc status   DVC's own check of the same .dvc files (its state database of hashes)
Prints one table: seconds and the ratio to the baseline.
"""
from __future__ import annotations
import argparse, statistics, subprocess, sys, tempfile, time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent/'tests'))
from conftest import BIN, PROJECT_FILES, copy_project, env_for  # noqa: E402


def timed(cmd: list[str], root: Path) -> float:
    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=root, env=env_for(root), capture_output=True, text=True)
    dt = time.perf_counter() - t0
    if r.returncode: raise SystemExit(f"{cmd} failed:\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}")
    return dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--repeats', type=int, default=5)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix='bench-data-') as t:
        root = copy_project(Path(t)/'repo', files=PROJECT_FILES + ['.dvc/config', '.dvc/.gitignore', '.dvcignore', '.gitignore'])
        git = ['git', '-c', 'user.name=bench', '-c', 'user.email=bench@nbs.local']
        for cmd in (git + ['init', '-q'], git + ['add', '-A'], git + ['commit', '-qm', 'bench'],
                    [str(BIN/'dvc'), 'remote', 'modify', '--local', 'shared', 'url', str(Path(t)/'remote')]):
            subprocess.run(cmd, cwd=root, check=True, env=env_for(root))
        timed([str(BIN/'nbs'), 'data'], root)  # first check: hashes, fills the cache, writes the stamps
        cases = {'baseline: nbs check': [str(BIN/'nbs'), 'check'],
                 'nbs data (verified before)': [str(BIN/'nbs'), 'data'],
                 'nbs data --rehash': [str(BIN/'nbs'), 'data', '--rehash'],
                 'dvc status data/raw/*.dvc': [str(BIN/'dvc'), 'status', 'data/raw/flights.csv.zip.dvc', 'data/raw/weather.csv.dvc']}
        res = {name: statistics.median(timed(cmd, root) for _ in range(a.repeats)) for name, cmd in cases.items()}
    base = res['baseline: nbs check']
    w = max(map(len, res))
    print(f"{'case':<{w}}  {'median s':>9}  {'x baseline':>10}   (repeats={a.repeats})")
    for name, s in res.items(): print(f"{name:<{w}}  {s:>9.3f}  {s/base:>10.2f}")


if __name__ == '__main__':
    main()
