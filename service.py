"""The BentoML service: the MLflow champion behind /predict (JSON records, adaptive batching) and /predict_file
(a parquet or CSV file). Its logic lives in nbs_lib.serving (notebooks/lib/10_serving.ipynb); its parameters
in the `serve:` stage of params.yaml; its build options in bentofile.yaml. `make serve` imports the champion
from MLflow and runs `bentoml serve service:FlightDelay`."""
from __future__ import annotations
import os
# one OpenMP thread per model call (before scikit-learn loads): a worker's calls do not oversubscribe the cores,
# throughput scales with serve.workers instead. 2 threads on a busy 2-core box made predict_proba 20x slower.
os.environ.setdefault('OMP_NUM_THREADS', '1')
from pathlib import Path
import bentoml
from starlette.responses import JSONResponse
from nbs_lib import serving as S

try: CFG = S.service_config(Path(__file__).resolve().parent)
except S.UserError as e: raise SystemExit(f"error: {e}") from None
Flight = S.flight_model(CFG.categories, CFG.example)
Flights = S.request_type(Flight, CFG.s['max_batch'])
# hostile clients (issue 18): a deadline for each request's headers (slow-loris), one WARNING line per bad request
S.guard_connections(CFG.s['header_timeout_s'], CFG.s['keep_alive_s'])
S.quiet_client_errors()


@bentoml.service(name='flights_delay', workers=CFG.s['workers'], traffic={'timeout': CFG.s['timeout_s']})
class FlightDelay:
    """Probability that a scheduled flight arrives late, from the flight and the origin weather at its scheduled hour."""
    champion = bentoml.models.BentoModel(CFG.champion.tag)
    if CFG.challenger is not None: challenger = bentoml.models.BentoModel(CFG.challenger.tag)

    def __init__(self) -> None:
        self.rt = S.Runtime(CFG)

    @bentoml.api(batchable=CFG.s['batching'], max_batch_size=CFG.s['max_batch_size'], max_latency_ms=CFG.s['max_latency_ms'])
    def predict(self, flights: Flights) -> list[S.Prediction]:
        """Score 1 to serve.max_batch flights: probability of a late arrival, decision at the threshold, model version."""
        return self.rt.predict(flights)

    @bentoml.api
    def predict_file(self, file: Path, ctx: bentoml.Context) -> Path:
        """Score a parquet or CSV file with the input columns; returns its rows with probability, decision and model version."""
        try: return self.rt.predict_file(file, ctx.temp_dir)
        except S.UserError as e:
            ctx.response.status_code = 400
            return JSONResponse({'error': str(e)}, status_code=400)

    @bentoml.on_shutdown
    def shutdown(self) -> None:
        self.rt.close()


# outermost: body size limit (413), body deadline (408), a client that leaves (499), short 400 answers, the docs' info
_labels = CFG.champion.info.labels
FlightDelay.add_asgi_middleware(S.RequestGuard, max_body_mb=CFG.s['max_body_mb'], body_timeout_s=CFG.s['body_timeout_s'], info={
    'title': 'flights_delay', 'version': f"model {_labels.get('registered_model', CFG.s['model_name'])} v{_labels.get('version', '?')}",
    'description': f"{FlightDelay.inner.__doc__}\n\nServes `models:/{CFG.s['model_name']}@champion`: MLflow version {_labels.get('version', '?')}, "
                   f"run {_labels.get('run_id', '?')}, test ROC AUC {_labels.get('test_roc_auc', '?')}. POST /predict takes JSON records, "
                   "POST /predict_file a parquet or CSV file; each answer carries the model version and a request id."})
# a malformed multipart body answers 400 here; inside BentoML it would be a 500 (see nbs_lib.serving.MultipartCheck)
FlightDelay.add_asgi_middleware(S.MultipartCheck)
