"""The torch-free runtime: generation, sampling, streaming text, context limits and multi-turn reuse."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from ondevice_llama.cli.main import main
from ondevice_llama.export import ExportOptions, export_model
from ondevice_llama.loading import open_checkpoint
from ondevice_llama.loading.tokenizer import tokenizer_from_hf_folder
from ondevice_llama.model import load_reference
from ondevice_llama.runtime import ChatSession, ContextFullError, ExportedModel, Generator, Sampler, SamplingConfig
from ondevice_llama.runtime.detokenizer import IncrementalDetokenizer

from .conftest import SHARED

C = 40


@pytest.fixture(scope="module")
def exported(tiny_checkpoints, tmp_path_factory):
    out = tmp_path_factory.mktemp("runtime") / "export"
    export_model(open_checkpoint(tiny_checkpoints["gqa_tied"]), out,
                 ExportOptions(num_parts=2, sequence_length=8, context_length=C, precision="fp32"), progress=False)
    return out


@pytest.fixture(scope="module")
def model(exported):
    return ExportedModel(exported)


@pytest.fixture(scope="module")
def chat_model(tiny_checkpoints, tmp_path_factory):
    """Room for chat-formatted prompts, which the byte-level tiny tokenizer makes long."""
    out = tmp_path_factory.mktemp("chat") / "export"
    export_model(open_checkpoint(tiny_checkpoints["gqa_tied"]), out,
                 ExportOptions(num_parts=1, sequence_length=16, context_length=240, precision="fp32"), progress=False)
    return ExportedModel(out)


def reference_greedy(checkpoint_path, prompt: list[int], steps: int) -> list[int]:
    reference = load_reference(open_checkpoint(checkpoint_path))
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(steps):
            ids.append(int(reference(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


def test_runtime_imports_no_torch(exported):
    """A deployment needs onnxruntime, tokenizers and numpy: torch and the build-time packages stay out."""
    code = textwrap.dedent(f"""
        import sys
        for name in ("torch", "transformers", "onnx", "gguf", "sentencepiece"):
            sys.modules[name] = None  # any import of them now fails
        from ondevice_llama.runtime import ExportedModel, Generator
        model = ExportedModel({str(exported)!r})
        result = Generator(model).generate([5, 6, 7], max_new_tokens=5)
        assert len(result.token_ids) == 5, result
        print("ok")
    """)
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip().endswith("ok")


# What only the export extra installs (pyproject.toml), and the plot extra's matplotlib.
NOT_IN_THE_BASE_INSTALL = ("torch", "transformers", "onnx", "gguf", "sentencepiece", "matplotlib")


def _without_extras(code: str) -> subprocess.CompletedProcess:
    """Run `code` in a fresh interpreter where nothing of the extras can be imported, as in a base install."""
    block = f"import sys\nfor name in {NOT_IN_THE_BASE_INSTALL!r}:\n    sys.modules[name] = None\n"
    return subprocess.run([sys.executable, "-c", block + textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=120)


def test_the_base_install_chats_with_an_export(chat_model):
    run = _without_extras(f"""
        from ondevice_llama.cli.main import main
        sys.exit(main(["chat", "--model", {str(chat_model.folder)!r}, "--prompt", "hi", "--max-new-tokens", "4"]))
    """)
    assert run.returncode == 0, run.stderr
    assert "TTFT" in run.stderr.strip().splitlines()[-1]


def test_a_command_whose_extra_is_missing_says_which_to_install(tiny_checkpoints, tmp_path):
    run = _without_extras(f"""
        from ondevice_llama.cli.main import main
        sys.exit(main(["export", "--checkpoint", {str(tiny_checkpoints["gqa_tied"])!r}, "--out",
                       {str(tmp_path / "out")!r}, "--quiet"]))
    """)
    assert run.returncode == 2, run.stderr
    assert run.stderr.strip() == 'error: export: needs the export extra: pip install -e ".[export]"'


def test_export_and_quantization_do_not_import_the_runtime():
    """File formats (manifest, attention sink, chat format) sit a floor below the runtime, so building an
    export loads neither the runtime nor onnxruntime and jinja2."""
    code = ("import sys, ondevice_llama.export, ondevice_llama.quantization.pipeline; "
            "loaded = [m for m in ('onnxruntime', 'jinja2', 'ondevice_llama.runtime') if m in sys.modules]; "
            "sys.exit(str(loaded) if loaded else 0)")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr


def test_greedy_generation_matches_reference(tiny_checkpoints, model):
    prompt = list(range(10, 31))  # 21 tokens: chunks of 8, 8 and a padded 5
    result = Generator(model).generate(prompt, max_new_tokens=12)
    assert result.token_ids == reference_greedy(tiny_checkpoints["gqa_tied"], prompt, 12)
    assert result.stop_reason == "max_new_tokens"
    assert result.ttft_s > 0 and result.decode_tokens_per_s > 0


def test_stops_on_end_of_turn_id(model):
    free = Generator(model).generate(list(range(5, 15)), max_new_tokens=10)
    stop = free.token_ids[3]
    stopped = Generator(model).generate(list(range(5, 15)), max_new_tokens=10, stop_ids=(stop,))
    assert stopped.stop_reason == "eos"
    assert stopped.token_ids == free.token_ids[:free.token_ids.index(stop)]


def test_context_full_ends_the_reply_or_slides(model):
    prompt = list(range(30, 60))
    full = Generator(model).generate(prompt, max_new_tokens=100)
    assert full.stop_reason == "context_full"
    assert len(prompt) + len(full.token_ids) == C + 1  # the token sampled from position C-1 is still emitted
    slid = Generator(model).generate(prompt, max_new_tokens=25, slide=True)
    assert slid.stop_reason == "max_new_tokens" and len(slid.token_ids) == 25
    assert slid.token_ids[:len(full.token_ids)] == full.token_ids  # sliding starts only at the limit
    with pytest.raises(ContextFullError, match="context length"):
        Generator(model).generate(list(range(C)), max_new_tokens=1)


def test_second_turn_reuses_cache_and_matches_fresh_prefill(chat_model):
    """Prefix reuse across turns must give exactly what a fresh prefill of the whole conversation gives."""
    model = chat_model
    session = ChatSession(model, system="be brief")
    session.send("hello", max_new_tokens=4)
    second = session.send("more", max_new_tokens=4)
    fresh = Generator(model).generate(_prompt_before_last(session),
                                      max_new_tokens=4, stop_ids=model.manifest.special_tokens.eos_ids)
    assert second.token_ids == fresh.token_ids


def _prompt_before_last(session: ChatSession) -> list[int]:
    """The prompt the second turn was generated from: the conversation without its last answer."""
    last = session.messages.pop()
    try:
        return session.prompt_ids()
    finally:
        session.messages.append(last)


def test_sampling():
    logits = np.array([1.0, 3.0, 2.0, -1.0], np.float32)
    assert Sampler(SamplingConfig())(logits) == 1
    assert Sampler(SamplingConfig(temperature=5.0, top_k=1, seed=0))(logits) == 1
    assert Sampler(SamplingConfig(temperature=1.0, top_p=0.01, seed=0))(logits) == 1
    draws = [Sampler(SamplingConfig(temperature=1.0, top_k=2, seed=s))(logits) for s in range(200)]
    assert set(draws) == {1, 2}  # top-k=2 never picks the others
    assert draws.count(1) > draws.count(2)
    first = [Sampler(SamplingConfig(temperature=1.0, seed=7))(logits) for _ in range(5)]
    assert first == [Sampler(SamplingConfig(temperature=1.0, seed=7))(logits) for _ in range(5)]
    with pytest.raises(ValueError):
        SamplingConfig(top_p=0)


@pytest.mark.parametrize("source", ["byte_level", "llama2"])
def test_detokenizer_streams_whole_characters(tiny_checkpoints, source):
    """Streamed chunks concatenate to the full decode and never end inside a multi-byte character."""
    if source == "byte_level":
        tokenizer = open_checkpoint(tiny_checkpoints["gqa_tied"]).tokenizer
    else:
        path = SHARED / "data/llama2-tokenizer"
        if not (path / "tokenizer.model").exists():
            pytest.skip(f"{path} is missing")
        tokenizer = tokenizer_from_hf_folder(path)[0]
    text = "Hello wonderful 世界 😀 and café — fine"
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    detok = IncrementalDetokenizer(tokenizer)
    chunks = [detok.add(i) for i in ids] + [detok.flush()]
    assert "".join(chunks) == tokenizer.decode(ids)
    assert not any("\ufffd" in chunk for chunk in chunks)


def test_cli_chat_one_shot(chat_model, capsys):
    assert main(["chat", "--model", str(chat_model.folder), "--prompt", "hi", "--max-new-tokens", "6"]) == 0
    captured = capsys.readouterr()
    expected = ChatSession(chat_model).send("hi", max_new_tokens=6)
    assert captured.out == expected.text + "\n"  # the streamed reply, then the timing line on stderr
    timing = captured.err.strip().splitlines()[-1]
    assert "TTFT" in timing and "tokens/s" in timing


def test_cli_chat_rejects_a_folder_that_is_not_an_export(tmp_path, capsys):
    assert main(["chat", "--model", str(tmp_path), "--prompt", "hi"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and str(tmp_path) in err[0]
