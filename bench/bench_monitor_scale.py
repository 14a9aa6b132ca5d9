"""The monitor's comparison alone, in-process, at k times the rows: does each batch cost only its own rows?

    python bench/bench_monitor_scale.py [--scales 1 10] [--out bench/results-scale-monitor.md]

Needs a build of the project at 1x (`make pipeline`: build/features/{train,test}.parquet and the build's model). The
training period and the later months are replicated k times over shifted years (as bench/scale_data.py does to the raw
data), so with `monitor.batch_by: [year, month]` there are k times the reference rows and k times the batches. Timed:
`nbs_lib.monitor.compare` (predictions, per-feature drift, verdict; no plots, no MLflow), wall and CPU time (user +
sys of this process, all its threads), with the load average. Growth vs the first scale = (time at k / time there) / k.
"""
from __future__ import annotations
import argparse, json, os, sys, time, warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def replicate(df, k: int, year: str = 'year'):
    "`df` k times, copy i with its years moved on by i."
    import pandas as pd
    return pd.concat([df.assign(**{year: df[year] + i}) for i in range(k)], ignore_index=True)


def measure(k: int) -> dict:
    import pandas as pd
    from nbs_lib import monitor as mon, tracking as trk
    from nbs_lib.config import load_params
    from nbs_lib.data import DataSpec
    p = load_params(ROOT/'params.yaml'); cfg = mon.monitor_settings(p['monitor']); spec = DataSpec.from_params({'table': p['table']})
    trk.setup_tracking({'tracking': p['tracking']}, ROOT)
    model = trk.load_model(json.loads((ROOT/'build/train/run.json').read_text())['model_uri'])
    ref = replicate(pd.read_parquet(ROOT/'build/features/train.parquet'), k)
    batches = mon.batches_by(replicate(pd.read_parquet(ROOT/'build/features/test.parquet'), k), cfg['batch_by'])
    load0, c0, t0 = os.getloadavg()[0], time.process_time(), time.perf_counter()
    res = mon.compare(ref, batches, model, spec, cfg)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {'k': k, 'ref_rows': len(ref), 'batches': len(batches), 'wall': wall, 'cpu': cpu, 'load': (load0, os.getloadavg()[0]),
            'verdict': res['verdict']}


def table(res: list[dict]) -> str:
    b = res[0]
    out = ('| scale | reference rows | batches | compare wall s | compare CPU s | growth vs first (wall) | growth vs first (CPU) | '
           'load avg (1 min) | verdict |\n' + '|---' * 9 + '|\n')
    for r in res:
        x = r['ref_rows']/b['ref_rows']
        out += (f"| {r['k']}x | {r['ref_rows']:,} | {r['batches']} | {r['wall']:.1f} | {r['cpu']:.1f} | {(r['wall']/b['wall'])/x:.2f} | "
                f"{(r['cpu']/b['cpu'])/x:.2f} | {r['load'][0]:.2f} -> {r['load'][1]:.2f} | {r['verdict']} |\n")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--scales', type=int, nargs='+', default=[1, 10])
    ap.add_argument('--out', default=str(Path(__file__).resolve().parent/'results-scale-monitor.md'))
    a = ap.parse_args()
    os.chdir(ROOT); sys.path.insert(0, str(ROOT)); warnings.simplefilter('ignore')
    res = []
    for k in a.scales:
        res.append(measure(k)); print(res[-1], flush=True)
    note = (f"\nMeasured by `python bench/bench_monitor_scale.py --scales {' '.join(map(str, a.scales))}` on {os.cpu_count()} cores, "
            f"{time.strftime('%Y-%m-%d %H:%M')}, one run each, on a machine shared with other builds (load average before -> after). "
            "In-process `nbs_lib.monitor.compare` on the example's build, its training period and later months replicated over "
            "shifted years; batches by year and month, so k times the rows is also k times the batches.\n")
    Path(a.out).write_text("# The monitor's comparison at k times the rows\n\n" + table(res) + note)
    print('\n' + table(res))


if __name__ == '__main__':
    main()
