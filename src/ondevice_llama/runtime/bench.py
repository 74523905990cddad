"""Speed of an exported model: time to first token, prefill and decode speed, per-part latency.

Figures follow llama-bench where it has one: pp512 = 512 / time of one 512-token prefill; tg128 = 128 / time
of 128 decode steps from an empty context. Besides those: TTFT (prefill from an empty cache plus the first
greedy token) per prompt length, decode tokens/s after a 128-token prompt, and how long each part's ONNX
Runtime session runs within one decode step and one 128-token prefill (the rest of a step is host work).
Every figure is the median of several repetitions after one warm-up, with min-max and quartiles beside it.

Measurement only (`measure` takes the samples, `summarize` makes the JSON report); the table and the plot
are `ondevice-llama bench`'s (ondevice_llama.cli.bench). Only the standard library is imported at module
level; numpy, onnxruntime and tqdm inside functions, and never torch. `median_spread`, `machine_info`,
`draw_tokens`, `special_ids`, `peak_rss_gb` and `Runner` are shared with benchmarks/.
"""

from __future__ import annotations

import os
import platform
import statistics
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

DEFAULT_PROMPT_LENGTHS = (128, 512, 1024)
DECODE_PROMPT = 128  # decode speed is measured after a prompt this long
DECODE_STEPS = 128  # ... over this many steps (llama-bench's tg128)
PP_LENGTH = 512  # llama-bench's pp512
PART_PREFILL = 128  # per-part latency: one prefill this long ...
PART_DECODE_STEPS = 8  # ... then this many decode steps, each timed


# ---------------------------------------------------------------- shared helpers


def median_spread(values: Sequence[float]) -> dict[str, float]:
    """Median, min, max and quartiles (q1, q3) of repeated measurements; `n` is how many."""
    if not values:
        raise ValueError("median_spread needs at least one value")
    v = sorted(float(x) for x in values)
    q1, q3 = (statistics.quantiles(v, n=4, method="inclusive")[i] for i in (0, 2)) if len(v) > 1 else (v[0], v[0])
    return {"median": statistics.median(v), "min": v[0], "max": v[-1], "q1": q1, "q3": q3, "n": len(v)}


def machine_info() -> dict[str, Any]:
    """What the figures were measured on."""
    info: dict[str, Any] = {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                            "processor": platform.processor() or platform.machine(),
                            "python": platform.python_version()}
    try:
        import psutil

        info["physical_cores"] = psutil.cpu_count(logical=False)
        info["memory_gb"] = round(psutil.virtual_memory().total / 2**30, 1)
    except ImportError:
        pass
    info.update(_cpuinfo())
    import numpy
    import onnxruntime

    info["onnxruntime"] = onnxruntime.__version__
    info["numpy"] = numpy.__version__
    return info


def _cpuinfo() -> dict[str, Any]:
    """The CPU's model and its AVX2, AVX-512, AVX-VNNI and AMX flags: ONNX Runtime picks its kernels by them,
    so the same export's speed, and even its near-tie answers, differ between CPUs."""
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())  # the first CPU's; all are alike
    except OSError:
        return {}
    info: dict[str, Any] = {"cpu_model": fields["model name"]} if "model name" in fields else {}
    if "flags" in fields:
        info["cpu_extensions"] = sorted(f for f in fields["flags"].split()
                                        if f.startswith(("avx512", "amx", "avx_vnni")) or f == "avx2")
    return info


def peak_rss_gb() -> float:
    """The process's peak resident set size so far, in GB (2**30 bytes)."""
    from ..memory import peak_rss_bytes

    return peak_rss_bytes() / 2**30


def special_ids(tokenizer, special_tokens=None) -> set[int]:
    """Ids a random prompt should avoid: the tokenizer's special added tokens, BOS and every EOS."""
    ids = {i for i, token in tokenizer.get_added_tokens_decoder().items() if token.special}
    if special_tokens is not None:
        ids.update(special_tokens.eos_ids)
        if special_tokens.bos_id is not None:
            ids.add(special_tokens.bos_id)
    return ids


def draw_tokens(count: int, vocab_size: int, avoid: set[int] | Sequence[int] = (), seed: int = 0) -> list[int]:
    """`count` token ids drawn deterministically from range(vocab_size), none of them in `avoid`."""
    import numpy as np

    candidates = np.setdiff1d(np.arange(vocab_size), np.fromiter(avoid, np.int64, len(avoid)))
    return [int(t) for t in np.random.default_rng(seed).choice(candidates, count)]


# ---------------------------------------------------------------- per-part timing


class PartClock:
    """Seconds spent in each part's session runs since the last reset (summed over chunks), and calls."""

    def __init__(self, parts: int):
        self.seconds = [0.0] * parts
        self.calls = [0] * parts

    def reset(self) -> None:
        self.seconds = [0.0] * len(self.seconds)
        self.calls = [0] * len(self.calls)


class _TimedSession:
    """Stands in for an InferenceSession: times its runs, passes everything else through."""

    METHODS = ("run", "run_with_iobinding")

    def __init__(self, session, part: int, clock: PartClock):
        self._session, self._part, self._clock = session, part, clock

    def __getattr__(self, name: str):
        attr = getattr(self._session, name)
        if name not in self.METHODS:
            return attr

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return attr(*args, **kwargs)
            finally:
                self._clock.seconds[self._part] += time.perf_counter() - start
                self._clock.calls[self._part] += 1

        return timed


@contextmanager
def timed_parts(engine) -> Iterator[PartClock]:
    """Wrap every session of `engine` (a list per graph kind, one session per part) in a timing proxy for the
    duration; the engine's code is left as it is."""
    lists = list(engine.sessions.values())
    clock = PartClock(len(lists[0]))
    originals = [list(sessions) for sessions in lists]
    for sessions in lists:
        sessions[:] = [_TimedSession(s, i, clock) for i, s in enumerate(sessions)]
    try:
        yield clock
    finally:
        for sessions, original in zip(lists, originals, strict=True):
            sessions[:] = original


# ---------------------------------------------------------------- measurements


def _argmax(logits) -> int:
    import numpy as np

    return int(np.argmax(logits))


class Runner:
    """One exported model, one cache, one deterministic token stream; each method is one measurement."""

    def __init__(self, model, tokens: list[int]):
        self.model = model
        self.tokens = tokens
        self.cache = model.new_cache()

    def ttft(self, length: int) -> tuple[float, float]:
        """(prefill seconds, TTFT seconds) for `length` tokens from an empty cache."""
        self.model.reset_cache(self.cache)
        start = time.perf_counter()
        logits = self.model.prefill(self.tokens[:length], self.cache)
        prefilled = time.perf_counter()
        _argmax(logits)
        return prefilled - start, time.perf_counter() - start

    def decode(self, prompt: int, steps: int) -> float:
        """Tokens/s of `steps` greedy decode steps after a `prompt`-token prefill (0: from an empty cache)."""
        self.model.reset_cache(self.cache)
        token = self.tokens[0]
        if prompt:
            token = _argmax(self.model.prefill(self.tokens[:prompt], self.cache))
        start = time.perf_counter()
        for _ in range(steps):
            token = _argmax(self.model.decode(token, self.cache))
        return steps / (time.perf_counter() - start)

    def parts(self, prefill: int, steps: int) -> dict[str, list[list[float]]]:
        """Per-part session seconds of one `prefill`-token prefill and of each of `steps` decode steps, with the
        wall time of each call last: {"prefill": [[part1, ..., wall]], "decode": [[part1, ..., wall], ...]}."""
        out: dict[str, list[list[float]]] = {"prefill": [], "decode": []}
        self.model.reset_cache(self.cache)
        with timed_parts(self.model.engine) as clock:
            start = time.perf_counter()
            token = _argmax(self.model.prefill(self.tokens[:prefill], self.cache))
            out["prefill"].append(clock.seconds + [time.perf_counter() - start])
            for _ in range(steps):
                clock.reset()
                start = time.perf_counter()
                token = _argmax(self.model.decode(token, self.cache))
                out["decode"].append(clock.seconds + [time.perf_counter() - start])
        return out


def _plan(context: int, lengths: list[int]) -> tuple[dict[str, Any], list[str]]:
    notes = []
    fit = [n for n in lengths if n <= context]
    for n in lengths:
        if n > context:
            notes.append(f"prompt length {n} skipped: it does not fit the context length {context}")
    measured = sorted(set(fit) | ({PP_LENGTH} if context >= PP_LENGTH else set()))
    if context < PP_LENGTH:
        notes.append(f"pp512 skipped: 512 tokens do not fit the context length {context}")
    steps = min(DECODE_STEPS, context // 2)
    prompt = min(DECODE_PROMPT, context - steps)
    if (steps, prompt) != (DECODE_STEPS, DECODE_PROMPT):
        notes.append(f"decode measured over {steps} steps after {prompt} prompt tokens (context {context})")
    part_prefill = max(1, min(PART_PREFILL, context - PART_DECODE_STEPS - 1))
    return {"lengths": fit, "measured": measured, "steps": steps, "prompt": prompt,
            "tg_steps": min(DECODE_STEPS, context), "part_prefill": part_prefill}, notes


def measure(model, repetitions: int, lengths: list[int], progress: bool = True) -> dict[str, Any]:
    """Run every measurement once to warm up, then `repetitions` times, interleaved; return the raw samples."""
    from tqdm import tqdm

    plan, notes = _plan(model.context_length, lengths)
    vocab = min(model.config.vocab_size, model.tokenizer.get_vocab_size())
    count = max(plan["measured"] + [plan["prompt"], plan["part_prefill"], 1])
    runner = Runner(model, draw_tokens(count, vocab, special_ids(model.tokenizer, model.manifest.special_tokens)))
    raw: dict[str, Any] = {"prefill": {n: [] for n in plan["measured"]}, "ttft": {n: [] for n in plan["measured"]},
                           "decode": [], "tg": [], "parts": []}
    per_rep = len(plan["measured"]) + 3
    with tqdm(total=(repetitions + 1) * per_rep, desc="bench", unit="run", file=sys.stderr,
              disable=not progress, dynamic_ncols=True) as bar:
        for rep in range(repetitions + 1):
            bar.set_description("warm-up" if rep == 0 else f"repetition {rep}/{repetitions}")
            samples: dict[str, Any] = {"prefill": {}, "ttft": {}}
            for n in plan["measured"]:
                samples["prefill"][n], samples["ttft"][n] = runner.ttft(n)
                bar.update(1)
            samples["decode"] = runner.decode(plan["prompt"], plan["steps"])
            bar.update(1)
            samples["tg"] = runner.decode(0, plan["tg_steps"])
            bar.update(1)
            samples["parts"] = runner.parts(plan["part_prefill"], PART_DECODE_STEPS)
            bar.update(1)
            if rep == 0:
                continue
            for n in plan["measured"]:
                raw["prefill"][n].append(samples["prefill"][n])
                raw["ttft"][n].append(samples["ttft"][n])
            raw["decode"].append(samples["decode"])
            raw["tg"].append(samples["tg"])
            raw["parts"].append(samples["parts"])
    return {"plan": plan, "notes": notes, "raw": raw}


def _part_summary(rows: list[list[float]], parts: int) -> dict[str, Any]:
    """Per-part ms, the wall time of the call and the host time outside the sessions (wall - sum of parts)."""
    ms = [[x * 1000 for x in row] for row in rows]
    return {"parts_ms": [median_spread([row[i] for row in ms]) for i in range(parts)],
            "wall_ms": median_spread([row[-1] for row in ms]),
            "host_ms": median_spread([row[-1] - sum(row[:-1]) for row in ms])}


def summarize(model, threads: int | None, repetitions: int, measured: dict[str, Any]) -> dict[str, Any]:
    """The JSON report: medians as the headline figures, each with its spread beside it."""
    plan, raw = measured["plan"], measured["raw"]
    m = model.manifest
    ttft = {n: median_spread(raw["ttft"][n]) for n in plan["lengths"]}
    prefill_rate = {n: median_spread([n / s for s in raw["prefill"][n]]) for n in plan["measured"]}
    decode = median_spread(raw["decode"])
    tg = median_spread(raw["tg"])
    pp = prefill_rate.get(PP_LENGTH)
    parts = len(m.parts)
    part_latency = {
        "decode_step": _part_summary([row for rep in raw["parts"] for row in rep["decode"]], parts),
        "prefill": _part_summary([row for rep in raw["parts"] for row in rep["prefill"]], parts),
        "prefill_tokens": plan["part_prefill"],
        "decode_position": plan["part_prefill"],
    }
    return {
        "model": m.model_name, "target": m.target, "precision": m.precision, "parts": parts,
        "context_length": m.context_length, "sequence_length": m.sequence_length if m.target == "npu" else None,
        "threads": threads, "repetitions": repetitions, "warmup_runs": 1,
        "ttft_s": {str(n): s["median"] for n, s in ttft.items()},
        "ttft_spread_s": {str(n): s for n, s in ttft.items()},
        "prefill_tok_per_s": {str(n): s["median"] for n, s in prefill_rate.items()},
        "prefill_tok_per_s_spread": {str(n): s for n, s in prefill_rate.items()},
        "decode_tok_per_s": decode["median"], "decode_tok_per_s_spread": decode,
        "decode_prompt_tokens": plan["prompt"], "decode_steps": plan["steps"],
        "pp512": pp["median"] if pp else None, "pp512_spread": pp,
        "tg128": tg["median"], "tg128_spread": tg, "tg_steps": plan["tg_steps"],
        "part_latency_ms": part_latency,
        "peak_rss_gb": peak_rss_gb(),
        "machine": machine_info(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "notes": measured["notes"],
    }
