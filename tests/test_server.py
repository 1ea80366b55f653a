"""`afsplit serve` from the single-process engine, as a real process on loopback, driven by the official
`openai` client: completions and chat, streaming and not, concurrent streams, disconnects, every
error class, metrics, the load generator, and a clean SIGTERM (the last test: it stops the server)."""

import asyncio
import json
import signal
import threading
import time

import pytest
import yaml

from tests.helpers.server_process import ServerProcess

openai = pytest.importorskip("openai")

MAX_WAITING = 24


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from afsplit.models.tiny import make_tiny

    return make_tiny("qwen3_moe", tmp_path_factory.mktemp("tiny"), seed=11)


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("serve")
    cfg = d / "cfg.yaml"
    cfg.write_text(yaml.safe_dump({"model": {"path": str(model_dir)},
                                   "runtime": {"num_kv_blocks": 256, "block_size": 16, "max_num_seqs": 16,
                                               "max_num_batched_tokens": 512}}))
    srv = ServerProcess(["--config", str(cfg), "--served-model-name", "tiny", "--max-waiting", str(MAX_WAITING)], d)
    yield srv
    srv.kill()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def aclient(server):
    return lambda: openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=60)


def idle(m: dict) -> bool:
    return m["afsplit:num_requests_running"] == 0 and m["afsplit:num_requests_waiting"] == 0 \
        and m["afsplit:kv_cache_usage_perc"] == 0


def test_health_and_models(server, client):
    assert server.get("/health")[0] == 200
    models = client.models.list().data
    assert [m.id for m in models] == ["tiny"] and models[0].max_model_len == 512


def test_completion_text_and_token_prompts(client):
    r = client.completions.create(model="tiny", prompt="Hello, afsplit!", max_tokens=12, temperature=0,
                                  extra_body={"ignore_eos": True})
    c = r.choices[0]
    assert c.finish_reason == "length" and isinstance(c.text, str) and c.text
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (15, 12, 27)
    r2 = client.completions.create(model="tiny", prompt=list(b"Hello, afsplit!"), max_tokens=12, temperature=0,
                                   extra_body={"ignore_eos": True})
    assert r2.choices[0].text == c.text  # the same tokens as text or as ids
    r3 = client.completions.create(model="tiny", prompt=["one", "two"], max_tokens=3, temperature=0,
                                   extra_body={"ignore_eos": True, "return_token_ids": True})
    assert [ch.index for ch in r3.choices] == [0, 1] and r3.usage.completion_tokens == 6
    assert len(r3.choices[0].model_extra["token_ids"]) == 3


def _stream_text(stream) -> tuple[str, str, object, int]:
    text, finish, usage, chunks = "", None, None, 0
    for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        for ch in chunk.choices:
            piece = ch.text if hasattr(ch, "text") else (ch.delta.content or "")
            assert "\ufffd" not in piece
            text += piece
            chunks += 1
            finish = ch.finish_reason or finish
    return text, finish, usage, chunks


@pytest.mark.parametrize("stop", [None, "STOP-FROM-TEXT"])
def test_streamed_text_equals_non_streamed_text_for_the_same_seed(client, stop):
    kw = dict(model="tiny", prompt="The quick brown fox", max_tokens=40, temperature=0.9, top_p=0.95, seed=7,
              extra_body={"top_k": 50, "ignore_eos": True})
    full = client.completions.create(**kw).choices[0].text
    if stop:  # a stop string from the middle of the text: both responses end right before it
        stop = full[len(full) // 2:len(full) // 2 + 2]
        kw["stop"] = [stop]
    a = client.completions.create(**kw)
    text, finish, usage, chunks = _stream_text(client.completions.create(**kw, stream=True,
                                                                         stream_options={"include_usage": True}))
    assert text == a.choices[0].text and finish == a.choices[0].finish_reason
    assert usage.completion_tokens == a.usage.completion_tokens and chunks > 1
    if stop:
        assert text == full[:full.find(stop)] and finish == "stop"
    else:
        assert text == full and finish == "length" and usage.completion_tokens == 40


def test_chat_streamed_and_not(client, model_dir):
    from tokenizers import Tokenizer

    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hi"}]
    r = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=16, temperature=0.7, seed=3,
                                       extra_body={"ignore_eos": True})
    m = r.choices[0].message
    assert m.role == "assistant" and r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 16
    chatml = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nSay hi<|im_end|>\n<|im_start|>assistant\n"
    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    assert r.usage.prompt_tokens == len(tok.encode(chatml, add_special_tokens=False).ids)
    stream = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=16, temperature=0.7, seed=3,
                                            stream=True, extra_body={"ignore_eos": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == m.content
    assert chunks[-1].choices[0].finish_reason == "length" and chunks[-1].object == "chat.completion.chunk"


def test_sixteen_concurrent_streams_interleave(server, aclient):
    async def one(client, i):
        times, text = [], ""
        stream = await client.completions.create(model="tiny", prompt=f"stream {i}", max_tokens=24, temperature=0,
                                                 stream=True, extra_body={"ignore_eos": True})
        async for chunk in stream:
            times.append(time.monotonic())
            text += chunk.choices[0].text
            finish = chunk.choices[0].finish_reason
        return times, text, finish

    async def main():
        client = aclient()
        return await asyncio.gather(*(one(client, i) for i in range(16)))

    results = asyncio.run(main())
    assert all(f == "length" for _, _, f in results)
    firsts, lasts = [t[0] for t, _, _ in results], [t[-1] for t, _, _ in results]
    assert max(firsts) < min(lasts), "streams did not overlap: requests ran one at a time"
    assert sum(len(t) for t, _, _ in results) > 16 * 4  # chunks of different streams interleave
    server.wait_metrics(idle)


def test_disconnect_mid_stream_aborts_and_frees_blocks(server, client):
    stream = client.completions.create(model="tiny", prompt="long one", max_tokens=400, temperature=0, stream=True,
                                       extra_body={"ignore_eos": True})
    for i, _ in enumerate(stream):
        if i == 3:
            break
    busy = server.metrics()
    assert busy["afsplit:num_requests_running"] == 1 and busy["afsplit:kv_cache_usage_perc"] > 0
    stream.close()  # the client goes away mid-stream
    m = server.wait_metrics(idle, timeout_s=15)
    assert idle(m), m
    assert m["afsplit:generation_tokens_total"] > 0
    # the non-streaming path too: the client times out and leaves
    with pytest.raises(openai.APITimeoutError):
        client.with_options(timeout=0.5).completions.create(model="tiny", prompt="x", max_tokens=500, temperature=0,
                                                            extra_body={"ignore_eos": True})
    assert idle(server.wait_metrics(idle, timeout_s=15))


def _error(exc_info):
    body = exc_info.value.body
    assert set(body) == {"message", "type", "param", "code"}, body  # the client unwraps {"error": ...}
    return body


def test_every_error_class_and_the_server_keeps_serving(server, client):
    with pytest.raises(openai.BadRequestError) as e:  # a field of the wrong type
        client.completions.create(model="tiny", prompt="x", extra_body={"temperature": "hot"})
    assert _error(e)["param"] == "temperature"
    with pytest.raises(openai.BadRequestError) as e:  # a value the engine rejects
        client.completions.create(model="tiny", prompt="x", top_p=0)
    assert "top_p" in _error(e)["message"]
    with pytest.raises(openai.BadRequestError) as e:  # longer than max_model_len
        client.completions.create(model="tiny", prompt="a" * 600)
    assert "max_model_len" in _error(e)["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", prompt="x", n=2)
    assert _error(e)["param"] == "n"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "x"}}]}])
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="gpt-4", prompt="x")
    assert _error(e)["code"] == "model_not_found" and e.value.status_code == 404
    status, body = server.post_raw("/v1/completions", b'{"prompt": "x",')  # not JSON
    assert status == 400 and set(body["error"]) == {"message", "type", "param", "code"}
    assert server.get("/v1/nothing")[0] == 404
    r = client.completions.create(model="tiny", prompt="still here", max_tokens=2)
    assert r.usage.completion_tokens == 2


def test_full_queue_answers_429(server, aclient):
    async def one(client, i):
        try:
            await client.completions.create(model="tiny", prompt=f"q{i}", max_tokens=300, temperature=0,
                                            extra_body={"ignore_eos": True})
            return "done"
        except openai.RateLimitError as e:
            assert e.body["type"] == "rate_limit_error" and "--max-waiting" in e.body["message"]
            return 429

    async def main():
        client = aclient()
        tasks = [asyncio.ensure_future(one(client, i)) for i in range(16 + MAX_WAITING + 10)]
        while not any(t.done() for t in tasks):
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.5)
        codes = [t.result() for t in tasks if t.done()]
        for t in tasks:  # leave: the accepted requests are aborted
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        return codes

    codes = asyncio.run(main())
    assert codes.count(429) >= 10, codes
    assert idle(server.wait_metrics(idle, timeout_s=20))


def test_metrics_names(server):
    m = server.metrics()
    for name in ["afsplit:num_requests_running", "afsplit:num_requests_waiting", "afsplit:kv_cache_usage_perc",
                 "afsplit:prompt_tokens_total", "afsplit:generation_tokens_total",
                 "afsplit:time_to_first_token_seconds_count", "afsplit:inter_token_latency_seconds_count",
                 "afsplit:e2e_request_latency_seconds_count", "afsplit:request_success_total"]:
        assert name in m, name
    assert m["afsplit:time_to_first_token_seconds_count"] > 10 and m["afsplit:inter_token_latency_seconds_count"] > 100
    assert "afsplit:moe_exchange_seconds_per_layer_count" not in m  # one process: no exchange


def test_load_generator_random_and_sharegpt(server, model_dir, tmp_path):
    from launch import bench_serve

    out = bench_serve.main(["--base-url", server.url, "--num-prompts", "8", "--random-input-len", "16",
                            "--random-output-len", "8", "--max-concurrency", "4", "--ignore-eos", "--disable-tqdm",
                            "--save-result", "--result-dir", str(tmp_path), "--result-filename", "r.json"])
    saved = json.loads((tmp_path / "r.json").read_text())
    assert saved["completed"] == 8 and saved["failed"] == 0 and saved["request_rate"] == "inf"
    assert saved["total_output_tokens"] == 64 and saved["total_input_tokens"] == 128
    for key in ["request_throughput", "output_throughput", "mean_ttft_ms", "median_ttft_ms", "p99_ttft_ms",
                "mean_tpot_ms", "median_tpot_ms", "p99_tpot_ms", "mean_itl_ms", "p99_itl_ms", "mean_e2el_ms",
                "median_e2el_ms", "p99_e2el_ms"]:
        assert saved[key] > 0, key
    assert out["output_throughput"] == saved["output_throughput"]
    data = [{"id": str(i), "conversations": [{"from": "human", "value": f"question number {i}, please answer"},
                                             {"from": "gpt", "value": "an answer of some length " * (i + 1)}]}
            for i in range(6)]
    (tmp_path / "sg.json").write_text(json.dumps(data))
    out = bench_serve.main(["--base-url", server.url, "--endpoint", "/v1/chat/completions", "--dataset-name",
                            "sharegpt", "--dataset-path", str(tmp_path / "sg.json"), "--tokenizer", str(model_dir),
                            "--num-prompts", "4", "--request-rate", "50", "--ignore-eos", "--disable-tqdm"])
    assert out["completed"] == 4 and out["output_lens"] == [len(d["conversations"][1]["value"].encode())
                                                            for d in [data[i] for i in _sharegpt_order(4)]]


def _sharegpt_order(n):
    import random

    order = list(range(6))
    random.Random(0).shuffle(order)
    return order[:n]


def test_sigterm_drains_and_exits_cleanly(server, client):
    """Last: SIGTERM while a stream runs; the stream ends, the process exits 0."""
    stream = client.completions.create(model="tiny", prompt="drain me", max_tokens=250, temperature=0,
                                       stream=True, extra_body={"ignore_eos": True})
    got = []

    def read():
        try:
            for chunk in stream:
                got.append(chunk)
        except Exception as e:  # noqa: BLE001 -- the server may cut the stream after its drain time
            got.append(e)

    reader = threading.Thread(target=read)
    reader.start()
    while not got:
        time.sleep(0.02)
    server.signal(signal.SIGTERM)
    assert server.wait(timeout_s=30) == 0, server.output()[-2000:]
    reader.join(timeout=10)
    assert not reader.is_alive() and len(got) > 1
    assert "server stopped" in server.output()
