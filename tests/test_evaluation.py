"""Evaluation: metrics on hand-computed cases, exact window aggregation, and exported == float end to end."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys

import numpy as np
import pytest

from ondevice_llama.cli.main import main
from ondevice_llama.config import LlamaConfig
from ondevice_llama.evaluation import evaluate, exported_logits, float_logits, load_text_tokens
from ondevice_llama.evaluation.evaluate import split_windows
from ondevice_llama.evaluation.metrics import (
    kl_per_position,
    kl_sum,
    log_softmax,
    nll_sum,
    perplexity,
    top1_matches,
    window_sums,
)
from ondevice_llama.export import ExportOptions, export_model
from ondevice_llama.loading import open_checkpoint
from ondevice_llama.loading.synthetic import write_synthetic_checkpoint

TINY = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4, num_kv_heads=2)
TEXT = ("The tower is 324 metres tall, about the same height as an 81-storey building, and the tallest "
        "structure in Paris. Its base is square, measuring 125 metres on each side. During its construction, "
        "the Eiffel Tower surpassed the Washington Monument to become the tallest man-made structure.\n")
WINDOW = 40  # not a multiple of the prompt processor's 16: the last chunk of each window is padded


# ---------------------------------------------------------------- metrics


def test_log_softmax_is_stable_and_normalized():
    logits = np.array([[1000.0, 0.0, -1000.0], [1.0, 2.0, 3.0]], np.float32)
    logp = log_softmax(logits)
    assert np.isfinite(logp[:, :2]).all()
    np.testing.assert_allclose(np.exp(logp).sum(-1), 1.0, rtol=1e-12)
    np.testing.assert_allclose(logp[1], np.array([1.0, 2.0, 3.0]) - np.log(np.exp([1.0, 2.0, 3.0]).sum()))


def test_uniform_logits_give_the_vocabulary_size_as_perplexity():
    vocab, n = 7, 5
    total = nll_sum(np.zeros((n, vocab), np.float32), np.arange(n))
    assert total == pytest.approx(n * math.log(vocab))
    assert perplexity(total, n) == pytest.approx(vocab)


def test_nll_of_a_known_distribution():
    logits = np.log(np.array([[1.0, 3.0], [1.0, 3.0]]))  # p = (0.25, 0.75)
    assert nll_sum(logits, np.array([1, 0])) == pytest.approx(-math.log(0.75) - math.log(0.25))


def test_identical_logits_have_zero_kl_and_full_agreement():
    logits = np.random.default_rng(0).normal(size=(6, 11)).astype(np.float32) * 5
    assert kl_sum(logits, logits.copy()) == 0.0
    assert top1_matches(logits, logits.copy()) == 6
    sums = window_sums(logits, np.arange(6), reference_logits=logits)
    assert sums.mean_kl == 0.0 and sums.top1_agreement == 1.0


def test_kl_of_two_known_distributions():
    reference = np.log(np.array([[3.0, 1.0]]))  # p = (0.75, 0.25)
    other = np.log(np.array([[1.0, 3.0]]))  # q = (0.25, 0.75)
    expected = 0.75 * math.log(0.75 / 0.25) + 0.25 * math.log(0.25 / 0.75)  # = 0.5 ln 3
    assert kl_per_position(reference, other)[0] == pytest.approx(expected, rel=1e-12)
    assert kl_sum(reference + 1000.0, other - 1000.0) == pytest.approx(expected, rel=1e-9)  # shift-invariant
    assert top1_matches(reference, other) == 0
    two = np.concatenate([reference, reference])
    assert kl_sum(two, np.concatenate([other, reference])) == pytest.approx(expected)  # second position: 0


# ---------------------------------------------------------------- windows


def table_source(table: np.ndarray):
    """A fake model whose logits at a position depend on that position's token only."""
    return lambda ids: table[np.asarray(ids)]


def test_split_windows_drops_a_last_window_too_short_to_score():
    assert [len(w) for w in split_windows(list(range(10)), 3)] == [3, 3, 3]
    assert [len(w) for w in split_windows(list(range(11)), 3)] == [3, 3, 3, 2]
    with pytest.raises(ValueError):
        split_windows(list(range(10)), 1)


def test_window_aggregation_equals_one_shot_computation():
    rng = np.random.default_rng(1)
    vocab, window = 13, 5
    tokens = rng.integers(0, vocab, 23).tolist()  # windows 5, 5, 5, 5, 3
    ref_table = rng.normal(size=(vocab, vocab)).astype(np.float32)
    other_table = (ref_table + 0.5 * rng.normal(size=(vocab, vocab))).astype(np.float32)
    report = evaluate({"float": table_source(ref_table), "other": table_source(other_table)}, tokens, window,
                      progress=False)
    # One shot: every (position, next token) pair that stays inside a window.
    pairs = [i for i in range(len(tokens) - 1) if (i + 1) % window != 0]
    inputs, targets = np.array(tokens)[pairs], np.array(tokens)[[i + 1 for i in pairs]]
    assert report.tokens == 23 and report.windows == 5 and report.positions == len(pairs) == 18
    for name, table in (("float", ref_table), ("other", other_table)):
        assert report.sources[name].perplexity == pytest.approx(perplexity(nll_sum(table[inputs], targets),
                                                                           len(pairs)), rel=1e-12)
        assert report.sources[name].positions == len(pairs)
    other = report.sources["other"]
    assert other.kl_to_reference == pytest.approx(kl_sum(ref_table[inputs], other_table[inputs]) / len(pairs))
    assert other.top1_agreement == top1_matches(ref_table[inputs], other_table[inputs]) / len(pairs)
    assert report.sources["float"].kl_to_reference is None
    assert "other" in report.table() and json.loads(json.dumps(report.to_dict()))["positions"] == 18


def test_evaluate_without_reference_and_bad_reference():
    table = np.zeros((5, 5), np.float32)
    report = evaluate({"only": table_source(table)}, [0, 1, 2, 3], 4, reference=None, progress=False)
    assert report.sources["only"].perplexity == pytest.approx(5.0)
    assert report.sources["only"].top1_agreement is None
    with pytest.raises(ValueError, match="reference"):
        evaluate({"only": table_source(table)}, [0, 1, 2, 3], 4, progress=False)


# ---------------------------------------------------------------- text


def test_text_errors_name_the_file(tmp_path):
    from tokenizers import Tokenizer, models

    tokenizer = Tokenizer(models.BPE())
    for name, content, problem in (("missing.txt", None, "no such"), ("latin1.txt", b"caf\xe9", "UTF-8"),
                                   ("empty.txt", b"\n  \n", "empty")):
        path = tmp_path / name
        if content is not None:
            path.write_bytes(content)
        with pytest.raises(ValueError, match=problem) as error:
            load_text_tokens(path, tokenizer, 100)
        assert str(path) in str(error.value) and "\n" not in str(error.value)


# ---------------------------------------------------------------- end to end on a tiny model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluation")
    ck = write_synthetic_checkpoint(TINY, root / "ck")
    checkpoint = open_checkpoint(ck)
    npu = ExportOptions(sequence_length=16, context_length=64, all_logits=True, precision="fp32")
    cpu = ExportOptions(target="cpu", precision="fp32", context_length=64, all_logits=True)
    export_model(checkpoint, root / "npu", npu, progress=False)
    export_model(checkpoint, root / "cpu", cpu, progress=False)
    text = root / "text.txt"
    text.write_text(TEXT, encoding="utf-8")
    return {"root": root, "ck": ck, "checkpoint": checkpoint, "npu": root / "npu", "cpu": root / "cpu", "text": text}


@pytest.mark.parametrize("target", ["npu", "cpu"])
def test_exported_matches_float(tiny, target):
    tokens = load_text_tokens(tiny["text"], tiny["checkpoint"].tokenizer, 150)
    assert len(tokens) == 150
    sources = {"float": float_logits(tiny["checkpoint"]), "exported": exported_logits(tiny[target])}
    report = evaluate(sources, tokens, WINDOW, progress=False)
    assert (report.windows, report.positions) == (4, 146)
    exported, reference = report.sources["exported"], report.sources["float"]
    assert exported.kl_to_reference < 1e-6
    assert exported.top1_agreement == 1.0
    assert exported.perplexity == pytest.approx(reference.perplexity, rel=1e-4)


def test_cli_on_an_export_writes_the_json(tiny, tmp_path, capsys):
    out = tmp_path / "eval.json"
    args = ["evaluate", "--model", str(tiny["npu"]), "--text", str(tiny["text"]), "--context-length", "1000",
            "--max-tokens", "150", "--json", str(out), "--quiet"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "150 tokens in 3 window(s) of 64 tokens" in printed and "exported" in printed
    data = json.loads(out.read_text())
    assert data["window"] == data["context_length"] == 64  # capped at the export's context length
    assert data["tokens"] == 150 and data["text"] == str(tiny["text"]) and data["model"] == str(tiny["npu"])
    assert data["reference"] == "float" and "date" in data
    assert data["sources"]["exported"]["top1_agreement"] == 1.0


def test_cli_on_a_checkpoint_gives_float_alone(tiny, tmp_path):
    out = tmp_path / "eval.json"
    assert main(["evaluate", "--model", str(tiny["ck"]), "--text", str(tiny["text"]), "--context-length", "32",
                 "--max-tokens", "100", "--json", str(out), "--quiet"]) == 0
    data = json.loads(out.read_text())
    assert list(data["sources"]) == ["float"] and data["reference"] is None and data["window"] == 32
    assert data["kind"] == "checkpoint" and data["sources"]["float"]["perplexity"] > 1


def test_cli_without_float_or_with_its_checkpoint_gone(tiny, tmp_path, capsys):
    out = tmp_path / "eval.json"
    base = ["evaluate", "--text", str(tiny["text"]), "--max-tokens", "60", "--json", str(out), "--quiet"]
    assert main(base + ["--model", str(tiny["cpu"]), "--no-float"]) == 0
    assert list(json.loads(out.read_text())["sources"]) == ["exported"]
    moved = tmp_path / "moved"
    shutil.copytree(tiny["cpu"], moved)
    manifest = json.loads((moved / "manifest.json").read_text())
    manifest["source"] = str(tmp_path / "gone")
    (moved / "manifest.json").write_text(json.dumps(manifest))
    capsys.readouterr()
    assert main(base + ["--model", str(moved)]) == 0
    assert "gone" in capsys.readouterr().err
    assert list(json.loads(out.read_text())["sources"]) == ["exported"]


def test_cli_missing_text_is_one_error_line(tiny, tmp_path, capsys):
    missing = tmp_path / "nope.txt"
    assert main(["evaluate", "--model", str(tiny["npu"]), "--text", str(missing), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and str(missing) in err[0]


def test_cli_export_without_all_logits_says_how_to_re_export(tiny, tmp_path, capsys):
    folder = tmp_path / "last_only"
    export_model(tiny["checkpoint"], folder, ExportOptions(target="cpu", precision="fp32", context_length=64),
                 progress=False)
    assert main(["evaluate", "--model", str(folder), "--text", str(tiny["text"]), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and str(folder) in err[0]
    assert "export" in err[0] and "--all-logits" in err[0]


def test_exported_source_does_not_import_torch(tiny):
    code = ("import sys; from ondevice_llama.evaluation import exported_logits; "
            f"fn = exported_logits({str(tiny['npu'])!r}); assert fn([1, 2, 3]).shape == (3, 300); "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)
