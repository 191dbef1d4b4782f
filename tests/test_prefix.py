"""Shared prompt prefixes run once per batch: same logits, gradients and training as without."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from tests.conftest import make_tiny_llama
from tether import prefix


def batch(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.zeros((len(rows), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r)
        mask[i, :len(r)] = 1
    return ids, mask


PRE = list(range(10, 30))  # 20 shared tokens


def test_plan_groups_rows_and_finds_each_groups_shared_prefix():
    rows = [PRE + [40, 41, 42], PRE + [50], PRE + [60, 61], PRE[:5] + [70] * 30]
    ids, mask = batch(rows)
    split = torch.tensor([False, False, False, True])
    g = prefix.plan(ids, mask, split)
    assert g == [prefix.Group((0, 1, 2), 20, 23), prefix.Group((3,), 0, 35)]
    # one group: the rows share only 5 tokens, under the minimum
    assert prefix.plan(ids, mask) == [prefix.Group((0, 1, 2, 3), 0, 35)]
    assert prefix.plan(ids, mask, min_shared=4)[0].shared == 5
    # a row that is all prefix keeps its last token for itself
    ids, mask = batch([PRE, PRE + [1, 2]])
    assert prefix.plan(ids, mask)[0].shared == 19
    # a left-padded row shares nothing
    ids, mask = batch([PRE + [1], PRE + [2]])
    left_ids = torch.cat([torch.zeros((2, 1), dtype=torch.long), ids], 1)
    left_mask = torch.cat([torch.tensor([[0], [1]]), mask], 1)
    assert prefix.plan(left_ids, left_mask)[0].shared == 0
    # saves: fewer token positions than the plain padded batch
    ids, mask = batch(rows)
    assert prefix.saves(prefix.plan(ids, mask, split), ids.shape[1])
    assert not prefix.saves([prefix.Group((0, 1, 2, 3), 0, 35)], 35)


def test_common_prefix_of_token_lists_leaves_each_row_a_token_of_its_own():
    pre = list(range(3, 23))  # 20 tokens
    assert prefix.common_prefix([pre + [1], pre + [2, 3]]) == 20
    assert prefix.common_prefix([pre, pre + [2, 3]]) == 19  # the shortest row keeps its last token
    assert prefix.common_prefix([pre + [1]]) == 0  # one row: nothing to share
    assert prefix.common_prefix([pre[:10] + [1], pre[:10] + [2]]) == 0  # below MIN_SHARED
    assert prefix.common_prefix([pre[:10] + [1], pre[:10] + [2]], min_shared=4) == 10


def tiny(arch: str):
    """A tiny random causal LM of ``arch`` without dropout (Mistral and Gemma 2 with a sliding window
    shorter than the shared prefix)."""
    import transformers

    if arch == "llama":
        return make_tiny_llama(128, layers=3)
    small = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2)
    cfg = {"qwen2": lambda: transformers.Qwen2Config(**small),
           "mistral": lambda: transformers.MistralConfig(**small, sliding_window=8),
           "gemma2": lambda: transformers.Gemma2Config(**small, head_dim=8, sliding_window=8),
           "gpt2": lambda: transformers.GPT2Config(vocab_size=128, n_embd=32, n_layer=2, n_head=4, resid_pdrop=0.0,
                                                   embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=1, eos_token_id=2),
           }[arch]()
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(cfg)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "gemma2", "gpt2"])
def test_forward_gives_the_plain_logits_and_gradients(arch):
    model = tiny(arch).train()  # no dropout in these configs
    g = torch.Generator().manual_seed(1)
    pre = torch.randint(3, 128, (24,), generator=g).tolist()
    rows = [pre + torch.randint(3, 128, (n,), generator=g).tolist() for n in (3, 9, 1, 6)]
    rows += [pre[:4] + torch.randint(3, 128, (n,), generator=g).tolist() for n in (30, 12)]
    ids, mask = batch(rows)
    split = torch.tensor([False] * 4 + [True] * 2)
    groups = prefix.plan(ids, mask, split)
    assert [(len(x.rows), x.shared) for x in groups] == [(4, 24), (2, 0)]
    keep = mask.bool()

    def run(fn):
        model.zero_grad()
        logits = fn()
        # a loss over every real position, weighted per position so each gradient differs
        w = torch.linspace(0.5, 1.5, logits.shape[1])[None, :, None]
        (logits * w)[keep].float().pow(2).mean().backward()
        return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    plain, g_plain = run(lambda: model(input_ids=ids, attention_mask=mask).logits)
    shared, g_shared = run(lambda: prefix.forward(model, ids, mask, groups, prefix.cache_keyword(model)))
    assert torch.allclose(plain[keep], shared[keep], atol=1e-5)
    for n in g_plain:
        assert torch.allclose(g_plain[n], g_shared[n], atol=1e-6, rtol=1e-4), n
    assert prefix.agrees(model, ids, mask, groups, prefix.cache_keyword(model))


class IgnoresCache(torch.nn.Module):
    """A model whose forward takes a cache argument and drops it: a prefix cache would be lost."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.config = inner, inner.config

    def forward(self, input_ids, attention_mask=None, cache=None, use_cache=None, labels=None, **kw):
        return self.inner(input_ids=input_ids, attention_mask=attention_mask, labels=labels)


def test_agrees_catches_a_model_that_does_not_continue_the_prefix(caplog):
    model = IgnoresCache(make_tiny_llama(128))
    ids, mask = batch([PRE + [40, 41], PRE + [50, 51, 52]])
    groups = prefix.plan(ids, mask)
    assert prefix.cache_keyword(model) == "cache"
    with caplog.at_level(logging.WARNING, logger="tether"):
        assert not prefix.agrees(model, ids, mask, groups, "cache")
    assert "differs from its plain one" in caplog.text


def _train(tmp_path, tiny_model_dir, tiny_task, tiny_suite, share: bool, methods: dict, name: str,
           grad_accum: int = 1):
    from tests.test_train import recipe
    from tether.training.run import train

    r = recipe(tmp_path / name, tiny_model_dir, tiny_task, tiny_suite, methods=methods,
               training={"share_prefix": share, "batch_size": 4, "max_steps": 3, "grad_accum": grad_accum},
               guard={"enabled": False})
    res = train(r, keep_model=True)
    logs = [json.loads(x) for x in (res.run_dir / "metrics.jsonl").read_text().splitlines()]
    return res, [x for x in logs if "loss" in x]


@pytest.mark.parametrize("methods,grad_accum", [
    ({"lora": {"r": 4, "dropout": 0.0}, "replay": {"ratio": 0.2, "mode": "add"}, "lwf": {"on": "inputs"}}, 1),
    ({"full": {}, "lwf": {"on": "task"}}, 1),
    # no example weights: the loss is HF's token mean over the accumulated batch (num_items_in_batch)
    ({"lora": {"r": 4, "dropout": 0.0}}, 2),
], ids=["lora+replay+lwf-inputs", "full+lwf-frozen-copy", "lora-grad-accum-2"])
def test_training_with_shared_prefixes_is_training_without(tmp_path, tiny_model_dir, tiny_task, tiny_suite, methods,
                                                            grad_accum, caplog):
    with caplog.at_level(logging.INFO, logger="tether"):
        on, logs_on = _train(tmp_path, tiny_model_dir, tiny_task, tiny_suite, True, methods, "on", grad_accum)
    assert "shared prefix: on" in caplog.text
    off, logs_off = _train(tmp_path, tiny_model_dir, tiny_task, tiny_suite, False, methods, "off", grad_accum)
    # the chat template's system prompt and the task's "Topic of: the" run once per batch
    assert all(x["prefix_saved"] > 0.2 for x in logs_on) and not any("prefix_saved" in x for x in logs_off)
    for a, b in zip(logs_on, logs_off):
        for k in ("loss", "lwf", "lwf_inputs", "loss_task", "loss_replay"):
            if k in b:
                assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-6), k
    p_on, p_off = dict(on.model.named_parameters()), dict(off.model.named_parameters())
    for n, p in p_off.items():
        if p.requires_grad:
            assert torch.allclose(p_on[n], p, atol=1e-5), n


def test_sharing_stays_off_where_it_would_not_be_exact(tmp_path, tiny_model_dir, tiny_task, tiny_suite, caplog):
    with caplog.at_level(logging.INFO, logger="tether"):
        _, logs = _train(tmp_path, tiny_model_dir, tiny_task, tiny_suite, True, {"lora": {"r": 4, "dropout": 0.1}},
                         "dropout")
    assert "shared prefix: off (dropout is on" in caplog.text
    assert not any("prefix_saved" in x for x in logs)


def test_with_dropout_only_the_teachers_forward_shares(tmp_path, tiny_model_dir, tiny_task, tiny_suite, caplog):
    """LoRA dropout keeps the student's rows whole; LwF's teacher runs in eval mode (no dropout), so
    its forward still runs each shared prefix once, and the run trains exactly as one without."""
    methods = {"lora": {"r": 4, "dropout": 0.1}, "lwf": {"on": "task"}}
    with caplog.at_level(logging.INFO, logger="tether"):
        on, logs_on = _train(tmp_path, tiny_model_dir, tiny_task, tiny_suite, True, methods, "on")
    assert "shared prefix: off (dropout is on" in caplog.text
    assert "shared prefix: on for the reference model's forwards only" in caplog.text
    off, logs_off = _train(tmp_path, tiny_model_dir, tiny_task, tiny_suite, False, methods, "off")
    assert all(x["teacher_prefix_saved"] > 0.2 for x in logs_on) and not any("prefix_saved" in x for x in logs_on)
    assert not any("teacher_prefix_saved" in x for x in logs_off)
    for a, b in zip(logs_on, logs_off, strict=True):  # dropout draws the same masks: the teacher uses no RNG
        for k in ("loss", "lwf"):
            assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-6), k
    p_on, p_off = dict(on.model.named_parameters()), dict(off.model.named_parameters())
    for n, p in p_off.items():
        if p.requires_grad:
            assert torch.allclose(p_on[n], p, atol=1e-5), n


class RefusesCache(IgnoresCache):
    """A model whose forward raises when handed a cache (another cache class, say)."""

    def forward(self, input_ids, attention_mask=None, cache=None, use_cache=None, labels=None, **kw):
        if cache is not None:
            raise NotImplementedError("no prefix cache for this model")
        return self.inner(input_ids=input_ids, attention_mask=attention_mask, labels=labels)


@pytest.mark.parametrize("wrapper,reason,dropout", [
    (IgnoresCache, "shared prefix: off (its cached forward", False),
    (RefusesCache, "shared prefix: off (its cached forward failed: NotImplementedError: no prefix cache", False),
    # dropout keeps the student's rows whole; the reference's forwards (eval mode) are checked on their own
    (IgnoresCache, "shared prefix: off for the reference model's forwards too (its cached forward", True),
    (RefusesCache, "shared prefix: off for the reference model's forwards too (its cached forward failed: "
                   "NotImplementedError", True),
])
def test_trainer_trains_plainly_a_model_whose_cached_forward_is_wrong_or_fails(tmp_path, caplog, wrapper, reason,
                                                                                dropout):
    from tether.config import TrainingSpec
    from tether.data.collate import Collator
    from tether.methods.base import Context
    from tether.training.trainer import TetherTrainer, training_arguments

    model = wrapper(make_tiny_llama(128)).train()
    if dropout:
        model.drop = torch.nn.Dropout(0.1)  # counted by the trainer, never run
    g = torch.Generator().manual_seed(0)
    data = [{"input_ids": (ids := PRE + torch.randint(3, 128, (n,), generator=g).tolist()), "labels": ids}
            for n in (3, 5, 2, 7)]
    spec = TrainingSpec(max_steps=2, batch_size=4, lr=1e-3, logging_steps=1)
    trainer = TetherTrainer(model=model, args=training_arguments(spec, str(tmp_path / "o")), train_dataset=data,
                            data_collator=Collator(0), methods={},
                            context=Context(reference=(lambda m, batch: None) if dropout else None))
    with caplog.at_level(logging.INFO, logger="tether"):
        trainer.train()
    assert reason in caplog.text
    assert trainer._prefix["why"].startswith("dropout is on" if dropout else "its cached forward")
    assert trainer._prefix["teacher_why"].startswith("its cached forward")
    assert not any("prefix_saved" in k for x in trainer.state.log_history for k in x)


@pytest.mark.parametrize("setting,off", [(None, True), (True, False)])
def test_auto_leaves_sharing_off_off_the_cpu_until_asked(setting, off):
    from types import SimpleNamespace

    from tether.training.trainer import TetherTrainer

    trainer = SimpleNamespace(share_prefix=setting, args=SimpleNamespace(gradient_checkpointing=False, n_gpu=0),
                              accelerator=SimpleNamespace(num_processes=1), is_deepspeed_enabled=False,
                              is_fsdp_enabled=False, label_smoother=None, compute_loss_func=None)
    elsewhere = make_tiny_llama(128).to("meta")  # any device but the CPU
    why = TetherTrainer._why_not_share(trainer, elsewhere)
    assert (why is not None and why.startswith("not yet measured on meta")) == off
    assert TetherTrainer._why_not_share(trainer, make_tiny_llama(128)) is None


def test_mixed_precision_checks_the_cache_in_the_weights_precision_and_keeps_sharing_on(
        tmp_path, tiny_model_dir, tiny_task, tiny_suite, monkeypatch, caplog):
    """bf16 autocast alone moves a real model's logits ~9% of their spread between the cached and the
    plain forward (SmolLM2), which turned sharing off under ``training.bf16``: the check is about the
    architecture, so it runs in the float32 weights' own precision, outside Accelerate's autocast."""
    from tests.test_train import recipe
    from tether.training.run import train

    seen = []
    real = prefix.agrees

    def spy(model, *args, **kwargs):
        original = model.__dict__.get("_original_forward")  # set while Accelerate's autocast wraps forward
        seen.append(original is not None and model.forward is original)
        return real(model, *args, **kwargs)

    monkeypatch.setattr(prefix, "agrees", spy)
    r = recipe(tmp_path / "bf16", tiny_model_dir, tiny_task, tiny_suite,
               methods={"lora": {"r": 4, "dropout": 0.0}, "replay": {"ratio": 0.2, "mode": "add"},
                        "lwf": {"on": "replay"}},
               training={"share_prefix": True, "bf16": True, "batch_size": 4, "max_steps": 2},
               guard={"enabled": False})
    with caplog.at_level(logging.INFO, logger="tether"):
        res = train(r)
    assert seen == [True]  # once, with the model's own forward in place of Accelerate's autocast wrapper
    assert "shared prefix: on" in caplog.text
    logs = [json.loads(x) for x in (res.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all(x["prefix_saved"] > 0.2 for x in logs if "loss" in x)
