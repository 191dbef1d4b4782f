"""CUDA paths, skipped where no GPU is visible (CI has none; `bench/device_check.sh` runs them on a
lent GPU): the scorer on the GPU against the CPU, LoRA scored unmerged on the GPU, EWC's Fisher and
fused penalty on the GPU, LwF's KL in GPU-sized chunks, and a whole `tether train` run of the
default recipe's methods in bf16."""

from __future__ import annotations

import json

import pytest
import torch
from test_ewc import VOCAB, reference_fisher, toy_examples
from test_scorer import REQUESTS, _lora, peaky
from test_train import recipe

from tether.probes.scorer import Scorer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_scorer_on_cuda_matches_cpu(tiny_model, tokenizer):
    cpu = Scorer(tiny_model, tokenizer, batch_size=3).loglikelihood(REQUESTS)
    gpu_scorer = Scorer(tiny_model.to("cuda"), tokenizer, batch_size=3)
    assert gpu_scorer.device.type == "cuda" and not gpu_scorer.merge_adapters  # GPU: adapters stay unmerged
    gpu = gpu_scorer.loglikelihood(REQUESTS)
    assert [a for a, _ in gpu] == pytest.approx([a for a, _ in cpu], abs=1e-3)
    nll_cpu = Scorer(tiny_model.to("cpu"), tokenizer).completion_nll(REQUESTS)
    nll_gpu = Scorer(tiny_model.to("cuda"), tokenizer).completion_nll(REQUESTS)
    assert [n for _, n in nll_gpu] == [n for _, n in nll_cpu]  # (summed NLL, target tokens) per example
    assert [v for v, _ in nll_gpu] == pytest.approx([v for v, _ in nll_cpu], rel=1e-4, abs=1e-3)


def test_generation_on_cuda_left_padding_matches_one_by_one(tiny_model, tokenizer):
    model = peaky(tiny_model).to("cuda")
    model.generation_config.eos_token_id = None
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9], [10]]
    batched = Scorer(model, tokenizer, batch_size=8).generate(prompts, max_new_tokens=4)
    single = Scorer(model, tokenizer, batch_size=1).generate(prompts, max_new_tokens=4)
    on_cpu = Scorer(model.to("cpu"), tokenizer, batch_size=8).generate(prompts, max_new_tokens=4)
    assert batched == single == on_cpu


def test_lora_unmerged_on_cuda_scores_like_merged_on_cpu(tiny_model, tokenizer):
    model = _lora(tiny_model)
    with Scorer(model, tokenizer).merged() as merged:  # CPU default: fold the adapters in
        assert merged
        cpu = Scorer(model, tokenizer).loglikelihood(REQUESTS)
    model.to("cuda")
    scorer = Scorer(model, tokenizer)
    with scorer.merged() as merged:
        assert not merged
        gpu = scorer.loglikelihood(REQUESTS)
    assert [a for a, _ in gpu] == pytest.approx([a for a, _ in cpu], abs=1e-3)
    with scorer.reference_view() as ref:
        off = ref.loglikelihood(REQUESTS)
    assert any(abs(a[0] - b[0]) > 1e-3 for a, b in zip(off, gpu))


def test_ewc_fisher_and_penalty_on_cuda_match_cpu():
    from conftest import make_tiny_llama

    from tether.methods.base import Context
    from tether.methods.ewc import EWC

    model = make_tiny_llama(VOCAB, hidden=16).train()
    examples = toy_examples(6, seed=2)
    want = reference_fisher(model, examples)
    model.to("cuda")
    ewc = EWC({"lambda": 10.0, "fisher_samples": 6})
    ctx = Context(general_examples=examples, task_examples=[])
    ewc.on_task_start(model, ctx)
    for n, f in ewc.fisher_.items():
        assert f.device.type == "cuda"
        torch.testing.assert_close(f.cpu(), want[n], rtol=1e-3, atol=1e-7)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)
    pen = ewc.extra_loss(model, {}, None, ctx)["ewc"]
    expected = 5.0 * sum((ewc.fisher_[n] * 0.01**2).sum() for n in ewc.fisher_)
    torch.testing.assert_close(pen, expected, rtol=1e-3, atol=1e-9)


def test_default_recipe_methods_train_in_bf16_on_cuda(tmp_path, tiny_model_dir, tiny_task, tiny_suite):
    """LoRA + replay + LwF on the replay rows + EWC under HF's bf16 autocast on the GPU, guard on:
    the run finishes, the losses are finite, and the saved adapter reloads on the CPU to the logits
    the trained GPU model gives (found here: Accelerate's autocast wrapper stayed on the trained
    model, whose logits then came out of bf16 matmuls)."""
    from tether import models
    from tether.training.run import train

    r = recipe(tmp_path, tiny_model_dir, tiny_task, tiny_suite, training={"bf16": True},
               methods={"lora": {"r": 4}, "replay": {"ratio": 0.25, "mode": "add"}, "lwf": {"on": "replay"},
                        "ewc": {"fisher_samples": 8}})
    result = train(r, keep_model=True)
    assert next(result.model.parameters()).device.type == "cuda"
    logs = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [x["loss"] for x in logs if "loss" in x]
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))
    assert any("lwf" in k for x in logs for k in x) and any("ewc" in k for x in logs for k in x)
    assert result.summary["guard"]["checks"] == 2
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        trained = result.model.eval()(ids.to("cuda")).logits.float().cpu()
        reloaded, _ = models.load(result.run_dir / "model", base=tiny_model_dir, device="cpu")
        assert torch.allclose(reloaded(ids).logits, trained, atol=1e-4)


def test_lwf_kl_in_large_chunks_on_cuda_matches_cpu_rows_of_8():
    """On a GPU `lwf_kl` reduces ~32M logits at a time (few kernels); the CPU's 8-row chunks are the reference."""
    from tether.methods._distill import lwf_kl

    g = torch.Generator().manual_seed(0)
    t = torch.randn(4, 50, 49152, generator=g) * 3
    s = torch.randn(4, 50, 49152, generator=g) * 3
    mask = torch.ones(4, 50, dtype=torch.long)
    mask[1, 30:] = 0
    values, grads = [], []
    for device in ("cpu", "cuda"):
        student = s.to(device).requires_grad_(True) if device == "cuda" else s.clone().requires_grad_(True)
        value = lwf_kl(student, t.to(device), mask.to(device), 2.0)
        value.backward()
        values.append(value.item())
        grads.append(student.grad.cpu())
    assert values[1] == pytest.approx(values[0], rel=1e-5)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-9)


def test_shared_prefix_forward_on_cuda_matches_plain_in_fp32_and_bf16():
    from tests.conftest import make_tiny_llama
    from tether import prefix

    model = make_tiny_llama(128, layers=3).to("cuda").train()
    g = torch.Generator().manual_seed(2)
    pre = torch.randint(3, 128, (24,), generator=g).tolist()
    rows = [pre + torch.randint(3, 128, (n,), generator=g).tolist() for n in (3, 9, 1, 6)]
    width = max(len(r) for r in rows)
    ids = torch.zeros((len(rows), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, :len(r)], mask[i, :len(r)] = torch.tensor(r), 1
    ids, mask = ids.cuda(), mask.cuda()
    groups = prefix.plan(ids, mask)
    assert groups[0].shared == 24
    keep = mask.bool()
    plain = model(input_ids=ids, attention_mask=mask).logits
    shared = prefix.forward(model, ids, mask, groups, prefix.cache_keyword(model))
    assert torch.allclose(plain[keep], shared[keep], atol=1e-4)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        assert prefix.agrees(model, ids, mask, groups, prefix.cache_keyword(model))
