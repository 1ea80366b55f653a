"""The server's parts without a server: incremental detokenisation, stop strings, the chat template,
the error mapping of the protocol layer."""

import random

import pytest

from afsplit.sequence import SeqUpdate
from afsplit.server.detokenizer import IncrementalDetokenizer
from afsplit.server.output import ChoiceOutput


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from afsplit.models.tiny import make_tiny

    return make_tiny("qwen3_moe", tmp_path_factory.mktemp("tiny"), seed=3)


@pytest.fixture(scope="module")
def tok(tiny_dir):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(tiny_dir / "tokenizer.json"))


TEXTS = ["plain ascii", "é à ü", "中文字符", "emoji 🙂🚀 mixed", "a\u0301 combining", ""]


@pytest.mark.parametrize("text", TEXTS)
def test_incremental_detokenizer_never_splits_a_character(tok, text):
    ids = tok.encode(text, add_special_tokens=False).ids
    prompt = tok.encode("prompt é", add_special_tokens=False).ids
    for group in (1, 2, 3):
        d = IncrementalDetokenizer(tok, prompt)
        deltas = [d.add(ids[i:i + group]) for i in range(0, len(ids), group)] + [d.flush()]
        assert all("\ufffd" not in x for x in deltas), deltas
        assert "".join(deltas) == text == tok.decode(ids)


def test_incremental_detokenizer_flushes_an_unfinished_character_as_a_full_decode_does(tok):
    ids = tok.encode("ok é", add_special_tokens=False).ids[:-1]  # cut inside é
    d = IncrementalDetokenizer(tok)
    text = "".join(d.add([t]) for t in ids) + d.flush()
    assert text == tok.decode(ids) and text.endswith("\ufffd")


def test_special_tokens_are_skipped_in_text(tok):
    d = IncrementalDetokenizer(tok)
    ids = tok.encode("hi", add_special_tokens=False).ids + [257]
    assert "".join(d.add([t]) for t in ids) + d.flush() == "hi"


def _stream(choice: ChoiceOutput, ids: list[int], finish: str = "length") -> list[str]:
    out = []
    for i, t in enumerate(ids):
        choice.add(SeqUpdate(0, [t], finish if i == len(ids) - 1 else None))
        out.append(choice.take()[0])
        if choice.finished:
            break
    return out


@pytest.mark.parametrize("stops", [["wor"], ["o w", "xyz"], ["d"], ["hello world!"], ["é"]])
def test_stop_strings_streamed_equals_final_text(tok, stops):
    text = "hello é world, dear"
    ids = tok.encode(text, add_special_tokens=False).ids
    c = ChoiceOutput(0, tok, [1, 2], stops)
    deltas = _stream(c, ids)
    first = min((text.find(s) for s in stops if s in text), default=-1)
    expected = text if first < 0 else text[:first]
    assert "".join(deltas) == c.text == expected
    assert c.finish_reason == ("stop" if first >= 0 else "length")
    assert c.stopped_by_string == (first >= 0)


def test_random_stop_strings_against_a_full_decode(tok):
    rng = random.Random(0)
    for _ in range(50):
        ids = [rng.randrange(32, 127) for _ in range(rng.randrange(1, 40))]
        text = tok.decode(ids)
        a = rng.randrange(len(text))
        stop = text[a:a + rng.randrange(1, 5)]
        c = ChoiceOutput(0, tok, [], [stop])
        assert "".join(_stream(c, ids)) == c.text == text[:text.find(stop)]


def test_chat_template_matches_transformers(tiny_dir):
    from transformers import AutoTokenizer

    from afsplit.server.chat_template import load_chat_template

    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi é"},
            {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Again"}]
    ours = load_chat_template(str(tiny_dir))
    hf = AutoTokenizer.from_pretrained(str(tiny_dir))
    for gen in (True, False):
        assert ours.render(msgs, gen) == hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)


def test_chat_template_errors_are_request_errors(tmp_path):
    from afsplit.errors import RequestError
    from afsplit.server.chat_template import ChatTemplate, load_chat_template

    t = ChatTemplate("{% if messages[0]['role'] != 'user' %}{{ raise_exception('first message must be user') }}{% endif %}x")
    assert t.render([{"role": "user", "content": ""}]) == "x"
    with pytest.raises(RequestError, match="first message must be user"):
        t.render([{"role": "system", "content": ""}])
    with pytest.raises(RequestError, match="chat template failed"):
        ChatTemplate("{{ messages[5]['content'] }}").render([])
    assert load_chat_template(str(tmp_path)) is None and load_chat_template("") is None


def test_validation_errors_name_the_field():
    from pydantic import ValidationError

    from afsplit.server.protocol import CompletionRequest, validation_error

    for body, param in [({"prompt": "x", "temperature": "hot"}, "temperature"), ({"prompt": 5}, "prompt"),
                        ({}, "prompt"), ({"prompt": "x", "max_tokens": 1.5}, "max_tokens"),
                        ({"prompt": "x", "stream": 1}, "stream")]:
        with pytest.raises(ValidationError) as e:
            CompletionRequest.model_validate(body)
        err = validation_error(e.value.errors())
        assert err.status == 400 and err.param == param and err.message.startswith(param), err.message
        assert set(err.body()["error"]) == {"message", "type", "param", "code"}
    req = CompletionRequest.model_validate({"prompt": [[1, 2], [3]], "top_k": 5, "unknown_field": 1})
    assert req.prompts() == [{"prompt_token_ids": [1, 2]}, {"prompt_token_ids": [3]}]
    assert req.sampling_params().top_k == 5


def test_engine_thread_selects_the_engines_gpu(monkeypatch):
    """torch.device("cuda") names no index: the engine thread must pick the builder thread's current GPU."""
    import torch

    from afsplit.server.engine_core import thread_device

    picked = []
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    monkeypatch.setattr(torch.cuda, "set_device", picked.append)
    for dev in ("cuda", "cuda:1", "cpu"):
        thread_device(torch.device(dev))()
    assert picked == [3, 1]
