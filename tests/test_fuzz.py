"""Property-based fuzzing of the served service from its own OpenAPI schema (schemathesis): every generated request to
/predict and /predict_file is answered without a 5xx, and the server is still ready afterwards. `make stress` runs
thousands of them (bench/stress.py); this test keeps a few hundred for CI time. The malformed multipart body that
fuzzing found (a 500 from BentoML 1.4) has its own test: nbs_lib.guard.MultipartCheck answers it with 400."""
from __future__ import annotations
import re, sys
from pathlib import Path
import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings, strategies as st
from schemathesis import GenerationMode
sys.path.insert(0, str(Path(__file__).resolve().parents[1]/'bench'))
from stress import openapi_31  # noqa: E402
from test_serving import served  # noqa: F401  (the fixture: a real `bentoml serve` of a built sample's champion)

EXAMPLES = 300


def fuzz_predict(url: str, examples: int) -> int:
    """`examples` requests to /predict and /predict_file generated from the server's schema, valid and invalid (schemathesis strategies run
    by Hypothesis, without schemathesis' pytest plugin, which breaks on pytest 9); the first 5xx fails. Requests sent."""
    schema = schemathesis.openapi.from_dict(openapi_31(url)).include(path_regex='^/predict(_file)?$')
    schema.config.update(base_url=url)
    sent = []

    @settings(max_examples=examples, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck), phases=[Phase.generate])
    @given(case=st.one_of(schema.as_strategy(GenerationMode.POSITIVE), schema.as_strategy(GenerationMode.NEGATIVE)))
    def check(case):
        r = case.call(timeout=60); sent.append(r.status_code)
        assert r.status_code < 500, f'{case.as_curl_command()}\n-> {r.status_code} {r.text[:1000]}'
    check()
    return len(sent)


@pytest.mark.slow
def test_generated_requests_never_get_a_5xx(served):  # noqa: F811
    assert fuzz_predict(served['url'], EXAMPLES) >= EXAMPLES


@pytest.mark.slow
def test_malformed_multipart_body_answers_400(served):  # noqa: F811
    """The body fuzzing found (its parts do not match the boundary), and one with no boundary at all: 400 with the reason."""
    b = 'cced67c58ff767bad0a4bdd8e43584f1'
    r = httpx.post(f"{served['url']}/predict_file", content=f'--{b}\r\n$garbage--{b}--\r\n'.encode(),
                   headers={'content-type': f'multipart/form-data; boundary={b}'}, timeout=60)
    assert r.status_code == 400 and 'malformed multipart body' in r.json()['error'], (r.status_code, r.text)
    r = httpx.post(f"{served['url']}/predict_file", content=b'x', headers={'content-type': 'multipart/form-data'}, timeout=60)
    assert r.status_code == 400 and 'without a boundary' in r.json()['error'], (r.status_code, r.text)


@pytest.mark.slow
def test_server_up_and_no_5xx_logged_after_fuzzing(served):  # noqa: F811
    """Runs after the fuzzing (file order): still ready, the fuzzing reached it, no 5xx to /predict in its log."""
    url = served['url']
    assert httpx.get(f'{url}/readyz', timeout=30).status_code == 200
    counts = httpx.get(f'{url}/metrics', timeout=30).text
    def fuzzed(endpoint):
        return sum(float(l.rsplit(' ', 1)[1]) for l in counts.splitlines()
                   if l.startswith('bentoml_service_request_total{') and f'endpoint="{endpoint}"' in l)
    assert fuzzed('/predict') >= 20 and fuzzed('/predict_file') >= 20, counts[-2000:]  # the fuzzing reached both
    assert fuzzed('/predict') + fuzzed('/predict_file') >= EXAMPLES, counts[-2000:]
    log = (served['root']/'server.log').read_text()
    assert not re.search(r'path=/predict(_file)?,.*status=5\d\d', log), log[-3000:]
