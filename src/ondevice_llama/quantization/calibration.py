"""Calibration text: the built-in set, text the model generates, text files, and packing them into rows.

The built-in set has two parts:

- hand-written chat turns (rendered with the model's own chat template, so the special tokens and
  formatting a deployed model sees are covered) and plain prose, code and lists;
- text the float model writes itself (data-free, as in LLM-QAT): from each of `SEED_PROMPTS` (chat
  questions in the chat template, and openings of prose, code, lists, letters, dialogue, other languages)
  it continues with seeded sampling. GPTQ needs many more positions than a layer has inputs (1,536 for the
  default model's down_proj); a few hand-written paragraphs overfit it. The text is generated once per
  model and cached under `~/.cache/ondevice-llama/calibration` ($ONDEVICE_LLAMA_CACHE moves it), keyed by
  the model's name, configuration and weights and the generation settings (`files.cache_key`, the one rule).
"""

from __future__ import annotations

import hashlib
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ..chat_format import encode_text, format_chat
from ..files import cache_path
from ..loading import Checkpoint

CHATS: tuple[tuple[str, str], ...] = (
    ("What is the capital of France?", "The capital of France is Paris."),
    ("Explain photosynthesis in two sentences.",
     "Plants use sunlight to turn water and carbon dioxide into sugar. Oxygen is released as a by-product."),
    ("Write a haiku about autumn rain.",
     "Cold rain on red leaves,\nthe gutter hums a low tune,\nnight comes early now."),
    ("How do I reverse a list in Python?", "Use `items.reverse()` to reverse in place, or `items[::-1]` for a copy."),
    ("Give me three tips for better sleep.",
     "1. Keep a regular schedule.\n2. Avoid screens an hour before bed.\n3. Keep the bedroom cool and dark."),
    ("What is 17 times 23?", "17 times 23 is 391."),
    ("Translate 'good morning' into Spanish and German.", "Spanish: buenos días. German: guten Morgen."),
    ("Summarize the plot of Romeo and Juliet.",
     "Two young lovers from feuding families in Verona marry in secret; a chain of misunderstandings ends "
     "with both taking their own lives, which finally reconciles their families."),
    ("Can you recommend a vegetarian dinner?",
     "Try a chickpea and spinach curry with rice: quick, filling and full of protein."),
    ("Why is the sky blue?",
     "Air molecules scatter short blue wavelengths of sunlight much more than red ones, so blue light "
     "reaches our eyes from every direction of the sky."),
)
TEXTS: tuple[str, ...] = (
    "The river winds through the valley for nearly two hundred kilometres before it reaches the sea. In the "
    "nineteenth century its banks were lined with mills, and the town at its mouth grew rich on trade in "
    "wool, timber and salt. Today most of the mills are museums or apartments.",
    "def fibonacci(n: int) -> list[int]:\n    values = [0, 1]\n    while len(values) < n:\n"
    "        values.append(values[-1] + values[-2])\n    return values[:n]\n\nprint(fibonacci(10))\n",
    "Ingredients: 200 g flour, 2 eggs, 300 ml milk, a pinch of salt, butter for the pan. Whisk the eggs "
    "and milk, add the flour and salt, rest the batter for 30 minutes, then cook thin pancakes.",
    "Quarterly revenue rose 12% to $4.8 billion, while operating costs fell 3%. The board approved a "
    "dividend of $0.45 per share, payable on March 15, 2024.",
    "= Solar System =\n\nThe Solar System consists of the Sun and the objects that orbit it: eight planets, "
    "their moons, dwarf planets such as Pluto, and countless asteroids and comets.",
    "Dear team,\n\nThank you all for your hard work this month. The release is scheduled for Friday; please "
    "finish your reviews by Wednesday evening.\n\nBest regards,\nMaria",
)


SEED_PROMPTS: tuple[tuple[str, str], ...] = (  # ("chat", user message) or ("text", opening to continue)
    ("chat", "What causes the seasons on Earth?"),
    ("chat", "Write a short story about a lighthouse keeper who finds a message in a bottle."),
    ("chat", "How does a hash table work? Give an example in Python."),
    ("chat", "What are the main differences between the Roman Republic and the Roman Empire?"),
    ("chat", "Give me a weekly workout plan for a beginner."),
    ("chat", "Explain the difference between weather and climate to a ten-year-old."),
    ("chat", "Write a polite email asking my landlord to fix the heating."),
    ("chat", "What is the derivative of x^3 + 2x^2 - 5x + 1? Show the steps."),
    ("chat", "Summarize the causes of the First World War."),
    ("chat", "Write a SQL query that finds the ten customers with the highest total orders."),
    ("chat", "What should I pack for a week of hiking in the mountains?"),
    ("chat", "Describe how vaccines train the immune system."),
    ("chat", "Compose a poem about the sea at night."),
    ("chat", "What are some good habits for learning a new language?"),
    ("chat", "Explain recursion and give a JavaScript example."),
    ("chat", "Who was Marie Curie and what did she discover?"),
    ("chat", "How do I make fresh pasta at home?"),
    ("chat", "Compare electric cars and petrol cars in a table."),
    ("chat", "What is inflation and why do central banks raise interest rates?"),
    ("chat", "Plan a three-day trip to Kyoto."),
    ("chat", "Explain what a neural network is, step by step."),
    ("chat", "Quelle est la différence entre un virus et une bactérie ?"),
    ("chat", "¿Cuáles son los planetas del sistema solar?"),
    ("chat", "Fix this code: for i in range(10) print(i)"),
    ("text", "The history of the city begins in the"),
    ("text", "In 1887, the young engineer"),
    ("text", "= Battle of the River Plate =\n\nThe Battle of the River Plate was"),
    ("text", "Abstract. We study the problem of"),
    ("text", "Chapter 1\n\nThe rain had not stopped for three days when"),
    ("text", "import numpy as np\n\n\ndef moving_average(values, window):\n"),
    ("text", "#include <stdio.h>\n\nint main(int argc, char **argv) {\n"),
    ("text", "Breaking news: officials confirmed on Tuesday that"),
    ("text", "The species is found mainly in the tropical forests of"),
    ("text", "Step 1: Preheat the oven to 180 degrees."),
    ("text", "Q: How many moons does Jupiter have?\nA:"),
    ("text", "Dear Sir or Madam,\n\nI am writing to"),
    ("text", "The album was released in 1994 and reached number"),
    ("text", "Theorem 2. Let G be a finite group and"),
    ("text", "| Country | Capital | Population |\n|---|---|---|\n"),
    ("text", "Der Zug fuhr langsam in den Bahnhof ein, und"),
    ("text", "The match ended 2-1 after a late goal from"),
    ("text", "Customer review: I bought this blender last month and"),
    ("text", "The mitochondria is an organelle that"),
    ("text", "<html>\n<head>\n  <title>"),
    ("text", "JOHN: Where were you last night?\nMARY:"),
    ("text", "Section 3.2 of the agreement states that"),
    ("text", "Top 10 tips for saving money:\n1."),
    ("text", "On a cold morning in January, the village"),
)
GENERATION_VERSION = 1


@dataclass(frozen=True)
class Generation:
    """How the model's own calibration text is sampled: `length` tokens per seed prompt (prompt included).

    48 prompts x 256 tokens = 12,288 tokens, several times the largest layer input of the default model (1,536),
    while a calibration pass over all of them stays cheap. Sampling is the same step by step whatever the
    length, so a longer generation starts with exactly the tokens of a shorter one.
    """

    length: int = 256
    temperature: float = 1.0
    top_k: int = 50
    seed: int = 0
    batch: int = 48


def generated_cache_path(checkpoint: Checkpoint, settings: Generation) -> Path:
    """Where the text `checkpoint` generated with `settings` is cached: keyed by the config, the seed prompts,
    the settings and two of the model's tensors (the first and the last), which tell its weights apart."""
    weights = hashlib.sha256()
    for name in ("embed_tokens", f"layers.{checkpoint.config.num_layers - 1}.down_proj"):
        weights.update(np.ascontiguousarray(checkpoint.tensors.get(name)).tobytes())
    return cache_path("calibration", checkpoint.name, checkpoint.config.to_dict(), SEED_PROMPTS, vars(settings),
                      GENERATION_VERSION, weights.hexdigest(), suffix=".npy")


def seed_prompt_ids(checkpoint: Checkpoint) -> list[list[int]]:
    tok, special, template = checkpoint.tokenizer, checkpoint.special_tokens, checkpoint.chat_template
    prompts = []
    for kind, text in SEED_PROMPTS:
        if kind == "chat":
            prompts.append(format_chat(tok, [{"role": "user", "content": text}], special, template))
        else:
            prompts.append(encode_text(tok, text, special))
    return prompts


def generate_sequences(checkpoint: Checkpoint, settings: Generation = Generation(), progress: bool = True
                       ) -> list[list[int]]:
    """Each seed prompt continued by the float model to `settings.length` tokens (seeded top-k sampling)."""
    from ..model import load_reference

    prompts = [p[:settings.length] for p in seed_prompt_ids(checkpoint)]
    model = load_reference(checkpoint, torch.float32)
    generator = torch.Generator().manual_seed(settings.seed)
    sequences = []
    batches = range(0, len(prompts), settings.batch)
    bar = tqdm(total=len(batches) * (settings.length - 1), desc="calibration text", unit="step",
               disable=not progress, dynamic_ncols=True)
    for first in batches:
        group = prompts[first:first + settings.batch]
        model.setup_cache(settings.length, batch=len(group), sliced=True)
        tokens = torch.zeros(len(group), settings.length, dtype=torch.long)
        in_prompt = torch.zeros(len(group), settings.length, dtype=torch.bool)
        for row, prompt in enumerate(group):
            tokens[row, :len(prompt)] = torch.tensor(prompt)
            in_prompt[row, :len(prompt)] = True
        # One token per step for every row; rows still inside their prompt take the prompt's next token.
        for t in range(settings.length - 1):
            with torch.no_grad():
                logits = model(tokens[:, t:t + 1], torch.tensor([t]))[:, 0].double() / settings.temperature
            top = torch.topk(logits, settings.top_k, dim=-1)
            pick = torch.multinomial(torch.softmax(top.values, dim=-1), 1, generator=generator)
            sampled = top.indices.gather(1, pick)[:, 0]
            tokens[:, t + 1] = torch.where(in_prompt[:, t + 1], tokens[:, t + 1], sampled)
            bar.update()
        sequences += tokens.tolist()
    bar.close()
    return sequences


def generated_sequences(checkpoint: Checkpoint, settings: Generation = Generation(), cache: bool = True,
                        progress: bool = True) -> list[list[int]]:
    """`generate_sequences`, read from the cache when this model already generated them."""
    path = generated_cache_path(checkpoint, settings)
    if cache and path.exists():
        return np.load(path).tolist()
    if progress:
        print(f"generating calibration text with {checkpoint.name} ({len(SEED_PROMPTS)} x {settings.length} "
              f"tokens, once; cached in {path.parent})", file=sys.stderr)
    sequences = generate_sequences(checkpoint, settings, progress)
    if cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".npy", delete=False) as f:
            np.save(f, np.asarray(sequences, np.int32))
        os.chmod(f.name, 0o644)  # NamedTemporaryFile makes it private
        os.replace(f.name, path)
    return sequences


def handwritten_sequences(checkpoint: Checkpoint) -> list[list[int]]:
    """Token ids of the hand-written calibration chats and texts."""
    tok, special, template = checkpoint.tokenizer, checkpoint.special_tokens, checkpoint.chat_template
    sequences = []
    for i, (user, assistant) in enumerate(CHATS):
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
        if i % 3 == 0:
            messages.insert(0, {"role": "system", "content": "You are a concise, helpful assistant."})
        sequences.append(format_chat(tok, messages, special, template, add_generation_prompt=False))
    sequences += [tok.encode(text, add_special_tokens=False).ids for text in TEXTS]
    return sequences


def builtin_sequences(checkpoint: Checkpoint, generated: bool = True, progress: bool = True) -> list[list[int]]:
    """Token ids of the built-in calibration set: the hand-written set, then the model's own text."""
    sequences = handwritten_sequences(checkpoint)
    if generated:
        sequences += generated_sequences(checkpoint, progress=progress)
    return sequences


def file_sequences(checkpoint: Checkpoint, path: Path, length: int, count: int) -> list[list[int]]:
    """Consecutive `length`-token pieces of a text file."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: cannot read calibration text ({e})") from None
    ids = checkpoint.tokenizer.encode(text, add_special_tokens=False).ids
    if len(ids) < length:
        raise ValueError(f"{path}: {len(ids)} tokens, fewer than one calibration sequence of {length}")
    return [ids[i:i + length] for i in range(0, len(ids) - length + 1, length)][:count]


def pack_sequences(sequences: list[list[int]], length: int, first_token: int | None = None) -> torch.Tensor:
    """Concatenate and cut into equal rows of `length` tokens, so calibration runs as one batch.

    With `first_token` (an attention sink), every row starts with it, as every sequence does in use.
    """
    flat = [t for s in sequences for t in s]
    if first_token is None:
        rows = max(1, len(flat) // length)
        flat = (flat * (rows * length // max(len(flat), 1) + 1))[:rows * length]
        return torch.tensor(flat, dtype=torch.long).view(rows, length)
    packed, i = [], 0
    while i < len(flat) or not packed:
        i += i < len(flat) and flat[i] == first_token  # a text that starts with it: not twice in a row
        body = flat[i:i + length - 1]
        i += length - 1
        if len(body) < length - 1 and packed:
            break
        packed.append([first_token, *(body * length)[:length - 1]])
    return torch.tensor(packed, dtype=torch.long)
