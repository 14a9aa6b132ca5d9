"""The BentoML service: the MLflow champion behind /predict (JSON records: answered by the service's hot path,
nbs_lib.serving.HotPath, or with serve.hot_path false by BentoML's API path with adaptive batching) and /predict_file
(a parquet or CSV file). Its logic lives in nbs_lib.serving (notebooks/lib/10_serving.ipynb and 10a-10d); its request schema is
generated from the data spec (`table:` in params.yaml); its parameters are the `serve:` stage; its build options
and description live in bentofile.yaml. `make serve` imports the champion from MLflow and runs `bentoml serve` on it."""
from __future__ import annotations
import gc, os
# one OpenMP thread per model call (before scikit-learn loads): a worker's calls do not oversubscribe the cores,
# throughput scales with serve.workers instead. 2 threads on a busy 2-core box made predict_proba 20x slower.
os.environ.setdefault('OMP_NUM_THREADS', '1')
from pathlib import Path
import bentoml
from starlette.responses import JSONResponse
from nbs_lib import guard, schema, serving as S

ROOT = Path(__file__).resolve().parent
try: CFG = S.service_config(ROOT); BENTO = S.bentofile(ROOT)
except S.UserError as e: raise SystemExit(f"error: {e}") from None
Record = schema.record_model(CFG.spec, CFG.categories, CFG.example)
Records = schema.request_type(Record, CFG.s['max_batch'])
Prediction = CFG.Prediction
LIVE = S.Live()  # the instance's Runtime, for the hot path (nbs_lib.serving.HotPath)
# hostile clients (issue 18): a deadline for each request's headers (slow-loris), one WARNING line per bad request
guard.guard_connections(CFG.s['header_timeout_s'], CFG.s['keep_alive_s'])
guard.quiet_client_errors()
# serve.timeout_s: BentoML's request deadline, with its timer cancelled once the response starts (BentoML 1.4 leaves one
# per request in the event loop for timeout_s: the garbage collector's pauses grew past 100 ms under load)
guard.fix_request_timeout()


# serve.hot_path: /predict is left out of BentoML's OpenTelemetry spans, which cost more per request than scoring does
# (bench/results-serving.md); /predict_file and the rest keep them. BentoML exports no span unless tracing is configured.
TRACING = {'excluded_urls': [r'/predict(\?|$)']} if CFG.s['hot_path'] else {}
# serve.cors_origins: the web pages a browser may call the service from; BentoML's CORS middleware answers the
# browser's OPTIONS check and adds the headers (a page's /predict then takes BentoML's API path, inside that middleware)
HTTP = {'cors': {'enabled': True, 'access_control_allow_origins': CFG.s['cors_origins'], 'access_control_allow_methods': ['GET', 'POST'],
                 'access_control_allow_headers': ['content-type']}} if CFG.s['cors_origins'] else {}


@bentoml.service(name=BENTO['name'], workers=CFG.s['workers'], traffic={'timeout': CFG.s['timeout_s']}, tracing=TRACING, **({'http': HTTP} if HTTP else {}))
class Predictor:
    """The registered champion of this project, scoring the raw input columns of the data spec."""
    champion = bentoml.models.BentoModel(CFG.champion.tag)
    if CFG.challenger is not None: challenger = bentoml.models.BentoModel(CFG.challenger.tag)

    def __init__(self) -> None:
        self.rt = S.Runtime(CFG)
        LIVE.runtime = self.rt
        # what start-up made (models, BentoML, pydantic) is left out of the cyclic GC's scans: a full collection then walks
        # only the requests' objects (its pauses made p99 at 64 connections ~1.5-2x worse, bench/results-serving.md)
        gc.collect(); gc.freeze()

    @bentoml.api(batchable=CFG.s['batching'], max_batch_size=CFG.s['max_batch_size'], max_latency_ms=CFG.s['max_latency_ms'])
    def predict(self, records: Records) -> list[Prediction]:
        """Score 1 to serve.max_batch records: the model's answer for each (probability and decision, or the predicted value), with the model version."""
        return self.rt.predict(records)

    @bentoml.api
    def predict_file(self, file: Path, ctx: bentoml.Context) -> Path:
        """Score a parquet or CSV file with the input columns; returns its rows with the model's answer and version."""
        try: return self.rt.predict_file(file, ctx.temp_dir)
        except S.UserError as e:
            ctx.response.status_code = 400
            return JSONResponse({'error': str(e)}, status_code=400)

    @bentoml.on_shutdown
    def shutdown(self) -> None:
        LIVE.runtime = None
        self.rt.close()


# outermost: body size limit (413), body deadline (408), a client that leaves (499), short 400 answers, the docs' info;
# with serve.hot_path, a JSON POST /predict is answered right there by its handler, without BentoML's per-request
# machinery: the same records, the same 400 answers (the API's own request model decides when the column checks fail),
# the same Runtime (nbs_lib.serving.HotPath)
HOT = S.HotPath(LIVE, request_model=Predictor.apis['predict'].input_spec, fields=schema.fields(CFG.spec), max_batch=CFG.s['max_batch'],
                date=tuple(CFG.spec.date) if CFG.spec.date else None, server=f"BentoML Service/{BENTO['name']}",
                cors=bool(HTTP)) if CFG.s['hot_path'] else None
Predictor.add_asgi_middleware(guard.RequestGuard, max_body_mb=CFG.s['max_body_mb'], body_timeout_s=CFG.s['body_timeout_s'],
                              info=S.docs_info(CFG, BENTO), handler=HOT)
# a malformed multipart body answers 400 here; inside BentoML it would be a 500 (see nbs_lib.guard.MultipartCheck)
Predictor.add_asgi_middleware(guard.MultipartCheck)
