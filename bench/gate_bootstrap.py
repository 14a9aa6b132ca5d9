"""Benchmark: the promotion gate's paired bootstrap of the ROC AUC difference, vectorized (nbs_lib.gate) against
sklearn's roc_auc_score called on each resample (the baseline, measured in the same run on the same resamples).

    .venv/bin/python bench/gate_bootstrap.py [--rows 80000] [--resamples 1000] [--repeats 3] [--baseline-resamples 40]

Scores are synthetic but shaped like the gate's real input: the full test set of the worked example has about
80,000 rows (Oct-Dec) with a late rate of about 0.2; the candidate's scores are continuous, the champion's rounded
to 3 decimals (many ties, the hard case for a rank-based AUC). The sklearn loop is timed on fewer resamples and
reported per resample and extrapolated to --resamples; every time is the median of --repeats runs.
"""
from __future__ import annotations
import argparse, statistics, time
import numpy as np
from nbs_lib.gate import bootstrap_deltas


def scores(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.2).astype(int)
    cand = 1/(1 + np.exp(-(rng.normal(size=n) + 0.75*y - 1.4)))
    champ = np.round(1/(1 + np.exp(-(rng.normal(size=n) + 0.6*y - 1.4))), 3)
    return y, cand, champ


def median_seconds(f, repeats: int) -> float:
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter(); f(); out.append(time.perf_counter() - t0)
    return statistics.median(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--rows', type=int, default=80_000)
    ap.add_argument('--resamples', type=int, default=1000)
    ap.add_argument('--baseline-resamples', type=int, default=40)
    ap.add_argument('--repeats', type=int, default=3)
    a = ap.parse_args()
    y, pc, ph = scores(a.rows)
    k = a.baseline_resamples
    same = np.allclose(bootstrap_deltas(y, pc, ph, 'roc_auc', k, seed=1),
                       bootstrap_deltas(y, pc, ph, 'roc_auc', k, seed=1, method='sklearn'), rtol=0, atol=1e-12)
    base = median_seconds(lambda: bootstrap_deltas(y, pc, ph, 'roc_auc', k, seed=1, method='sklearn'), a.repeats) / k
    vec = median_seconds(lambda: bootstrap_deltas(y, pc, ph, 'roc_auc', a.resamples, seed=1), a.repeats) / a.resamples
    print(f"paired bootstrap of the ROC AUC difference, {a.rows:,} rows, {a.resamples} resamples "
          f"(median of {a.repeats}; vectorized == sklearn on the first {k} resamples: {same})\n")
    print(f"| method | per resample (ms) | {a.resamples} resamples (s) | speed-up |")
    print("|---|---:|---:|---:|")
    print(f"| sklearn roc_auc_score per resample (baseline) | {base*1e3:.2f} | {base*a.resamples:.1f} (extrapolated) | 1.0 |")
    print(f"| nbs_lib.gate vectorized (rank counts per chunk) | {vec*1e3:.2f} | {vec*a.resamples:.2f} | {base/vec:.1f} |")


if __name__ == '__main__':
    main()
