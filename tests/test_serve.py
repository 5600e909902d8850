"""`kvforge serve` on loopback with real clients (the `openai` package, httpx): the OpenAI
shapes, greedy output equal to `LLM.generate`, continuous batching under 16 concurrent
streams, cancellation, and the prefix cache."""

from __future__ import annotations

import threading
import time

import pytest
from serve_util import MODEL, LiveServer, new_llm

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

SYSTEM = ("You are a careful assistant. Answer in one short sentence, cite no sources, and "
          "never use lists. ") * 6


@pytest.fixture(scope="module")
def live():
    llm = new_llm()
    with LiveServer(llm, prefill_chunk=64) as s:
        yield s
    llm.close()


def direct(llm, prompt, **kw):
    kw.setdefault("max_new_tokens", 16)
    return llm.generate(prompt, **kw)


def test_models_health_and_metrics(live):
    client = live.client()
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert httpx.get(f"{live.url}/health").json() == {"status": "ok"}
    text = httpx.get(f"{live.url}/metrics").text
    for name in ("kvforge_kv_blocks{state=\"free\"}", "kvforge_queue_length",
                 "kvforge_running_sequences", "kvforge_prompt_tokens_total",
                 "kvforge_generation_tokens_total", "kvforge_time_to_first_token_seconds_bucket",
                 "kvforge_inter_token_latency_seconds_bucket"):
        assert name in text, name


def test_completion_equals_generate(live):
    out = live.client().completions.create(model=MODEL, prompt="The capital of France is",
                                           max_tokens=16, temperature=0)
    want = direct(live.llm, "The capital of France is")
    assert out.choices[0].text == want.text
    assert out.choices[0].finish_reason == ("length" if want.finish_reason == "length"
                                            else "stop")
    assert out.usage.prompt_tokens == len(live.llm.encode("The capital of France is"))
    assert out.usage.completion_tokens == len(want.token_ids)
    assert out.object == "text_completion" and out.id.startswith("cmpl-")


def test_token_id_prompt_and_several_prompts(live):
    ids = live.llm.encode("Once upon a time")
    client = live.client()
    out = client.completions.create(model=MODEL, prompt=ids, max_tokens=8, temperature=0)
    assert out.choices[0].text == direct(live.llm, ids, max_new_tokens=8).text
    out = client.completions.create(model=MODEL, prompt=["Water is", "Fire is"],
                                    max_tokens=8, temperature=0)
    assert [c.index for c in out.choices] == [0, 1]
    assert [c.text for c in out.choices] == [direct(live.llm, p, max_new_tokens=8).text
                                             for p in ("Water is", "Fire is")]


def test_chat_and_streaming_equal_chat(live):
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "What is two plus two?"}]
    want = live.llm.chat(messages, max_new_tokens=20)
    client = live.client()
    out = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=20,
                                         temperature=0)
    assert out.choices[0].message.content == want.text
    assert out.choices[0].message.role == "assistant"
    stream = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=20,
                                            temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == want.text
    assert chunks[-1].usage.completion_tokens == len(want.token_ids)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] is not None


def test_stop_strings_and_seeds(live):
    client = live.client()
    prompt = "List three colours: red,"
    want = direct(live.llm, prompt, stop=[","], max_new_tokens=24)
    out = client.completions.create(model=MODEL, prompt=prompt, max_tokens=24, temperature=0,
                                    stop=[","])
    assert out.choices[0].text == want.text and "," not in out.choices[0].text
    assert out.choices[0].finish_reason == "stop"
    sampled = [client.completions.create(model=MODEL, prompt=prompt, max_tokens=24,
                                         temperature=0.9, seed=seed).choices[0].text
               for seed in (7, 7, 8)]
    assert sampled[0] == sampled[1]
    assert sampled[0] == direct(live.llm, prompt, temperature=0.9, seed=7,
                                max_new_tokens=24).text
    assert sampled[0] != sampled[2]


def _stream_text(live, prompt, max_tokens):
    stream = live.client().completions.create(model=MODEL, prompt=prompt, max_tokens=max_tokens,
                                              temperature=0, stream=True)
    return "".join(c.choices[0].text for c in stream if c.choices)


def test_sixteen_concurrent_streams_equal_one_at_a_time(live):
    prompts = [f"{SYSTEM if i % 2 else ''}Question {i}: name a fruit that is {c}."
               for i, c in enumerate(["red", "yellow", "green", "orange"] * 4)]
    lengths = [12 + (i * 5) % 17 for i in range(16)]
    alone = [direct(live.llm, p, max_new_tokens=n).text
             for p, n in zip(prompts, lengths, strict=True)]
    results: list[str | None] = [None] * 16
    errors: list[BaseException] = []

    def run(i):
        try:
            results[i] = _stream_text(live, prompts[i], lengths[i])
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    assert results == alone
    stats = live.idle()
    assert stats["live_blocks"] == 0, stats


def test_cancelling_a_stream_frees_its_blocks_within_one_step(live):
    seen = []
    cancel = live.scheduler.cancel

    def record(job):
        seen.append(job)
        cancel(job)

    live.scheduler.cancel = record
    try:
        body = {"model": MODEL, "prompt": "Tell me a long story about a dragon.",
                "max_tokens": 400, "temperature": 0, "stream": True, "ignore_eos": True}
        with httpx.stream("POST", f"{live.url}/v1/completions", json=body, timeout=60) as r:
            events = 0
            for line in r.iter_lines():
                events += line.startswith("data: ")
                if events == 3:
                    break
        deadline = time.monotonic() + 10
        while (not seen or seen[0].freed_step is None) and time.monotonic() < deadline:
            time.sleep(0.005)
    finally:
        live.scheduler.cancel = cancel
    job = seen[0]
    assert job.freed_step is not None and job.freed_step - job.cancel_step <= 1
    assert len(job.dec.token_ids) < 400
    assert live.idle()["live_blocks"] == 0


def test_prefix_cache_reuses_a_system_prompt_exactly(live):
    live.scheduler.cache.clear()
    client = live.client()
    prompts = [SYSTEM + "Question: what colour is the sky?",
               SYSTEM + "Question: what colour is grass?"]
    cold = [direct(live.llm, p, max_new_tokens=12).text for p in prompts]
    first = client.completions.create(model=MODEL, prompt=prompts[0], max_tokens=12,
                                      temperature=0)
    second = client.completions.create(model=MODEL, prompt=prompts[1], max_tokens=12,
                                       temperature=0)
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    shared = second.usage.prompt_tokens_details.cached_tokens
    assert shared >= len(live.llm.encode(SYSTEM)) - 2 * live.llm.kv_config.block_size - 33
    assert [first.choices[0].text, second.choices[0].text] == cold
    stats = live.idle()
    assert stats["cached_blocks"] > 0 and stats["live_blocks"] == 0
    pool = live.llm.kv_stats()
    assert pool["cached_blocks"] == stats["cached_blocks"] and pool["live_blocks"] == 0
    assert pool["free_blocks"] + pool["cached_blocks"] == pool["total_blocks"]
    again = client.completions.create(model=MODEL, prompt=prompts[0], max_tokens=12,
                                      temperature=0, extra_body={"repetition_penalty": 1.3})
    assert again.choices[0].text == direct(live.llm, prompts[0], max_new_tokens=12,
                                           repetition_penalty=1.3).text
    assert again.usage.prompt_tokens_details.cached_tokens > 0


def test_prefix_cache_gives_way_when_the_pool_is_full():
    llm = new_llm(kv_mib=24)  # ~2950 blocks: a few hundred tokens of cache per request
    prompts = [f"Topic {i}. " + SYSTEM for i in range(6)]
    ref = new_llm(kv_mib=64)  # the server's cache fills its own pool
    want = [direct(ref, p, max_new_tokens=8).text for p in prompts]
    ref.close()
    try:
        with LiveServer(llm) as s:
            client = s.client()
            for prompt, text in zip(prompts, want, strict=True):
                out = client.completions.create(model=MODEL, prompt=prompt, max_tokens=8,
                                                temperature=0)
                assert out.choices[0].text == text
            assert s.scheduler.cache.stats.evictions > 0
            stats = s.idle()
            assert stats["live_blocks"] == 0
            assert stats["free_blocks"] + stats["cached_blocks"] == stats["total_blocks"]
        llm.check_pool()
        assert llm.kv_stats()["free_blocks"] == llm.kv_stats()["total_blocks"]
    finally:
        llm.close()


def test_press_attention_and_speculative_extensions(live):
    client = live.client()
    prompt = SYSTEM + "Repeat: the quick brown fox."
    for extra, kw in [({"press": {"name": "streaming_llm", "compression_ratio": 0.5}}, "press"),
                      ({"attention": "top_k:k=32"}, "attention"),
                      ({"speculative": "prompt-lookup"}, "speculative")]:
        out = client.completions.create(model=MODEL, prompt=prompt, max_tokens=10,
                                        temperature=0, extra_body=extra)
        assert out.choices[0].text, kw
        assert out.usage.prompt_tokens_details.cached_tokens == 0, kw
    spec = client.completions.create(model=MODEL, prompt=prompt, max_tokens=10, temperature=0,
                                     extra_body={"speculative": "prompt-lookup"})
    assert spec.choices[0].text == direct(live.llm, prompt, max_new_tokens=10).text
    assert live.idle()["live_blocks"] == 0


def test_a_chat_history_resumes_exactly_before_the_latest_reply(live):
    live.scheduler.cache.clear()
    client = live.client()
    short = "Name a colour."  # under 33 tokens: computed token by token, never cached
    first = client.completions.create(model=MODEL, prompt=short, max_tokens=6, temperature=0)
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    turn1 = SYSTEM + "User: name a planet.\nAssistant:"
    reply = client.completions.create(model=MODEL, prompt=turn1, max_tokens=12, temperature=0)
    turn2 = turn1 + reply.choices[0].text + "\nUser: and a moon?\nAssistant:"
    second = client.completions.create(model=MODEL, prompt=turn2, max_tokens=12,
                                       temperature=0)
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert 0 < cached <= len(live.llm.encode(turn1))  # never into the decoded reply
    assert second.choices[0].text == direct(live.llm, turn2, max_new_tokens=12).text
    again = client.completions.create(model=MODEL, prompt=short + " Another one?",
                                      max_tokens=6, temperature=0)
    assert again.usage.prompt_tokens_details.cached_tokens == 0
