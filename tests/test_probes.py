"""Each probe against a hand-computed value, with fake scorers for the decision logic."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from tether.data.formats import encode_record
from tether.data.readers import DataError, Record
from tether.probes.drift import DriftProbe
from tether.probes.generation import GenerationProbe, is_correct, normalise
from tether.probes.multiple_choice import MultipleChoiceProbe, decisions, encode_pair
from tether.probes.perplexity import PerplexityProbe
from tether.probes.scorer import Scorer
from tether.registry import PROBES


def forward_logprobs(model, ids):
    with torch.no_grad():
        return F.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)


def test_all_kinds_registered():
    assert {"perplexity", "multiple_choice", "generation", "drift"} <= set(PROBES.names())


# ---------------------------------------------------------------- perplexity
PPL_ITEMS = [
    {"text": "The cat sat on the mat."},
    {"prompt": "2 + 2 =", "completion": " 4"},
    {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there!"}]},
]


def test_perplexity_is_token_weighted_nll(tiny_model, tokenizer):
    result = PerplexityProbe("ppl", PPL_ITEMS).run(Scorer(tiny_model, tokenizer, batch_size=2))
    nll, n = [], []
    for i, item in enumerate(PPL_ITEMS):
        ex = encode_record(Record(item, "t", i + 1), tokenizer)
        lp = forward_logprobs(tiny_model, ex.input_ids)[:-1]
        tgt = torch.tensor(ex.labels[1:])
        keep = tgt != -100
        nll.append(float(-lp[keep].gather(1, tgt[keep][:, None]).sum()))
        n.append(int(keep.sum()))
    assert result.item_values == pytest.approx(nll, abs=1e-3)
    assert result.item_weights == n
    assert result.score == pytest.approx(sum(nll) / sum(n), rel=1e-5, abs=1e-5)
    assert result.extra["perplexity"] == pytest.approx(math.exp(result.score))
    assert result.metric == "loss" and not result.higher_is_better
    assert result.ci_low <= result.score <= result.ci_high


def test_perplexity_rejects_bad_record_and_option():
    with pytest.raises(DataError, match="text"):
        PerplexityProbe.validate_item(Record({"text": 3}, "f.jsonl", 7))
    with pytest.raises(ValueError, match="unknown option 'max_len'"):
        PerplexityProbe("ppl", PPL_ITEMS, max_len=3)


# ---------------------------------------------------------------- multiple choice
MC_ITEMS = [
    {"query": "Question: What colour is the sky?\nAnswer:", "choices": ["blue", "green", "a red one"],
     "gold": 0},
    {"query": "Question: 2 + 3 = ", "choices": ["5", "23"], "gold": 0},  # trailing space moves
    {"query": "The capital of France is", "choices": ["Paris", "Rome", "Berlin", "Oslo"], "gold": 2},
]


def test_encode_pair_moves_trailing_whitespace(tokenizer):
    ctx, cont = encode_pair(tokenizer, "2 + 3 = ", " 5")
    assert tokenizer.decode(ctx) == "2 + 3 ="
    assert tokenizer.decode(cont) == "  5"
    assert ctx + cont == tokenizer("2 + 3 =  5")["input_ids"]


def test_multiple_choice_matches_manual_loglikelihoods(tiny_model, tokenizer):
    probe = MultipleChoiceProbe("mc", MC_ITEMS)
    scorer = Scorer(tiny_model, tokenizer, batch_size=3)
    lls = probe.item_loglikelihoods(scorer)
    acc, acc_norm = [], []
    for item, item_lls in zip(MC_ITEMS, lls):
        manual = []
        for choice in item["choices"]:
            ctx, cont = encode_pair(tokenizer, item["query"], " " + choice)
            lp = forward_logprobs(tiny_model, ctx + cont[:-1])[len(ctx) - 1:]
            manual.append(float(lp.gather(1, torch.tensor(cont)[:, None]).sum()))
        assert item_lls == pytest.approx(manual, abs=1e-4)
        acc.append(float(max(range(len(manual)), key=manual.__getitem__) == item["gold"]))
        norm = [m / len(c) for m, c in zip(manual, item["choices"])]
        acc_norm.append(float(max(range(len(norm)), key=norm.__getitem__) == item["gold"]))
    result = probe.run(scorer)
    assert result.metric == "acc_norm" and result.item_values == acc_norm
    assert result.extra["acc"] == pytest.approx(sum(acc) / len(acc))
    result_acc = MultipleChoiceProbe("mc", MC_ITEMS, primary="acc").run(scorer)
    assert result_acc.item_values == acc and result_acc.metric == "acc"
    assert result.item_ids == [str(i + 1) for i in range(len(MC_ITEMS))] and result.item_outputs == []


class FakeScorer:
    """Returns preset log-likelihoods / generations: probe logic without a model."""

    tokenizer = None

    def __init__(self, lls=None, generations=None, tokenizer=None):
        self.lls, self.generations, self.tokenizer = lls, generations, tokenizer

    def loglikelihood(self, requests):
        assert len(requests) == len(self.lls)
        return [(x, False) for x in self.lls]

    def generate(self, prompts, *, max_new_tokens, stop):
        return self.generations[: len(prompts)]


def test_acc_norm_divides_by_choice_characters(tokenizer):
    items = [{"query": "Q:", "choices": ["a", "abcdefghij"], "gold": 1}]
    # raw: -2 > -5 picks "a"; per character: -2/1 < -5/10 picks the long choice
    assert decisions([-2.0, -5.0], items[0]["choices"]) == (0, 1)
    result = MultipleChoiceProbe("mc", items).run(FakeScorer(lls=[-2.0, -5.0], tokenizer=tokenizer))
    assert result.score == 1.0 and result.extra["acc"] == 0.0
    assert result.extra["prob"] == pytest.approx(1 / (1 + math.exp(3)))  # e^-5 / (e^-2 + e^-5)


def test_prob_metric_is_the_gold_choice_probability_per_item(tokenizer):
    items = [{"query": "Q:", "choices": ["a", "b", "c"], "gold": 2},
             {"query": "R:", "choices": ["x", "y"], "gold": 0}]
    lls = [-1.0, -2.0, -3.0, -700.0, -700.0]  # the second item's huge negatives must not underflow
    result = MultipleChoiceProbe("mc", items, primary="prob").run(FakeScorer(lls=lls, tokenizer=tokenizer))
    z = math.exp(-1) + math.exp(-2) + math.exp(-3)
    assert result.metric == "prob"
    assert result.item_values == pytest.approx([math.exp(-3) / z, 0.5])
    assert result.item_extra == {"acc": [0.0, 1.0], "acc_norm": [0.0, 1.0]}
    assert result.extra == pytest.approx({"acc": 0.5, "acc_norm": 0.5})
    with pytest.raises(ValueError, match="'primary' must be one of acc, acc_norm, prob"):
        MultipleChoiceProbe("mc", items, primary="f1")


def test_multiple_choice_validation():
    ok = {"query": "q", "choices": ["a", "b"], "gold": 1}
    MultipleChoiceProbe.validate_item(Record(ok, "f", 1))
    for bad, key in [({**ok, "gold": 2}, "gold"), ({**ok, "choices": ["a"]}, "choices"),
                     ({**ok, "choices": ["a", ""]}, r"choices\[1\]"), ({**ok, "query": None}, "query")]:
        with pytest.raises(DataError, match=key):
            MultipleChoiceProbe.validate_item(Record(bad, "f", 3))
    with pytest.raises(ValueError, match="primary"):
        MultipleChoiceProbe("mc", [ok], primary="f1")


# ---------------------------------------------------------------- generation
GEN_ITEMS = [
    {"prompt": "Capital of France?", "answers": ["Paris"]},
    {"prompt": [{"role": "user", "content": "2+2?"}], "answers": ["4", "four"]},
    {"prompt": "Name a colour.", "answers": ["blue"]},
]


def test_normalise_and_metrics():
    assert normalise("  The  ANSWER: Paris! ") == "the answer paris"
    assert is_correct("Paris.", ["paris"], "exact_match")
    assert not is_correct("It is Paris.", ["paris"], "exact_match")
    assert is_correct("It is Paris.", ["paris"], "contains")
    assert not is_correct("42", ["4"], "contains")


def test_generation_scores_fake_predictions(tokenizer):
    preds = ["Paris!", "The answer is four", "red"]
    fake = FakeScorer(generations=preds, tokenizer=tokenizer)
    em = GenerationProbe("gen", GEN_ITEMS).run(fake)
    assert em.item_values == [1.0, 0.0, 0.0] and em.metric == "exact_match"
    contains = GenerationProbe("gen", GEN_ITEMS, metric="contains").run(fake)
    assert contains.item_values == [1.0, 1.0, 0.0] and contains.metric == "contains"
    assert contains.samples[1]["prediction"] == "The answer is four"
    # every item's answer is kept (samples hold only the first few) and items are named: their
    # "id" field where they have one, else their 1-based position
    assert contains.item_outputs == preds and contains.item_ids == ["1", "2", "3"]
    named = GenerationProbe("gen", [dict(it, id=f"q{i}") for i, it in enumerate(GEN_ITEMS)]).run(fake)
    assert named.item_ids == ["q0", "q1", "q2"]
    assert "item_outputs" not in named.to_dict(with_items=False)


def test_generation_uses_chat_template_for_messages(tiny_model, tokenizer):
    probe = GenerationProbe("gen", GEN_ITEMS, max_new_tokens=3)
    ids = probe._ids(tokenizer)
    chat = tokenizer.apply_chat_template(GEN_ITEMS[1]["prompt"], tokenize=False, add_generation_prompt=True)
    assert tokenizer.decode(ids[1]) == chat
    assert tokenizer.decode(ids[0]) == "Capital of France?"
    result = probe.run(Scorer(tiny_model, tokenizer))
    preds = Scorer(tiny_model, tokenizer).generate(ids, max_new_tokens=3)
    assert [s["prediction"] for s in result.samples] == preds
    assert result.n == 3


def test_generation_validation():
    with pytest.raises(DataError, match="answers"):
        GenerationProbe.validate_item(Record({"prompt": "x", "answers": "y"}, "f", 2))
    with pytest.raises(DataError, match=r"prompt\[0\]"):
        bad = {"prompt": [{"role": "bot", "content": "x"}], "answers": ["y"]}
        GenerationProbe.validate_item(Record(bad, "f", 2))


# ---------------------------------------------------------------- drift
DRIFT_ITEMS = [{"prompt": "Tell me about the moon."}, {"prompt": [{"role": "user", "content": "Hello"}]},
               {"prompt": "Short"}]


def test_drift_of_model_against_itself_is_zero(tiny_model, tokenizer):
    scorer = Scorer(tiny_model, tokenizer, batch_size=2)
    result = DriftProbe("drift", DRIFT_ITEMS).run(scorer, reference=Scorer(tiny_model, tokenizer))
    assert result.score == 1.0 and result.extra["kl"] == pytest.approx(0.0, abs=1e-6)
    shortcut = DriftProbe("drift", DRIFT_ITEMS).run(scorer, reference="self")
    assert shortcut.score == 1.0 and shortcut.extra["kl"] == 0.0


def test_drift_needs_a_reference(tiny_model, tokenizer):
    with pytest.raises(ValueError, match="reference"):
        DriftProbe("drift", DRIFT_ITEMS).run(Scorer(tiny_model, tokenizer))


def test_drift_matches_manual_kl_against_another_model(tiny_model, tokenizer):
    from conftest import make_tiny_llama

    other = make_tiny_llama(len(tokenizer), seed=1)
    result = DriftProbe("drift", DRIFT_ITEMS[:1]).run(Scorer(tiny_model, tokenizer),
                                                       reference=Scorer(other, tokenizer))
    ids = tokenizer(DRIFT_ITEMS[0]["prompt"])["input_ids"]
    ref, lp = forward_logprobs(other, ids), forward_logprobs(tiny_model, ids)
    kl = float((ref.exp() * (ref - lp)).sum(-1).mean())
    agree = float((ref.argmax(-1) == lp.argmax(-1)).float().mean())
    # a KL of ~1.3e-2 from log-probs near -11 that cancel: their float32 rounding (one ulp ~1e-6) is
    # absolute error on the KL, whatever its size; a position left out changes it by ~1e-5
    assert result.extra["kl"] == pytest.approx(kl, rel=1e-4, abs=5e-6)
    assert result.score == pytest.approx(agree)


@pytest.mark.parametrize("init,nonzero", [(False, True), (True, False)])
def test_drift_via_peft_reference_view(tiny_model, tokenizer, init, nonzero):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    config = LoraConfig(r=4, lora_alpha=64, target_modules=["q_proj", "v_proj", "o_proj"],
                        init_lora_weights=init)
    model = get_peft_model(tiny_model, config)
    result = DriftProbe("drift", DRIFT_ITEMS).run(Scorer(model, tokenizer))
    if nonzero:
        assert result.extra["kl"] > 1e-4
    else:
        assert result.extra["kl"] == pytest.approx(0.0, abs=1e-6) and result.score == 1.0
