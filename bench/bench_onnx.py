"""Benchmark: scoring the build's model three ways, in one run on the same rows: sklearn's predict_proba (the baseline),
the service's compiled path (nbs_lib.scoring, serve.runtime sklearn), onnxruntime (nbs_lib.onnx_model, serve.runtime
onnx) and serve.runtime auto (which picks between the two by the number of rows); for 1 row and for 20,000 rows: latency p50/p99 and rows/s; plus model file size and load time, and parity.

    make bench-onnx            # = .venv/bin/python bench/bench_onnx.py (after make pipeline: the build's model and test set)

One thread each (the service's setting: OMP_NUM_THREADS=1, onnxruntime intra_op_num_threads=1). Writes bench/results-onnx.md.
"""
from __future__ import annotations
import argparse, json, os, statistics, tempfile, time
os.environ.setdefault('OMP_NUM_THREADS', '1')
from pathlib import Path
import numpy as np
import pandas as pd

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def timings(f, X: pd.DataFrame, calls: int) -> list[float]:
    f(X)  # warm
    out = []
    for _ in range(calls):
        t0 = time.perf_counter(); f(X); out.append(time.perf_counter() - t0)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--root', default=str(ROOT)); ap.add_argument('--calls-1', type=int, default=2000); ap.add_argument('--calls-big', type=int, default=15)
    ap.add_argument('--rows', type=int, default=20_000)
    a = ap.parse_args(argv)
    root = Path(a.root)
    import mlflow, onnx
    from nbs_lib.config import load_params
    from nbs_lib.data import DataSpec
    from nbs_lib.onnx_model import OnnxScore, to_onnx
    from nbs_lib.scoring import AUTO_ONNX_ROWS, Scorer
    from nbs_lib.tracking import load_model, setup_tracking
    p = load_params(root/'params.yaml'); spec = DataSpec.from_params(p); setup_tracking(p, root)
    uri = json.loads((root/'build/train/run.json').read_text())['model_uri']
    t0 = time.perf_counter(); model = load_model(uri); load_sklearn = time.perf_counter() - t0
    test = pd.read_parquet(root/'build/features/test.parquet')[spec.inputs]
    big = test.sample(min(a.rows, len(test)), random_state=0); one = test.head(1)
    proto = to_onnx(model); onnx_bytes = proto.SerializeToString()
    t0 = time.perf_counter(); ort_score = OnnxScore(model, onnx.load_from_string(onnx_bytes)); load_onnx = time.perf_counter() - t0
    compiled = Scorer(model, '0', 0.5, None, spec.inputs, spec.task, runtime='sklearn')
    with tempfile.TemporaryDirectory() as d:
        local = mlflow.artifacts.download_artifacts(uri, dst_path=d)
        sk_bytes = sum(f.stat().st_size for f in Path(local).rglob('*') if f.is_file() and f.suffix in ('.pkl', '.skops', '.pickle'))
    ways = {'sklearn predict_proba (baseline)': lambda X: model.predict_proba(X)[:, 1] if spec.task == 'binary' else model.predict(X),
            'service compiled path (serve.runtime sklearn)': compiled.probability,
            'onnxruntime (serve.runtime onnx)': ort_score,
            f'serve.runtime auto (the default: onnxruntime below {AUTO_ONNX_ROWS} rows)': Scorer(model, '0', 0.5, None, spec.inputs, spec.task, runtime='auto').probability}
    want = ways['sklearn predict_proba (baseline)'](test)
    rows, base = [], {}
    for name, f in ways.items():
        r1 = timings(f, one, a.calls_1); rb = timings(f, big, a.calls_big)
        p50_1, p99_1 = np.percentile(r1, 50)*1e3, np.percentile(r1, 99)*1e3; p50_b = statistics.median(rb)*1e3
        if not base: base = {'p50_1': p50_1, 'p50_b': p50_b}
        diff = float(np.max(np.abs(np.asarray(f(test)) - want)))
        rows.append(f"| {name} | {p50_1:.3f} | {p99_1:.3f} | {base['p50_1']/p50_1:.1f}x | {p50_b:.1f} | {np.percentile(rb, 99)*1e3:.1f} | "
                    f"{len(big)/(p50_b/1e3):,.0f} | {base['p50_b']/p50_b:.1f}x | {diff:.2g} |")
    text = '\n'.join([
        f"# Scoring: sklearn, the compiled path and onnxruntime ({len(test):,} test rows of {root.name}'s build, model {uri})", '',
        f"One thread each; 1 row: {a.calls_1} calls; {len(big):,} rows: {a.calls_big} calls. Speed-ups against sklearn's predict_proba in the same run.", '',
        f"| scorer | 1 row p50 ms | 1 row p99 ms | 1 row speed-up | {len(big):,} rows p50 ms | p99 ms | rows/s | speed-up | max abs diff vs sklearn (all test rows) |",
        '|---|---|---|---|---|---|---|---|---|', *rows, '',
        '| model | file size | load time |', '|---|---|---|',
        f"| sklearn (MLflow sklearn flavor, the pickled pipeline) | {sk_bytes/1e6:.2f} MB | {load_sklearn:.2f} s (mlflow.sklearn.load_model) |",
        f"| ONNX (one graph) | {len(onnx_bytes)/1e6:.2f} MB | {load_onnx:.2f} s (onnxruntime session from bytes) |", ''])
    print(text); (HERE/'results-onnx.md').write_text(text)
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
