"""The bundled SmolLM2 GGUF converts to a safetensors model that really chats."""
import pytest
import torch


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_converted_smollm2_gives_a_non_empty_greedy_reply(smollm2_dir):
    from pathlib import Path

    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert (Path(smollm2_dir) / "model.safetensors").exists()
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True, return_tensors="pt", return_dict=True,
    )
    output = model.generate(**prompt, max_new_tokens=24, do_sample=False)
    reply = tokenizer.decode(output[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True)
    assert reply.strip(), "empty reply"
    assert "Paris" in reply


def test_bundled_gguf_is_found_without_importing_the_package():
    import sys

    from inference.bootstrap import BUNDLED, bundled_gguf_path

    package, filename, _ = BUNDLED["bundled:smollm2"]
    path = bundled_gguf_path(package, filename)
    assert path.stat().st_size > 50_000_000
    assert package not in sys.modules


def test_unknown_bundled_package_gives_a_clear_error():
    from inference.bootstrap import bundled_gguf_path

    with pytest.raises(FileNotFoundError, match="not installed"):
        bundled_gguf_path("no_such_model_pkg", "x.gguf")
