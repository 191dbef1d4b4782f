"""Shared fixtures: the real SmolLM2 tokenizer (with its chat template) and tiny random Llamas."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


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
