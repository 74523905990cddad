"""The interactive chat: a conversation that outgrows the context is explained (/reset, --slide) instead of ending
the session, and Ctrl-C during a reply stops that reply only."""

from __future__ import annotations

from pathlib import Path

import pytest

from ondevice_llama.cli import main as cli
from ondevice_llama.config import LlamaConfig
from ondevice_llama.export import ExportOptions, export_model
from ondevice_llama.loading import open_checkpoint
from ondevice_llama.loading.synthetic import write_synthetic_checkpoint

CONFIG = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                     num_kv_heads=2, tie_word_embeddings=True, max_position_embeddings=256)
CONTEXT = 48


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("repl")
    checkpoint = open_checkpoint(write_synthetic_checkpoint(CONFIG, root / "tiny", seed=3))
    out = root / "export"
    export_model(checkpoint, out, ExportOptions(target="cpu", precision="fp32", context_length=CONTEXT),
                 progress=False)
    return out


def repl(monkeypatch, capsys, folder: Path, lines: list[str], *options: str) -> tuple[int, str, str]:
    """Run `chat --model folder` with `lines` typed in, then Ctrl-D."""
    typed = iter(lines)

    def fake_input(prompt: str = "") -> str:
        try:
            return next(typed)
        except StopIteration:
            raise EOFError from None

    monkeypatch.setattr("builtins.input", fake_input)
    capsys.readouterr()
    code = cli.main(["chat", "--model", str(folder), "--max-new-tokens", "3", *options])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_shot(capsys, folder: Path, prompt: str) -> str:
    capsys.readouterr()
    assert cli.main(["chat", "--model", str(folder), "--max-new-tokens", "3", "--prompt", prompt]) == 0
    return capsys.readouterr().out


def test_a_prompt_beyond_the_context_explains_reset_and_slide(exported, monkeypatch, capsys):
    code, out, err = repl(monkeypatch, capsys, exported, ["word " * 60, "hi"])
    assert code == 0, err
    assert "/reset" in err and "--slide" in err and "the context length is 48" in err
    assert "Traceback" not in err and "error:" not in err
    assert err.count("stop: ") == 1  # the session went on and answered "hi"
    assert out.endswith(one_shot(capsys, exported, "hi"))  # as if the long turn had never been sent


def test_a_full_context_then_reset_starts_over(exported, monkeypatch, capsys):
    lines = ["tell me everything", "/reset", "hi"]
    code, out, err = repl(monkeypatch, capsys, exported, lines, "--max-new-tokens", "100")
    assert code == 0, err
    assert "the reply was cut" in err and "/reset starts a new one" in err  # the first reply filled the context
    assert err.count("stop: ") == 2


def test_ctrl_c_stops_the_reply_not_the_chat(exported, monkeypatch, capsys):
    real_stream, calls = cli._stream, []

    def interrupted_once(text: str) -> None:
        calls.append(text)
        if len(calls) == 1:
            raise KeyboardInterrupt
        real_stream(text)

    monkeypatch.setattr(cli, "_stream", interrupted_once)
    code, out, err = repl(monkeypatch, capsys, exported, ["hello", "hello again"])
    assert code == 0, err
    assert "[reply stopped; that turn is left out of the conversation]" in err
    assert err.count("stop: ") == 1
    monkeypatch.setattr(cli, "_stream", real_stream)
    assert out.strip().endswith(one_shot(capsys, exported, "hello again").strip())
