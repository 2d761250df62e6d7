"""End to end on the real SmolLM2-135M-Instruct: text in, sensible text out."""
from __future__ import annotations

import pytest

from inference import SamplingParams

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def test_chat_prompt_gives_sensible_text(smollm2_engine):
    ids = smollm2_engine.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}])
    completion = smollm2_engine.generate([ids], SamplingParams(max_tokens=30, temperature=0.0))[0]
    assert "Paris" in completion.text
    assert completion.usage.prompt_tokens == len(ids)


def test_engine_text_equals_tokenizer_decode(smollm2_engine):
    rendered = smollm2_engine.tokenizer.apply_chat_template(
        [{"role": "user", "content": "Write a short poem about the sea."}], add_generation_prompt=True, tokenize=False)
    completion = smollm2_engine.generate(rendered, SamplingParams(max_tokens=40, temperature=0.0))[0]
    decoded = smollm2_engine.tokenizer.decode(completion.token_ids, skip_special_tokens=True)
    assert completion.text == decoded and len(completion.text) > 20


def test_stop_strings_end_the_output_and_are_not_emitted(smollm2_engine):
    ids = smollm2_engine.apply_chat_template([{"role": "user", "content": "Count from one to ten in words."}])
    free = smollm2_engine.generate([ids], SamplingParams(max_tokens=60, temperature=0.0))[0].text
    stop = free[len(free) // 3: len(free) // 3 + 6]  # a string the model is known to write
    handle = smollm2_engine.submit(ids, SamplingParams(max_tokens=60, temperature=0.0, stop=[stop, "zzzz-never"]))
    events = list(handle.iter_sync(timeout_s=120))
    streamed = "".join(e.text for e in events[:-1])
    assert events[-1].finish_reason == "stop" and events[-1].stop_reason == stop
    assert streamed == free[:free.index(stop)]
    assert stop not in streamed


def test_multibyte_characters_never_split(smollm2_engine):
    # Emoji and accented text are several tokens per character in a byte-level BPE.
    prompt = smollm2_engine.apply_chat_template([{"role": "user", "content": "Repeat exactly: 🙂🎉 café ñandú 日本語"}])
    handle = smollm2_engine.submit(prompt, SamplingParams(max_tokens=40, temperature=0.0))
    pieces = [e.text for e in handle.iter_sync(timeout_s=120)]
    assert all("\ufffd" not in piece for piece in pieces)
    tokens = smollm2_engine.tokenizer.encode("🙂🎉 café")
    from inference.detokenizer import IncrementalDetokenizer

    detok = IncrementalDetokenizer(smollm2_engine.tokenizer, [], [])
    out = []
    for token in tokens:
        detok.add(token)
        out.append(detok.release())
    assert "".join(out) == "🙂🎉 café" and all("\ufffd" not in piece for piece in out)


def test_tokenizer_helpers_and_stats(smollm2_engine):
    assert smollm2_engine.count_tokens("Hello world") == 2
    assert smollm2_engine.max_model_len > 1000  # capped by the 64 MiB cache of the fixture
    stats = smollm2_engine.stats()
    assert stats["dtype"] == "float32" and stats["device"] == "cpu"
