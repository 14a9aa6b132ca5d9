"""The baseline of the serving benchmark (bench/bench_serving.py): a bare Starlette endpoint that scores the champion
with the runtime the service uses (onnxruntime when the model converts, else the compiled pipeline), with nothing
else: no validation, no prediction log, no middleware, no request id. It is the limit of a Python HTTP service of this
model on one process, which the service is measured against.

    BARE_MODEL=<mlflow model dir> BARE_THRESHOLD=0.3 uvicorn bare_scorer:app --host 127.0.0.1 --port 8001 --no-access-log
"""
from __future__ import annotations
import os
os.environ.setdefault('OMP_NUM_THREADS', '1')  # as service.py: one thread per model call
import numpy as np
import orjson
from starlette.applications import Starlette
from starlette.responses import Response
from starlette.routing import Route
from nbs_lib.tracking import load_model

MODEL = load_model(os.environ['BARE_MODEL'])
THRESHOLD = float(os.environ.get('BARE_THRESHOLD', '0.5'))
try:
    from nbs_lib.onnx_model import OnnxScore
    ORT = OnnxScore(MODEL); INPUTS, CATEGORICAL = ORT.inputs, set(ORT.categorical)
except Exception:  # noqa: BLE001 - a model that does not convert: the service scores it with sklearn too
    ORT = None; INPUTS = list(MODEL.feature_names_in_)


async def predict(request) -> Response:
    recs = orjson.loads(await request.body())['records']
    if ORT is not None:
        feeds = {c: (np.array([['' if r[c] is None else r[c]] for r in recs], dtype=object) if c in CATEGORICAL else
                     np.array([[np.nan if r[c] is None else r[c]] for r in recs], dtype=np.float64)) for c in INPUTS}
        p = ORT.session.run(['score'], feeds)[0]
    else:
        import pandas as pd
        p = MODEL.predict_proba(pd.DataFrame(recs, columns=INPUTS))[:, 1]
    return Response(orjson.dumps([{'probability': q, 'decision': q >= THRESHOLD} for q in p.tolist()]), media_type='application/json')


async def ready(request) -> Response:
    return Response(b'ok')


app = Starlette(routes=[Route('/predict', predict, methods=['POST']), Route('/readyz', ready)])
