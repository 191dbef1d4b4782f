"""Shared fixtures: the real SmolLM2 tokenizer (with its chat template) and tiny random Llamas."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _unit_tests_fetch_nothing(request, monkeypatch):
    """Only tests marked ``pack`` (integration tests) may build the real probe pack or a built-in task,
    which fetches packages on a fresh machine; a unit test that reaches for them fails here, warm cache
    or not, instead of passing on the developer's machine and failing on a new one."""
    if request.node.get_closest_marker("pack"):
        return

    def refuse(*args, **kwargs):
        raise AssertionError("a unit test reached for the real probe pack or a built-in task: build a fixture "
                             "inside the test, or mark it `pack` (integration)")

    monkeypatch.setattr("tether.data.builtin.pack.ensure_pack", refuse)
    monkeypatch.setattr("tether.data.builtin.pack.build_pack", refuse)
    monkeypatch.setattr("tether.data.builtin.tasks.ensure_task", refuse)
    monkeypatch.setattr("tether.data.builtin.tasks.build_task", refuse)
    monkeypatch.setattr("tether.data.builtin.sources._apt_download", refuse)


@pytest.fixture(scope="session")
def tokenizer():
    """SmolLM2's tokenizer (chat template included), from the embedded package's cached copy."""
    from tether.models import load_tokenizer

    tok = load_tokenizer("smollm2-135m-instruct")
    return tok


def make_tiny_llama(vocab_size: int, *, seed: int = 0, layers: int = 2, hidden: int = 32):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    model = LlamaForCausalLM(cfg).eval()
    return model


@pytest.fixture
def tiny_model(tokenizer):
    """A 2-layer random Llama over SmolLM2's vocabulary, seeded (same weights every call)."""
    return make_tiny_llama(len(tokenizer))


@pytest.fixture(scope="session")
def smollm2():
    """The real embedded model (slow: tests using it are marked ``slow``)."""
    from tether.models import load

    model, tok = load("smollm2-135m-instruct", device="cpu")
    return model, tok


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer):
    """A tiny random Llama saved like a real checkpoint (with SmolLM2's tokenizer), loadable by name."""
    path = tmp_path_factory.mktemp("tiny-llama")
    make_tiny_llama(len(tokenizer)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


TOPICS = ["sports", "cooking", "music"]
WORDS = {"sports": ["goal", "match", "team", "ball", "score"], "cooking": ["oven", "salt", "recipe", "bake", "pan"],
         "music": ["guitar", "song", "melody", "drum", "chord"]}


def write_jsonl(path, rows):
    import json

    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="session")
def tiny_task(tmp_path_factory):
    """A 3-label routing task as prompt/completion JSONL (train 30, eval 9)."""
    d = tmp_path_factory.mktemp("task")
    rows = []
    for i in range(39):
        topic = TOPICS[i % 3]
        w = WORDS[topic]
        rows.append({"prompt": f"Topic of: the {w[i % 5]} and the {w[(i + 2) % 5]} ({i})?", "completion": topic})
    return write_jsonl(d / "train.jsonl", rows[:30]), write_jsonl(d / "eval.jsonl", rows[30:])


@pytest.fixture(scope="session")
def tiny_suite(tmp_path_factory):
    """A small general suite (perplexity, multiple choice, generation, drift) with replay data, as YAML."""
    d = tmp_path_factory.mktemp("suite")
    facts = [("The sky is", ["blue", "green", "loud"], 0), ("Water is", ["wet", "dry", "square"], 0),
             ("Fire is", ["cold", "hot", "slow"], 1), ("Ice is", ["warm", "frozen", "red"], 1)] * 3
    write_jsonl(d / "mc.jsonl", [{"query": f"Q: {q}\nA:", "choices": c, "gold": g} for q, c, g in facts])
    write_jsonl(d / "chat.jsonl", [{"messages": [{"role": "user", "content": f"Say something about {t} {i}."},
                                                 {"role": "assistant", "content": f"{t.title()} is fun number {i}."}]}
                                   for i in range(10) for t in ("cats", "rain")][:16])
    write_jsonl(d / "gen.jsonl", [{"prompt": [{"role": "user", "content": f"What is {i} plus {i}?"}],
                                   "answers": [str(2 * i)]} for i in range(6)])
    write_jsonl(d / "drift.jsonl", [{"prompt": f"Tell me about item {i} in the list."} for i in range(8)])
    write_jsonl(d / "replay.jsonl", [{"messages": [{"role": "user", "content": f"Hello {i}"},
                                                   {"role": "assistant", "content": f"Hi there, friend {i}!"}]}
                                     for i in range(40)])
    (d / "suite.yaml").write_text(
        "name: tiny\n"
        "probes:\n"
        "  - {name: chat_loss, kind: perplexity, data: chat.jsonl, sources: [chitchat]}\n"
        "  - {name: facts_mc, kind: multiple_choice, data: mc.jsonl, sources: [facts]}\n"
        "  - {name: sums_gen, kind: generation, data: gen.jsonl, sources: [sums], options: {max_new_tokens: 4}}\n"
        "  - {name: drift, kind: drift, data: drift.jsonl, sources: [prompts]}\n"
        "replay: {data: replay.jsonl, sources: [chitchat]}\n")
    return d / "suite.yaml"


@pytest.fixture
def two_tasks(tmp_path):
    """Two tiny prompt/completion tasks (colour, size) for sequences: 14 training and 6 held-out rows each."""
    a = [{"prompt": f"Colour of item {i}?", "completion": ["red", "blue"][i % 2]} for i in range(20)]
    b = [{"prompt": f"Size of item {i}?", "completion": ["big", "small"][i % 2]} for i in range(20)]
    return [{"name": name, "train": str(write_jsonl(tmp_path / f"{name}.jsonl", rows[:14])),
             "eval": str(write_jsonl(tmp_path / f"{name}-eval.jsonl", rows[14:])), "max_new_tokens": 3}
            for name, rows in (("colour", a), ("size", b))]
