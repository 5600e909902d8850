"""The server under bad input and faults: every bad request gets OpenAI's error shape and a
4xx status, limits answer 400 / 429 / 503, clients that go away stop their requests, the
API is fuzzed from its own OpenAPI schema, and a soak brings the pool back to its baseline."""

from __future__ import annotations

import random
import resource
import threading
import time

import pytest
from hypothesis import HealthCheck, given, settings
from serve_util import MODEL, LiveServer, new_llm

httpx = pytest.importorskip("httpx")
schemathesis = pytest.importorskip("schemathesis")


@pytest.fixture(scope="module")
def live():
    llm = new_llm()
    with LiveServer(llm, max_prompt_tokens=1000) as s:
        yield s
    llm.close()


def post(live, path, body, timeout=60.0):
    if isinstance(body, (bytes, str)):
        return httpx.post(f"{live.url}{path}", content=body,
                          headers={"content-type": "application/json"}, timeout=timeout)
    return httpx.post(f"{live.url}{path}", json=body, timeout=timeout)


def ok_body(**kw):
    return {"model": MODEL, "prompt": "Hello", "max_tokens": 4, "temperature": 0} | kw


BAD = [
    ("malformed JSON", b'{"model": "smollm2", "prompt": ', 400, None),
    ("not an object", b"[1, 2]", 400, None),
    ("missing prompt", {"model": MODEL}, 400, "prompt"),
    ("unknown field", ok_body(max_token=3), 400, "max_token"),
    ("string max_tokens", ok_body(max_tokens="5"), 400, "max_tokens"),
    ("bool temperature", ok_body(temperature=True), 400, "temperature"),
    ("unknown model", ok_body(model="gpt-4"), 404, "model"),
    ("empty prompt", ok_body(prompt=""), 400, "prompt"),
    ("negative max_tokens", ok_body(max_tokens=-1), 400, "max_tokens"),
    ("zero max_tokens", ok_body(max_tokens=0), 400, "max_tokens"),
    ("huge max_tokens", ok_body(max_tokens=10**9), 400, "max_tokens"),
    ("oversize prompt", ok_body(prompt="word " * 1200), 400, "prompt"),
    ("token id outside the vocabulary", ok_body(prompt=[1, 10**7]), 400, "prompt"),
    ("negative token id", ok_body(prompt=[-1]), 400, "prompt"),
    ("n=2", ok_body(n=2), 400, "n"),
    ("logprobs", ok_body(logprobs=3), 400, "logprobs"),
    ("temperature below 0", ok_body(temperature=-0.5), 400, "temperature"),
    ("top_p above 1", ok_body(top_p=1.5), 400, "top_p"),
    ("negative seed", ok_body(seed=-3), 400, "seed"),
    ("empty stop string", ok_body(stop=[""]), 400, "stop"),
    ("unknown press", ok_body(press="nope"), 400, "press"),
    ("press with a path argument", ok_body(press={"name": "duo_attention", "pattern": "/etc"}),
     400, "press"),
    ("bad attention", ok_body(attention="top_k:k=0"), 400, "attention"),
    ("drafter reading a path", ok_body(speculative="draft:/etc/passwd"), 400, "speculative"),
    ("stream with two prompts", ok_body(prompt=["a", "b"], stream=True), 400, "prompt"),
]


@pytest.mark.parametrize("what,body,status,param", BAD, ids=[b[0] for b in BAD])
def test_bad_requests_get_the_openai_error_shape(live, what, body, status, param):
    r = post(live, "/v1/completions", body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param is not None:
        assert err["param"] == param, err
    assert post(live, "/v1/completions", ok_body()).status_code == 200
    assert live.idle()["live_blocks"] == 0


def test_bad_chat_requests(live):
    for body in ({"model": MODEL, "messages": []},
                 {"model": MODEL, "messages": [{"role": "robot", "content": "hi"}]},
                 {"model": MODEL, "messages": [{"role": "user"}]},
                 {"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                  "tools": [{"type": "function"}]}):
        r = post(live, "/v1/chat/completions", body)
        assert r.status_code == 400 and "error" in r.json(), (body, r.text)
    assert httpx.get(f"{live.url}/v1/nothing").json()["error"]["message"]


def _long(**kw):
    return ok_body(prompt="Count:", max_tokens=300, ignore_eos=True) | kw


def _in_thread(fn):
    out = {}
    t = threading.Thread(target=lambda: out.setdefault("r", fn()), daemon=True)
    t.start()
    return t, out


def _wait(cond, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def test_queue_limit_is_429_and_queue_timeout_is_503():
    llm = new_llm(kv_mib=64)
    try:
        with LiveServer(llm, max_running=1, max_queue=1, queue_timeout=0.5) as s:
            t1, r1 = _in_thread(lambda: post(s, "/v1/completions", _long()))
            _wait(lambda: s.scheduler.stats()["running"] == 1)
            t2, r2 = _in_thread(lambda: post(s, "/v1/completions", ok_body()))
            _wait(lambda: s.scheduler.stats()["waiting"] == 1)
            third = post(s, "/v1/completions", ok_body())
            assert third.status_code == 429 and third.json()["error"]["code"] == "queue_full"
            t2.join(30)
            assert r2["r"].status_code == 503, r2["r"].text
            assert r2["r"].json()["error"]["code"] == "timeout"
            t1.join(60)
            assert r1["r"].status_code == 200
            assert s.idle()["live_blocks"] == 0
    finally:
        llm.close()


def test_a_request_larger_than_the_pool_is_400():
    llm = new_llm(kv_mib=8)
    try:
        with LiveServer(llm) as s:
            r = post(s, "/v1/completions", ok_body(max_tokens=2000))
            assert r.status_code == 400 and r.json()["error"]["code"] == "kv_memory_exceeded"
            assert post(s, "/v1/completions", ok_body()).status_code == 200
            # Chat's default length (the rest of the context) is capped by the pool.
            chat = {"model": MODEL, "messages": [{"role": "user", "content": "Count to 3."}],
                    "temperature": 0}
            r = post(s, "/v1/chat/completions", chat)
            assert r.status_code == 200, r.text
            assert r.json()["usage"]["completion_tokens"] >= 1
    finally:
        llm.close()


def test_a_client_that_disconnects_stops_its_request(live):
    with pytest.raises(httpx.ReadTimeout):
        post(live, "/v1/completions", _long(max_tokens=2000), timeout=0.5)
    stats = live.idle(timeout=5)
    assert stats["running"] == 0 and stats["live_blocks"] == 0


def _soak(live, n, seed):
    rng = random.Random(seed)
    baseline = live.scheduler.stats()
    for i in range(n):
        kind = rng.random()
        if kind < 0.2:
            r = post(live, "/v1/completions", ok_body(max_tokens=rng.choice([-1, 0, "x"])))
            assert r.status_code == 400
        elif kind < 0.4:
            with httpx.stream("POST", f"{live.url}/v1/completions", timeout=60,
                              json=_long(stream=True)) as r:
                for j, _ in enumerate(r.iter_lines()):
                    if j > rng.randrange(1, 6):
                        break
        else:
            r = post(live, "/v1/completions", ok_body(prompt=f"Item {i} is",
                                                      max_tokens=rng.randrange(1, 6)))
            assert r.status_code == 200
    after = live.idle()
    live.scheduler.cache.clear()
    assert live.idle()["live_blocks"] == 0
    return baseline, after


def test_short_soak_returns_the_pool_to_its_baseline(live):
    _soak(live, 60, seed=1)
    live.llm.check_pool()
    s = live.llm.kv_stats()
    assert s["free_blocks"] == s["total_blocks"]


@pytest.mark.slow
def test_soak_of_a_thousand_requests(live):
    _soak(live, 200, seed=2)  # warm up allocators before measuring RSS
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    _soak(live, 1000, seed=3)
    rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    live.llm.check_pool()
    s = live.llm.kv_stats()
    assert s["free_blocks"] == s["total_blocks"]
    assert rss1 - rss0 < 64 * 1024, (rss0, rss1)  # KiB: flat within 64 MiB


@pytest.fixture(scope="module")
def fuzz_live():
    llm = new_llm(kv_mib=64, max_context=64)  # every generation is short
    with LiveServer(llm) as s:
        yield s
    llm.close()


def test_api_fuzz_never_errors_on_the_server(fuzz_live):
    """Every operation of the OpenAPI schema, with generated bodies (example count from the
    hypothesis profile): never a 5xx, errors in OpenAI's shape, no block left behind."""
    schema = schemathesis.openapi.from_url(f"{fuzz_live.url}/openapi.json")
    operations = [op.ok() for op in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/completions", "/v1/chat/completions"}
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(suppress_health_check=list(HealthCheck), deadline=None)
        def call(case):
            r = case.call(base_url=fuzz_live.url, timeout=60)
            assert r.status_code < 500, (case.as_curl_command(), r.text[:500])
            if r.status_code >= 400:
                assert set(r.json()["error"]) == {"message", "type", "param", "code"}

        call()
    assert fuzz_live.idle()["live_blocks"] == 0
