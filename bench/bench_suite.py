"""The test suite's wall time (issue 17): the README's test command, `make test`, against the sum of its tests' own
durations measured in the same run (what the same tests cost one after the other).

    python bench/bench_suite.py [--out bench/results-suite.md]    (make bench runs it; make bench-suite alone)

Runs `make test` in this checkout with pytest's JUnit XML report (PYTEST_ADDOPTS), times it from the outside, and
sums every test case's setup + call + teardown from the report. Writes bench/results-suite.md.
"""
from __future__ import annotations
import argparse, os, subprocess, sys, tempfile, time
import xml.etree.ElementTree as ET
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
GOAL_MIN = 10


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--out', default=str(HERE/'results-suite.md'))
    a = ap.parse_args(argv)
    xml = Path(tempfile.mkdtemp(prefix='nbs-bench-suite-'))/'junit.xml'
    env = {**os.environ, 'PYTEST_ADDOPTS': f"{os.environ.get('PYTEST_ADDOPTS', '')} --junitxml={xml} -o junit_duration_report=total".strip()}
    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    r = subprocess.run(['make', '-s', 'test'], cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    log = xml.with_name('make-test.log'); log.write_text(r.stdout + r.stderr)  # the whole output, for a failure's details
    tail = [l for l in r.stdout.splitlines() if l.strip()][-1:] or ['(no output)']
    if not xml.exists():
        print(f"error: make test wrote no JUnit report (exit {r.returncode}): {tail[0]}\n{r.stderr[-2000:]}", file=sys.stderr); return 2
    cases = ET.parse(xml).getroot().iter('testcase')
    times = [float(c.get('time', 0)) for c in cases]
    serial = sum(times)
    workers = os.environ.get('PYTEST_XDIST_AUTO_NUM_WORKERS') or 'as configured in pyproject.toml'
    row = (f'| 6. the test suite: `make test` ({len(times)} tests, exit {r.returncode}) | {wall / 60:.1f} min | '
           f'{serial / 60:.1f} min (sum of its tests\' durations: one after the other) | {serial / wall:.2f}x | <= {GOAL_MIN} min |')
    table = '| figure | measured | baseline (same run) | speed-up | goal |\n|---|---|---|---|---|\n' + row + '\n'
    note = (f"\n`python bench/bench_suite.py` on {os.cpu_count()} cores, {time.strftime('%Y-%m-%d %H:%M')} UTC, load average "
            f"{load0:.1f} before and {os.getloadavg()[0]:.1f} after; workers: {workers}. pytest said: {tail[0].strip()}\n")
    Path(a.out).write_text('# Test suite benchmark\n\n' + table + note)
    print(table + note + f'written to {a.out}; make test\'s output: {log}')
    return 0 if r.returncode == 0 else 1


if __name__ == '__main__':
    sys.exit(main())
