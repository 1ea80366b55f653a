"""`afsplit serve --config configs/tiny.yaml` end to end: the launcher starts 1 attention + 2 expert ranks
(gloo), the coordinator serves HTTP; then a killed rank ends the server with an error, without a hang."""

import signal
import time

import pytest

from tests.helpers.server_process import ROOT, ServerProcess

openai = pytest.importorskip("openai")

TIMEOUT_S = 6  # comm.timeout_s: the idle server must keep the followers alive past it


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from afsplit.models.tiny import make_tiny

    return make_tiny("qwen3_moe", tmp_path_factory.mktemp("tiny"), seed=13)


def serve_tiny(model_dir, log_dir, env=None) -> ServerProcess:
    return ServerProcess(["--config", str(ROOT / "configs/tiny.yaml"), "--set", f"model.path={model_dir}",
                          "--set", f"comm.timeout_s={TIMEOUT_S}"], log_dir, env=env, ready_s=240)


@pytest.mark.slow
def test_tiny_layout_served_end_to_end(model_dir, tmp_path):
    from afsplit import LLM, SamplingParams

    ref = LLM(model=str(model_dir), num_kv_blocks=64).generate(
        ["Hello, afsplit!"], SamplingParams(temperature=0, max_tokens=16, ignore_eos=True), use_tqdm=False)
    srv = serve_tiny(model_dir, tmp_path)
    try:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0, timeout=60)
        name = client.models.list().data[0].id
        r = client.completions.create(model=name, prompt="Hello, afsplit!", max_tokens=16, temperature=0,
                                      extra_body={"ignore_eos": True})
        assert r.choices[0].text == ref[0].outputs[0].text  # the cluster gives the reference engine's tokens

        kw = dict(model=name, prompt="seeded", max_tokens=20, temperature=0.8, seed=5, extra_body={"ignore_eos": True})
        text = client.completions.create(**kw).choices[0].text
        assert "".join(c.choices[0].text for c in client.completions.create(**kw, stream=True)) == text
        chat = client.chat.completions.create(model=name, messages=[{"role": "user", "content": "hi"}], max_tokens=4)
        assert chat.usage.completion_tokens <= 4 and chat.choices[0].message.role == "assistant"

        stream = client.completions.create(model=name, prompt="long", max_tokens=400, temperature=0, stream=True,
                                           extra_body={"ignore_eos": True})
        for i, _ in enumerate(stream):
            if i == 3:
                break
        assert srv.metrics()["afsplit:kv_cache_usage_perc"] > 0
        stream.close()  # disconnect: the abort reaches the attention rank with the next plan
        m = srv.wait_metrics(lambda m: m["afsplit:num_requests_running"] == 0 and m["afsplit:kv_cache_usage_perc"] == 0)
        assert m["afsplit:num_requests_running"] == 0 and m["afsplit:kv_cache_usage_perc"] == 0, m
        assert m["afsplit:moe_exchange_seconds_per_layer_count"] > 0

        time.sleep(TIMEOUT_S + 2)  # idle longer than comm.timeout_s: keep-alive plans hold the followers
        assert client.completions.create(model=name, prompt="after idle", max_tokens=3).usage.completion_tokens == 3
    finally:
        srv.signal(signal.SIGINT)  # Ctrl-C to the launcher: every rank stops in order
        code = srv.wait(timeout_s=40)
        srv.kill()
    out = srv.output()
    assert code == 0, out[-3000:]
    assert "server stopped" in out


@pytest.mark.slow
def test_killed_rank_ends_the_server_with_an_error(model_dir, tmp_path):
    srv = serve_tiny(model_dir, tmp_path, env={"AFSPLIT_FAULT_EXIT_RANK": "2", "AFSPLIT_FAULT_AFTER_STEPS": "20"})
    try:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0, timeout=60)
        start = time.monotonic()
        with pytest.raises(openai.APIError):
            client.completions.create(model=client.models.list().data[0].id, prompt="doomed", max_tokens=200,
                                      temperature=0, extra_body={"ignore_eos": True})
        code = srv.wait(timeout_s=90)
        assert time.monotonic() - start < 90
    finally:
        srv.kill()
    out = srv.output()
    assert code != 0
    errors = [line for line in out.splitlines() if line.startswith("afsplit: error:")]
    assert len(errors) == 1 and "rank 2 (expert" in errors[0], out[-3000:]  # one line, naming the rank that died
