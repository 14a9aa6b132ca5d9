"""Where the test suite's CPU goes, process by process (issue 17): runs the suite as `make test` does after its
set-up (`python -m pytest` in this checkout, with this venv) while a thread reads every process's CPU time from /proc,
then sums the CPU of the pytest process's descendants by command, and by the test file that started them (a test's
subprocesses inherit pytest's PYTEST_CURRENT_TEST; a process without it counts for its nearest ancestor's file).

    python bench/profile_suite.py [--interval 0.25] [--out bench/results-suite-profile.md] [PYTEST_ARGS ...]

A process that lives less than one interval can be missed; its CPU is then not counted. Linux only (/proc).
Writes bench/results-suite-profile.md.
"""
from __future__ import annotations
import argparse, os, re, statistics, subprocess, sys, tempfile, threading, time
import xml.etree.ElementTree as ET
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
TICK = os.sysconf('SC_CLK_TCK')
HEAVY = 1.5  # CPU seconds from which a process counts as heavy (an interpreter with the workflow's imports)


def snapshot(seen: dict) -> None:
    """Update `seen` ({(pid, start tick): {ppid, cmd, cpu, test}}) with every process now alive."""
    for p in os.listdir('/proc'):
        if not p.isdigit(): continue
        try:
            f = open(f'/proc/{p}/stat').read().rsplit(')', 1)[1].split()
            key = (int(p), int(f[19]))
            rec = seen.get(key)
            if rec is None:
                rec = seen[key] = {'pid': int(p), 'ppid': int(f[1]), 'cmd': '', 'test': test_file(p)}
            rec['cpu'] = (int(f[11]) + int(f[12])) / TICK
            if not rec['cmd']: rec['cmd'] = open(f'/proc/{p}/cmdline', 'rb').read().replace(b'\0', b' ').decode(errors='replace')[:300]
        except (OSError, ValueError, IndexError): pass  # gone meanwhile


def test_file(pid: str) -> str | None:
    """The test file a process was started for: from PYTEST_CURRENT_TEST in its environment ('tests/test_x.py::...')."""
    try: env = open(f'/proc/{pid}/environ', 'rb').read()
    except OSError: return None
    m = re.search(rb'(?:^|\0)PYTEST_CURRENT_TEST=([^:\0]+)', env)
    return m.group(1).decode(errors='replace').rsplit('/', 1)[-1] if m else None


def durations(xml: Path) -> dict:
    """{test file: [tests, summed setup + call + teardown seconds]} from pytest's JUnit report."""
    out = defaultdict(lambda: [0, 0.0])
    if not xml.exists(): return out
    for c in ET.parse(xml).getroot().iter('testcase'):
        d = out[c.get('classname', '').rsplit('.', 1)[-1] + '.py']; d[0] += 1; d[1] += float(c.get('time', 0))
    return out


def kind(cmd: str) -> str:
    """A process's command, as the table groups it."""
    if 'ipykernel' in cmd: return 'Jupyter kernel'
    if 'exec(eval(sys.stdin.readline()))' in cmd: return 'pytest-xdist worker'
    if 'multiprocessing.spawn' in cmd or 'multiprocessing.forkserver' in cmd: return 'multiprocessing worker (spawned)'
    if '_bentoml_impl.worker' in cmd: return 'BentoML service worker'
    if 'huey' in cmd or 'mlflow.server.jobs' in cmd: return 'MLflow server job runner'
    m = re.search(r'/bin/(nbs|bentoml|dvc|mlflow|ploomber|papermill|dask|moto_server|nbstripout|jupyter[-\w]*|nbdev[-\w]*|make|git|copier)\b\s*(\S*)', cmd)
    if m: return f"{m.group(1)} {m.group(2)}".strip() if m.group(1) in ('nbs', 'bentoml', 'dask', 'mlflow') else m.group(1)
    if 'postgres' in cmd: return 'PostgreSQL'
    m = re.search(r'-m (\S+)', cmd)
    if m: return f'python -m {m.group(1)}'
    argv = cmd.split()
    if len(argv) > 1 and re.fullmatch(r'python[\d.]*', argv[0].rsplit('/', 1)[-1]):  # python SCRIPT or python -c CODE
        return f"python {argv[1].rsplit('/', 1)[-1] if not argv[1].startswith('-') else ' '.join(argv[1:3])[:40]}"
    return argv[0].rsplit('/', 1)[-1] if argv else '?'


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--interval', type=float, default=0.25)
    ap.add_argument('--out', default=str(HERE/'results-suite-profile.md'))
    a, pytest_args = ap.parse_known_args(argv)
    seen, done = {}, threading.Event()
    def sample():
        while not done.is_set(): snapshot(seen); done.wait(a.interval)
    t = threading.Thread(target=sample, daemon=True); t.start()
    xml = Path(tempfile.mkdtemp(prefix='nbs-profile-suite-'))/'junit.xml'
    t0 = time.perf_counter()
    p = subprocess.Popen([sys.executable, '-m', 'pytest', f'--junitxml={xml}', '-o', 'junit_duration_report=total', *pytest_args],
                         cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = p.communicate()[0]
    wall = time.perf_counter() - t0
    done.set(); t.join(); snapshot(seen)
    kids = defaultdict(list)
    for rec in seen.values(): kids[rec['ppid']].append(rec)
    tree, todo = [], [p.pid]
    while todo:
        for c in kids[todo.pop()]: tree.append(c); todo.append(c['pid'])
    top = next((r for r in seen.values() if r['pid'] == p.pid), None)
    total = sum(r['cpu'] for r in tree) + (top['cpu'] if top else 0)
    by = defaultdict(lambda: [0, 0.0])
    for r in tree:
        k = by[kind(r['cmd'])]; k[0] += 1; k[1] += r['cpu']
    if top: by['pytest (its main process)'] = [1, top['cpu']]
    pids = {r['pid']: r for r in tree}
    def file_of(r):  # its own test file, else its nearest ancestor's (a server a fixture started, a forked worker)
        while r is not None and not r['test']: r = pids.get(r['ppid'])
        return r['test'] if r is not None else None
    per_file, dur = defaultdict(lambda: [0, 0.0]), durations(xml)
    for r in tree:
        f = file_of(r) or ('the xdist workers themselves (tests run in-process)' if kind(r['cmd']) == 'pytest-xdist worker' else 'no test file')
        k = per_file[f]; k[0] += 1; k[1] += r['cpu']
    heavy = [r['cpu'] for r in tree if r['cpu'] >= HEAVY]
    summary = next((l for l in reversed(out.splitlines()) if re.search(r'\d+ (passed|failed)', l)), 'no summary line')
    rows = ['| command | processes | CPU s | share of the suite\'s CPU |', '|---|---|---|---|']
    for name, (n, cpu) in sorted(by.items(), key=lambda kv: -kv[1][1]):
        if cpu < 1: continue
        rows.append(f'| {name} | {n} | {cpu:,.1f} | {cpu / total:.1%} |')
    files = ['| test file | tests | summed test time s | processes | CPU s | share of the suite\'s CPU |', '|---|---|---|---|---|---|']
    for name, (n, cpu) in sorted(per_file.items(), key=lambda kv: -kv[1][1]):
        tests, secs = dur.get(name, (0, 0.0))
        files.append(f"| {name} | {tests or ''} | {f'{secs:,.0f}' if tests else ''} | {n} | {cpu:,.1f} | {cpu / total:.1%} |")
    text = (f"# Where the test suite's CPU goes\n\n"
            f"- wall {wall / 60:.1f} min; CPU {total / 60:.1f} min in {len(tree) + 1} processes; CPU / (wall x {os.cpu_count()} cores) = "
            f"{total / (wall * os.cpu_count()):.2f}\n"
            f"- {len(heavy)} processes used {HEAVY} s or more: {sum(heavy) / 60:.1f} CPU-minutes, median {statistics.median(heavy) if heavy else 0:.1f} s each\n"
            f"- pytest: {summary.strip('= ')}\n\n## By command\n\n" + '\n'.join(rows) +
            "\n\n## By test file (a session fixture counts for the file whose test first asked for it)\n\n" + '\n'.join(files) +
            f"\n\n`python bench/profile_suite.py --interval {a.interval:g}{' ' + ' '.join(pytest_args) if pytest_args else ''}` on "
            f"{os.cpu_count()} cores, {time.strftime('%Y-%m-%d %H:%M')} UTC; /proc read every {a.interval:g} s (a process shorter than "
            f"that can be missed). Commands with less than 1 CPU-second are left out of the table, not of the totals.\n")
    Path(a.out).write_text(text)
    print(text + f'written to {a.out}')
    return p.returncode


if __name__ == '__main__':
    sys.exit(main())
