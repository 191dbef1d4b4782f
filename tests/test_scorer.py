"""Scorer numerics against single unpadded forward passes, batching invariance, mode restoring."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tether.probes.scorer import Scorer


def peaky(model):
    """Scale the weights so the random model has confident next-token choices (no greedy near-ties)."""
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(8.0)
    return model


def naive_logprobs(model, ids):
    with torch.no_grad():
        return F.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)


def naive_loglikelihood(model, ctx, cont):
    lp = naive_logprobs(model, list(ctx) + list(cont[:-1]))[len(ctx) - 1:]
    tok = torch.tensor(cont)
    return float(lp.gather(1, tok[:, None]).sum()), bool((lp.argmax(-1) == tok).all())


REQUESTS = [
    ([5, 6, 7, 8], [9, 10, 11]), ([5, 6, 7, 8], [12]), ([1, 2], [3, 4]), ([5, 6, 7, 8], [13, 14]),
    ([7] * 9, [8]), ([1, 2], [30, 31, 32, 33, 34, 35, 36, 37, 38]), ([100, 200, 300], [400, 500]),
]


@pytest.mark.parametrize("batch_size", [1, 3, 32])
def test_loglikelihood_matches_unbatched_forward(tiny_model, tokenizer, batch_size):
    scorer = Scorer(tiny_model, tokenizer, batch_size=batch_size)
    got = scorer.loglikelihood(REQUESTS)
    for (ctx, cont), (ll, greedy) in zip(REQUESTS, got):
        ref_ll, ref_greedy = naive_loglikelihood(tiny_model, ctx, cont)
        assert ll == pytest.approx(ref_ll, abs=1e-4)
        assert greedy == ref_greedy


def test_loglikelihood_split_into_chunks_and_small_caches(tiny_model, tokenizer, monkeypatch):
    import tether.probes.scorer as scorer_mod

    monkeypatch.setattr(scorer_mod, "_PASS_COST_TOKENS", 0)  # split continuations by width eagerly
    assert len(scorer_mod._width_chunks([8, 2, 2, 1])) >= 2
    scorer = Scorer(tiny_model, tokenizer, max_batch_tokens=1)  # cache budget: one group per batch
    for (ctx, cont), (ll, _) in zip(REQUESTS, scorer.loglikelihood(REQUESTS)):
        assert ll == pytest.approx(naive_loglikelihood(tiny_model, ctx, cont)[0], abs=1e-4)
    got = Scorer(tiny_model, tokenizer, batch_size=32).loglikelihood(REQUESTS)
    assert [a for a, _ in got] == pytest.approx([a for a, _ in scorer.loglikelihood(REQUESTS)], abs=1e-4)


def test_loglikelihood_detects_greedy_continuation(tiny_model, tokenizer):
    model = peaky(tiny_model)
    ctx = [10, 20, 30]
    seq = list(ctx)
    for _ in range(3):  # the model's own greedy continuation
        seq.append(int(naive_logprobs(model, seq)[-1].argmax()))
    greedy_cont = seq[3:]
    other = [(greedy_cont[0] + 1) % 1000, *greedy_cont[1:]]
    (ll_g, is_g), (ll_o, is_o) = Scorer(model, tokenizer).loglikelihood([(ctx, greedy_cont), (ctx, other)])
    assert is_g and not is_o
    assert ll_g > ll_o


def test_loglikelihood_truncates_context_from_the_left(tiny_model, tokenizer):
    ctx, cont = list(range(10, 30)), [40, 41, 42]
    (ll, _), = Scorer(tiny_model, tokenizer, max_length=8).loglikelihood([(ctx, cont)])
    ref, _ = naive_loglikelihood(tiny_model, ctx[-(9 - len(cont)):], cont)  # lm-eval: (ctx+cont)[-(L+1):]
    assert ll == pytest.approx(ref, abs=1e-4)


def test_loglikelihood_rejects_empty_parts(tiny_model, tokenizer):
    scorer = Scorer(tiny_model, tokenizer)
    assert scorer.loglikelihood([]) == [] and scorer.completion_nll([]) == [] and scorer.generate([]) == []
    with pytest.raises(ValueError, match="non-empty"):
        scorer.loglikelihood([([], [1])])


def _examples():
    return [
        ([1, 2, 3, 4, 5], [-100, -100, 3, 4, 5]),
        ([9, 8], [-100, 8]),
        ([4, 5, 6, 7, 8, 9, 10, 11], [4, 5, 6, 7, 8, 9, 10, 11]),
        ([3, 3, 3], [-100, -100, -100]),
    ]


@pytest.mark.parametrize("batch_size,max_batch_tokens", [(1, 4096), (2, 4096), (32, 4096), (32, 9)])
def test_completion_nll_matches_cross_entropy(tiny_model, tokenizer, batch_size, max_batch_tokens):
    scorer = Scorer(tiny_model, tokenizer, batch_size=batch_size, max_batch_tokens=max_batch_tokens)
    got = scorer.completion_nll(_examples())
    for (ids, labels), (nll, n) in zip(_examples(), got):
        lp = naive_logprobs(tiny_model, ids)[:-1]
        tgt = torch.tensor(labels[1:])
        keep = tgt != -100
        assert n == int(keep.sum())
        ref = float(-lp[keep].gather(1, tgt[keep][:, None]).sum()) if n else 0.0
        assert nll == pytest.approx(ref, abs=1e-4)


def test_iter_logprobs_matches_forward_in_length_order(tiny_model, tokenizer):
    ids = [[1, 2, 3], [4, 5, 6, 7, 8], [9], [10, 11, 12, 13]]
    seen = []
    for i, lp in Scorer(tiny_model, tokenizer, batch_size=2).iter_logprobs(ids):
        seen.append(i)
        assert torch.allclose(lp, naive_logprobs(tiny_model, ids[i]), atol=1e-5)
    assert seen == [1, 3, 0, 2]


def _manual_greedy(model, ids, n):
    seq = list(ids)
    for _ in range(n):
        seq.append(int(naive_logprobs(model, seq)[-1].argmax()))
    return seq[len(ids):]


def test_generate_left_padding_matches_one_by_one(tiny_model, tokenizer):
    model = peaky(tiny_model)
    model.generation_config.eos_token_id = None  # random model: do not stop on a random EOS
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9], [10]]
    batched = Scorer(model, tokenizer, batch_size=8).generate(prompts, max_new_tokens=4)
    single = Scorer(model, tokenizer, batch_size=1).generate(prompts, max_new_tokens=4)
    assert batched == single
    assert single[1] == tokenizer.decode(_manual_greedy(model, prompts[1], 4), skip_special_tokens=True)


def test_generate_cuts_at_stop_string(tiny_model, tokenizer):
    model = peaky(tiny_model)
    model.generation_config.eos_token_id = None
    full = Scorer(model, tokenizer).generate([[1, 2, 3]], max_new_tokens=6)[0]
    stop = full.strip()[2:4]
    cut = Scorer(model, tokenizer).generate([[1, 2, 3]], max_new_tokens=6, stop=[stop])[0]
    assert cut == full.split(stop, 1)[0]


def test_modes_are_restored(tiny_model, tokenizer):
    tiny_model.train()
    tiny_model.model.layers[0].eval()  # a module the user froze in eval mode stays so
    before = [m.training for m in tiny_model.modules()]
    scorer = Scorer(tiny_model, tokenizer)
    scorer.loglikelihood(REQUESTS[:2])
    scorer.completion_nll(_examples()[:2])
    list(scorer.iter_logprobs([[1, 2]]))
    scorer.generate([[1, 2]], max_new_tokens=2)
    assert [m.training for m in tiny_model.modules()] == before
    assert all(p.grad is None for p in tiny_model.parameters())


def test_reference_view_needs_peft(tiny_model, tokenizer):
    with pytest.raises(TypeError, match="PEFT"), Scorer(tiny_model, tokenizer).reference_view():
        pass


def test_reference_view_disables_adapters_per_call(tiny_model, tokenizer):
    from peft import LoraConfig, get_peft_model

    base_ll = Scorer(tiny_model, tokenizer).loglikelihood(REQUESTS)
    peft_model = get_peft_model(tiny_model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                       init_lora_weights=False))
    scorer = Scorer(peft_model, tokenizer)
    assert scorer.is_peft
    for n, p in peft_model.named_parameters():  # a frozen block's adapters (freeze after lora)
        if ".layers.0." in n:
            p.requires_grad_(False)
    flags = {n: p.requires_grad for n, p in peft_model.named_parameters()}
    tuned_ll = scorer.loglikelihood(REQUESTS)
    with scorer.reference_view() as ref:
        ref_ll = ref.loglikelihood(REQUESTS)
        again = scorer.loglikelihood(REQUESTS)  # the view does not switch the tuned scorer off
    assert {n: p.requires_grad for n, p in peft_model.named_parameters()} == flags  # nothing made trainable
    assert [a for a, _ in ref_ll] == pytest.approx([a for a, _ in base_ll], abs=1e-5)
    assert [a for a, _ in again] == pytest.approx([a for a, _ in tuned_ll], abs=1e-5)
    assert any(abs(a[0] - b[0]) > 1e-3 for a, b in zip(tuned_ll, base_ll))


def _lora(model):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=32, target_modules=["q_proj", "v_proj", "down_proj"],
                                            lora_dropout=0.1, init_lora_weights=False))


def test_merged_scores_like_unmerged_and_restores_base_weights_bit_for_bit(tiny_model, tokenizer):
    """`merged` folds the adapters in for the block (same scores, generations, train flags) and puts
    every base weight back exactly, the adapters' own weights untouched."""
    model = _lora(tiny_model).train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    plain = Scorer(model, tokenizer, merge_adapters=False)
    scorer = Scorer(model, tokenizer)  # CPU: merging on by default
    assert scorer.merge_adapters and not plain.merge_adapters
    want_ll, want_gen = plain.loglikelihood(REQUESTS), plain.generate([[5, 6, 7], [1, 2]], max_new_tokens=5)
    with scorer.merged() as merged:
        assert merged
        name = "base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight"
        assert not torch.equal(model.get_parameter(name), before[name])  # folded in
        got_ll, got_gen = scorer.loglikelihood(REQUESTS), scorer.generate([[5, 6, 7], [1, 2]], max_new_tokens=5)
    assert [a for a, _ in got_ll] == pytest.approx([a for a, _ in want_ll], abs=1e-4)
    assert got_gen == want_gen
    assert model.training and all(not m.merged for m in _lora_layers(model))
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n
    with Scorer(model, tokenizer, merge_adapters=False).merged() as merged:
        assert not merged
    with scorer.reference_view() as ref, ref.merged() as merged:
        assert not merged  # adapters off: nothing to fold


def _lora_layers(model):
    from peft.tuners.lora import LoraLayer

    return [m for m in model.modules() if isinstance(m, LoraLayer)]


def test_run_suite_merges_for_scoring_but_not_for_drift_against_disabled_adapters(tiny_model, tokenizer):
    """A suite mixing drift (reference = the same model, adapters off) with other probes gives what
    unmerged scoring gives, and leaves the weights as they were."""
    from tether.probes.drift import DriftProbe
    from tether.probes.perplexity import PerplexityProbe
    from tether.probes.suite import run_suite

    model = _lora(tiny_model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    texts = [{"text": "the cat sat on the mat"}, {"text": "a b c d e f g"}]
    prompts = [{"prompt": "hello there"}, {"prompt": "one two three four"}]
    probes = [PerplexityProbe("ppl", texts), DriftProbe("drift", prompts), PerplexityProbe("ppl2", texts)]
    seen = []
    scorer = Scorer(model, tokenizer)
    merged = scorer.merged

    def spy():
        seen.append(True)
        return merged()

    scorer.merged = spy
    ran = []
    for p in probes:
        p.run = (lambda run, name: lambda *a, **k: ran.append(name) or run(*a, **k))(p.run, p.name)
    got = run_suite(probes, scorer, progress=False)
    assert len(seen) == 1 and ran == ["ppl", "ppl2", "drift"]  # one merge; drift after, unmerged
    want = run_suite(probes, Scorer(model, tokenizer, merge_adapters=False), progress=False)
    assert [r.name for r in got] == ["ppl", "drift", "ppl2"]  # results in suite order
    for a, b in zip(got, want):
        assert a.score == pytest.approx(b.score, rel=1e-5)  # merged vs not: float32 noise; the adapters move ~1e-2
    assert got[1].extra["kl"] == pytest.approx(want[1].extra["kl"], abs=1e-6) and want[1].extra["kl"] > 0
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n


# ----------------------------------------------------------------- shared prompt prefixes
def _prefixed(seed: int = 1, vocab: int = 128):
    """Prompts that share a 24-token prefix (a system prompt), with suffixes of different lengths."""
    g = torch.Generator().manual_seed(seed)
    pre = torch.randint(3, vocab, (24,), generator=g).tolist()
    return [pre + torch.randint(3, vocab, (n,), generator=g).tolist() for n in (3, 9, 1, 6, 4)]


def _score_all(model, tokenizer, prompts, share: bool):
    scorer = Scorer(model, tokenizer, batch_size=8, share_prefix=share)
    # labels on each row's own tokens (the usual prompt/answer split), and on a row with labels in the prefix
    examples = [(p, [-100] * 24 + p[24:]) for p in prompts]
    nll = scorer.completion_nll(examples)
    nll_in_prefix = scorer.completion_nll([(p, [-100] * 20 + p[20:]) for p in prompts])
    lps = dict(scorer.iter_logprobs(prompts))
    gen = scorer.generate_ids(prompts, max_new_tokens=5)
    return scorer, nll, nll_in_prefix, lps, gen


@pytest.mark.parametrize("arch,left", [("llama", True), ("qwen2", True), ("mistral", False), ("gemma2", False),
                                       ("gpt2", True)])
def test_shared_prompt_prefix_runs_once_and_scores_like_the_plain_forward(arch, left, tokenizer, monkeypatch):
    """Right-padded scoring shares the prefix on every architecture; generation (left padding, so
    padding sits between the prefix and each row's own tokens) only where no sliding window shorter
    than the prompt counts that padding: Mistral's and Gemma 2's windows of 8 tokens fall back, found
    by the check, and generate what the plain batch generates."""
    from tests.test_prefix import tiny

    model = peaky(tiny(arch)).eval()
    model.generation_config.eos_token_id = None  # random model: do not stop on a random EOS
    model.generation_config.pad_token_id = 0
    prompts = _prefixed()
    prefix_runs = []
    real = Scorer._prefix_cache
    monkeypatch.setattr(Scorer, "_prefix_cache", lambda self, first, shared, rows, logits=False: (
        prefix_runs.append((shared, rows)) or real(self, first, shared, rows, logits)))
    on = _score_all(model, tokenizer, prompts, True)
    off = _score_all(model, tokenizer, prompts, False)
    assert on[0]._prefix_exact == {"right": True, "left": left}
    # completion losses and next-token distributions: each batch's 24 shared tokens ran once
    # (the check's two-row runs, then the batch's five rows; labels inside the prefix: a plain batch)
    assert (24, 5) in prefix_runs and not off[0]._prefix_exact
    for (a, n), (b, m) in zip(on[1] + on[2], off[1] + off[2]):
        assert n == m and a == pytest.approx(b, rel=1e-5, abs=1e-4)
    for i, lp in off[3].items():
        assert torch.allclose(on[3][i], lp, rtol=1e-4, atol=1e-4)  # the peaky model's log-probs reach ~-50
    assert on[4] == off[4]
    assert off[4][1] == _manual_greedy(model, prompts[1], 5)


def test_scorer_scores_plainly_where_the_prefix_cache_does_not_continue_exactly(tiny_model, tokenizer, monkeypatch,
                                                                                caplog):
    """A cache that does not hold what the plain forward would have seen (here: a prefix cache of other
    tokens) is caught on the first shared batch of each padding side; from then on batches run plainly."""
    import logging

    model = peaky(tiny_model)
    model.generation_config.eos_token_id = None
    prompts = _prefixed(vocab=len(tokenizer))
    real = Scorer._prefix_cache
    monkeypatch.setattr(Scorer, "_prefix_cache", lambda self, first, shared, rows, logits=False: real(
        self, [t + 1 for t in first], shared, rows, logits))
    with caplog.at_level(logging.INFO, logger="tether"):
        wrong = _score_all(model, tokenizer, prompts, True)
    assert wrong[0]._prefix_exact == {"right": False, "left": False}
    assert "cached forward differs from its plain one" in caplog.text
    plain = _score_all(model, tokenizer, prompts, False)
    assert wrong[1:3] == plain[1:3] and wrong[4] == plain[4]
    for i, lp in plain[3].items():
        assert torch.equal(wrong[3][i], lp)
