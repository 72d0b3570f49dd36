"""``generate`` on GGUF and transformers, streaming and cancellation, against
llama-cpp and ``model.generate`` as oracles."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from celery import Celery

from tests.conftest import call, queue_name

PROMPT = "The history of the city of Rome begins"
MESSAGES = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Tell me about the city of Rome."},
]


def q(alias: str) -> str:
    return queue_name(f"gen-{alias}")


def hf_greedy(path: str, text: str, max_new_tokens: int, add_special_tokens: bool = True) -> tuple[str, int]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    encoded = tokenizer(text, return_tensors="pt", add_special_tokens=add_special_tokens)
    inputs = {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}
    out = model.generate(**inputs, do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id)
    new = out[0, inputs["input_ids"].shape[1] :]
    return tokenizer.decode(new, skip_special_tokens=True), int(new.shape[0])


def collect(client: Any, alias: str, **kwargs: Any) -> list[dict[str, Any]]:
    return list(client.stream_generate(alias, queue=q(alias), timeout=120, **kwargs))


def check_stream(messages: list[dict[str, Any]]) -> str:
    assert [m["seq"] for m in messages] == list(range(len(messages))), "seq starts at 0 with no gaps"
    assert [m["type"] for m in messages].count("end") == 1 and messages[-1]["type"] == "end"
    assert all(m["type"] == "token" for m in messages[:-1])
    assert len({m["task_id"] for m in messages}) == 1
    return "".join(m["text"] for m in messages[:-1])


# -- GGUF --------------------------------------------------------------------------------


def test_gguf_prompt_greedy_equals_llama_cpp(gen_worker: Any, producer: Celery, llama: Any) -> None:
    expected = llama.create_completion(PROMPT, max_tokens=40, temperature=0)
    result = call(producer, "generate", q("gemma"), model="gemma", prompt=PROMPT, max_tokens=40, temperature=0)
    assert result["text"] == expected["choices"][0]["text"]
    assert result["finish_reason"] == expected["choices"][0]["finish_reason"]
    assert result["usage"] == expected["usage"]
    assert PROMPT not in result["text"]


def test_weight_repacking_is_off_where_llama_cpp_would_use_amx(gguf_path: str) -> None:
    import llama_cpp

    from models.gguf import build_uses_amx, open_llama

    defaults = llama_cpp.llama_cpp.llama_model_default_params
    off = open_llama(gguf_path, weight_repacking=False, n_ctx=256, n_threads=2, verbose=False)
    auto = open_llama(gguf_path, n_ctx=256, n_threads=2, verbose=False)
    try:
        assert off.model_params.use_extra_bufts is False
        # the default: off exactly where the build would run the AMX kernels (llama.cpp #20824)
        assert auto.model_params.use_extra_bufts is (not build_uses_amx())
        assert llama_cpp.llama_cpp.llama_model_default_params is defaults, "the switch is put back"
        assert llama_cpp.llama_model_default_params().use_extra_bufts is True
        for llm in (off, auto):
            assert llm.create_completion(PROMPT, max_tokens=4, temperature=0)["choices"][0]["text"]
    finally:
        off.close()
        auto.close()


def test_gguf_chat_greedy_equals_create_chat_completion(gen_worker: Any, producer: Celery, llama: Any) -> None:
    messages = [{"role": "user", "content": "Write one sentence about the sea."}]
    expected = llama.create_chat_completion(messages=messages, max_tokens=40, temperature=0)
    result = call(producer, "generate", q("gemma"), model="gemma", messages=messages, max_tokens=40, temperature=0)
    assert result["text"] == expected["choices"][0]["message"]["content"]
    assert result["finish_reason"] == expected["choices"][0]["finish_reason"]
    assert result["usage"]["prompt_tokens"] == expected["usage"]["prompt_tokens"]


def test_gguf_stream_joins_to_the_final_text(gen_worker: Any, client: Any, producer: Celery, llama: Any) -> None:
    messages = collect(client, "gemma", prompt=PROMPT, max_tokens=40, temperature=0)
    text = check_stream(messages)
    expected = llama.create_completion(PROMPT, max_tokens=40, temperature=0)["choices"][0]["text"]
    assert text == expected
    result = producer.AsyncResult(messages[0]["task_id"]).get(timeout=30)
    assert result["text"] == text and messages[-1]["usage"] == result["usage"]
    assert messages[-1]["finish_reason"] == result["finish_reason"] == "length"


def test_gguf_stop_strings(gen_worker: Any, producer: Celery, llama: Any) -> None:
    full = llama.create_completion(PROMPT, max_tokens=40, temperature=0)["choices"][0]["text"]
    words = full.split()
    stop = words[len(words) // 2]
    expected = llama.create_completion(PROMPT, max_tokens=40, temperature=0, stop=[stop])
    result = call(
        producer, "generate", q("gemma"), model="gemma", prompt=PROMPT, max_tokens=40, temperature=0, stop=stop
    )
    assert result["text"] == expected["choices"][0]["text"] == full[: full.index(stop)]
    assert result["finish_reason"] == "stop"


def test_gguf_max_tokens_gives_length(gen_worker: Any, producer: Celery) -> None:
    result = call(producer, "generate", q("gemma"), model="gemma", prompt=PROMPT, max_tokens=5, temperature=0)
    assert result["finish_reason"] == "length"
    assert result["usage"]["completion_tokens"] == 5
    assert result["usage"]["total_tokens"] == result["usage"]["prompt_tokens"] + 5


def test_gguf_prompt_too_long(gen_worker: Any, producer: Celery) -> None:
    result = producer.send_task(
        "generate", kwargs={"model": "gemma", "prompt": "word " * 3000, "max_tokens": 16}, queue=q("gemma")
    )
    with pytest.raises(Exception) as info:
        result.get(timeout=30)
    assert type(info.value).__name__ == "InvalidRequest"
    assert "context window of 1024 by" in str(info.value)


def test_gguf_sampling_with_seed_is_repeatable(gen_worker: Any, producer: Celery) -> None:
    kwargs = {
        "model": "gemma",
        "prompt": PROMPT,
        "max_tokens": 20,
        "temperature": 0.9,
        "top_p": 0.9,
        "top_k": 40,
        "seed": 7,
    }
    first = call(producer, "generate", q("gemma"), **kwargs)
    second = call(producer, "generate", q("gemma"), **kwargs)
    assert first["text"] == second["text"] and first["usage"]["completion_tokens"] > 0


# -- transformers ------------------------------------------------------------------------


def test_transformers_greedy_equals_model_generate(gen_worker: Any, producer: Celery, tiny_lms: dict[str, str]) -> None:
    expected, n = hf_greedy(tiny_lms["tiny"], PROMPT, 24)
    result = call(producer, "generate", q("tiny"), model="tiny", prompt=PROMPT, max_tokens=24, temperature=0)
    assert result["text"] == expected and expected
    assert result["usage"]["completion_tokens"] == n


def test_transformers_stream_equals_model_generate(gen_worker: Any, client: Any, tiny_lms: dict[str, str]) -> None:
    expected, _ = hf_greedy(tiny_lms["tiny"], PROMPT, 24)
    messages = collect(client, "tiny", prompt=PROMPT, max_tokens=24, temperature=0)
    assert check_stream(messages) == expected


def test_transformers_chat_with_template(gen_worker: Any, producer: Celery, tiny_lms: dict[str, str]) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_lms["tiny-chat"])
    rendered = tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert rendered.endswith("[assistant]")
    expected, _ = hf_greedy(tiny_lms["tiny-chat"], rendered, 16, add_special_tokens=False)
    result = call(
        producer, "generate", q("tiny-chat"), model="tiny-chat", messages=MESSAGES, max_tokens=16, temperature=0
    )
    assert result["text"] == expected


def test_transformers_chat_without_template_uses_the_fallback(
    gen_worker: Any, producer: Celery, tiny_lms: dict[str, str]
) -> None:
    rendered = "system: You are a helpful assistant.\nuser: Tell me about the city of Rome.\nassistant:"
    expected, _ = hf_greedy(tiny_lms["tiny"], rendered, 16)
    result = call(producer, "generate", q("tiny"), model="tiny", messages=MESSAGES, max_tokens=16, temperature=0)
    assert result["text"] == expected


def test_transformers_stop_and_length(gen_worker: Any, producer: Celery, tiny_lms: dict[str, str]) -> None:
    full, _ = hf_greedy(tiny_lms["tiny"], PROMPT, 24)
    stop = full.split()[len(full.split()) // 2]
    result = call(
        producer, "generate", q("tiny"), model="tiny", prompt=PROMPT, max_tokens=24, temperature=0, stop=[stop]
    )
    assert result["text"] == full[: full.index(stop)] and result["finish_reason"] == "stop"
    capped = call(producer, "generate", q("tiny"), model="tiny", prompt=PROMPT, max_tokens=4, temperature=0)
    assert capped["finish_reason"] == "length" and capped["usage"]["completion_tokens"] == 4


def test_transformers_prompt_too_long(gen_worker: Any, producer: Celery) -> None:
    result = producer.send_task("generate", kwargs={"model": "tiny", "prompt": "word " * 2100}, queue=q("tiny"))
    with pytest.raises(Exception) as info:
        result.get(timeout=30)
    assert type(info.value).__name__ == "InvalidRequest" and "context window of 2048 by" in str(info.value)


# -- streams: late and reconnecting readers ------------------------------------------------


def test_late_reader_replays_the_stream(gen_worker: Any, client: Any, producer: Celery) -> None:
    task_id = client.send(
        "generate", model="gemma", queue=q("gemma"), prompt=PROMPT, max_tokens=20, temperature=0, stream=True
    )
    producer.AsyncResult(task_id).get(timeout=60)  # finished before anyone read
    messages = list(client.read_stream(task_id, timeout=30))
    text = check_stream(messages)
    assert text == producer.AsyncResult(task_id).get(timeout=5)["text"]


def test_reader_that_drops_half_way_resumes_from_seq(gen_worker: Any, client: Any) -> None:
    task_id = client.send(
        "generate", model="gemma", queue=q("gemma"), prompt=PROMPT, max_tokens=40, temperature=0, stream=True
    )
    first: list[dict[str, Any]] = []
    for message in client.read_stream(task_id, timeout=60):
        first.append(message)
        if len(first) == 5:
            break  # the connection drops
    rest = list(client.read_stream(task_id, after_seq=first[-1]["seq"], timeout=60))
    everything = first + rest
    check_stream(everything)
    assert everything == list(client.read_stream(task_id, timeout=30))


def test_async_stream_reader(gen_worker: Any, redis_url: str) -> None:
    import asyncio

    from producer import InferenceClient

    async def run() -> list[dict[str, Any]]:
        c = InferenceClient(redis_url)
        try:
            return [
                m
                async for m in c.astream_generate(
                    "gemma", queue=q("gemma"), prompt=PROMPT, max_tokens=10, temperature=0
                )
            ]
        finally:
            await c.aclose()

    check_stream(asyncio.run(run()))


# -- cancellation --------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["revoke", "redis-key"])
@pytest.mark.parametrize("alias", ["gemma", "tiny"])
def test_cancel_running_generation(how: str, alias: str, gen_worker: Any, client: Any, producer: Celery) -> None:
    stream = client.stream_generate(
        alias, queue=q(alias), prompt=PROMPT, max_tokens=2000 if alias == "tiny" else 900, temperature=0.8, seed=1
    )
    cancelled_at = None
    messages = []
    for message in stream:
        messages.append(message)
        if message["type"] == "token" and len(messages) == 5:
            cancelled_at = time.monotonic()
            if how == "revoke":
                producer.AsyncResult(message["task_id"]).revoke()
            else:
                client._redis.set("cancel:" + message["task_id"], 1, ex=60)
    ended_at = time.monotonic()
    assert cancelled_at is not None, "the generation ended before it could be cancelled"
    end = messages[-1]
    assert end["type"] == "end" and end["finish_reason"] == "cancelled"
    assert ended_at - cancelled_at < 0.25, f"stopped {ended_at - cancelled_at:.3f}s after the cancel"
    result = producer.AsyncResult(end["task_id"]).get(timeout=10)
    assert result["finish_reason"] == "cancelled" and result["text"] == check_stream(messages)
    # the model stays loaded and the worker takes the next task at once
    t0 = time.monotonic()
    nxt = call(producer, "generate", q(alias), model=alias, prompt="Hi", max_tokens=3, temperature=0)
    assert nxt["usage"]["completion_tokens"] >= 1 and time.monotonic() - t0 < 10
    assert gen_worker.alive()


def test_queued_task_cancelled_never_runs(gen_worker: Any, client: Any, producer: Celery) -> None:
    blocker = client.send("generate", model="gemma", queue=q("gemma"), prompt=PROMPT, max_tokens=60, temperature=0)
    victim = client.send("generate", model="gemma", queue=q("gemma"), prompt=PROMPT, max_tokens=60, temperature=0)
    client.cancel(victim)
    producer.AsyncResult(blocker).get(timeout=60)
    try:
        outcome = producer.AsyncResult(victim).get(timeout=60)
    except Exception as exc:  # revoked before it started
        assert type(exc).__name__ in ("TaskRevokedError",)
    else:  # it started, saw the key at once and stopped
        assert outcome["finish_reason"] == "cancelled" and outcome["usage"]["completion_tokens"] <= 1


@pytest.mark.parametrize("alias", ["gemma", "tiny"])
def test_generation_waiting_for_the_model_can_be_cancelled(
    alias: str, gen_worker: Any, client: Any, producer: Celery
) -> None:
    """A task that has started but waits its turn on the model (another generation holds
    it) ends as cancelled at once, without waiting for the other one to finish."""
    busy = client.stream_generate(
        alias, queue=q(alias), prompt=PROMPT, max_tokens=2000 if alias == "tiny" else 900, temperature=0.8, seed=1
    )
    first = next(busy)  # the model is generating for the first request
    waiting = client.send("generate", model=alias, queue=q(alias), prompt=PROMPT, max_tokens=20, temperature=0)
    deadline = time.monotonic() + 30
    while producer.AsyncResult(waiting).state != "STARTED":
        assert time.monotonic() < deadline, "the second task never started"
        time.sleep(0.02)
    t0 = time.monotonic()
    client.cancel(waiting)
    outcome = producer.AsyncResult(waiting).get(timeout=30)
    assert time.monotonic() - t0 < 1.0
    assert outcome["finish_reason"] == "cancelled" and outcome["text"] == ""
    assert outcome["usage"]["completion_tokens"] == 0 and outcome["usage"]["prompt_tokens"] > 0
    client.cancel(first["task_id"])
    rest = list(busy)
    assert rest[-1]["type"] == "end" and rest[-1]["finish_reason"] == "cancelled"


# -- concurrency ---------------------------------------------------------------------------


def test_two_generations_at_once(gen_worker: Any, producer: Celery) -> None:
    alone = {
        alias: call(producer, "generate", q(alias), model=alias, prompt=PROMPT, max_tokens=20, temperature=0)
        for alias in ("gemma", "tiny")
    }
    with ThreadPoolExecutor(4) as pool:
        futures = [
            pool.submit(call, producer, "generate", q(alias), model=alias, prompt=PROMPT, max_tokens=20, temperature=0)
            for alias in ("gemma", "gemma", "tiny", "tiny")
        ]
        results = [f.result(timeout=120) for f in futures]
    assert [r["text"] for r in results] == [alone["gemma"]["text"]] * 2 + [alone["tiny"]["text"]] * 2


# -- bad input -----------------------------------------------------------------------------

BAD = [
    ("neither prompt nor messages", {}, "prompt"),
    ("both prompt and messages", {"prompt": "a", "messages": [{"role": "user", "content": "b"}]}, "messages"),
    ("bad role", {"messages": [{"role": "wizard", "content": "b"}]}, "role"),
    ("message without content", {"messages": [{"role": "user"}]}, "content"),
    ("empty messages", {"messages": []}, "messages"),
    ("messages not a list", {"messages": "hi"}, "messages"),
    ("prompt not text", {"prompt": 5}, "prompt"),
    ("negative max_tokens", {"prompt": "a", "max_tokens": -1}, "max_tokens"),
    ("zero max_tokens", {"prompt": "a", "max_tokens": 0}, "max_tokens"),
    ("temperature too high", {"prompt": "a", "temperature": 5.0}, "temperature"),
    ("temperature negative", {"prompt": "a", "temperature": -0.1}, "temperature"),
    ("temperature a string", {"prompt": "a", "temperature": "hot"}, "temperature"),
    ("top_p zero", {"prompt": "a", "top_p": 0}, "top_p"),
    ("top_k zero", {"prompt": "a", "top_k": 0}, "top_k"),
    ("empty stop", {"prompt": "a", "stop": [""]}, "stop"),
    ("stop not text", {"prompt": "a", "stop": 3}, "stop"),
    ("seed negative", {"prompt": "a", "seed": -3}, "seed"),
    ("stream not a bool", {"prompt": "a", "stream": "yes"}, "stream"),
    ("unknown argument", {"prompt": "a", "n": 2}, "n"),
    ("unknown model", {"prompt": "a", "model": "gpt-9"}, "model"),
    ("model for another task", {"prompt": "a", "model": "minilm"}, "model"),
]


@pytest.mark.parametrize("label,kwargs,field", BAD, ids=[b[0] for b in BAD])
def test_bad_input(label: str, kwargs: dict[str, Any], field: str, gen_worker: Any, producer: Celery) -> None:
    result = producer.send_task("generate", kwargs={"model": "gemma", **kwargs}, queue=q("gemma"))
    with pytest.raises(Exception) as info:
        result.get(timeout=30)
    assert type(info.value).__name__ == "InvalidRequest", repr(info.value)
    assert field in str(info.value)


def test_bad_streaming_request_ends_its_stream_with_an_error(gen_worker: Any, client: Any) -> None:
    messages = collect(client, "gemma", prompt="a", max_tokens=-5)
    assert len(messages) == 1 and messages[0]["type"] == "error" and messages[0]["seq"] == 0
    assert messages[0]["error"]["type"] == "InvalidRequest" and "max_tokens" in messages[0]["error"]["message"]
    assert threading.active_count() >= 1
