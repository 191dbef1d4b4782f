"""tether's multiple-choice numbers equal lm-evaluation-harness's on the same model, item by item.

Both score the same in-memory SmolLM2: lm-eval through ``HFLM.loglikelihood`` with the requests its
multiple-choice tasks build (context, ``" " + choice``), tether through its probe. Log-likelihoods
agree to float noise and the acc / acc_norm decisions agree except on numerical ties.
"""

from __future__ import annotations

import numpy as np
import pytest

from tether.probes.multiple_choice import MultipleChoiceProbe, decisions
from tether.probes.scorer import Scorer

QUESTIONS = [
    ("What is the capital of France?", ["Paris", "London", "Berlin", "Madrid"], 0),
    ("How many legs does a spider have?", ["six", "eight", "four", "ten"], 1),
    ("Which planet is known as the Red Planet?", ["Venus", "Jupiter", "Mars", "Saturn"], 2),
    ("What gas do plants absorb for photosynthesis?", ["oxygen", "nitrogen", "helium", "carbon dioxide"], 3),
    ("What is the boiling point of water in Celsius?", ["100 degrees", "50 degrees", "0 degrees", "212"], 0),
    ("Who wrote Romeo and Juliet?", ["Charles Dickens", "William Shakespeare", "Jane Austen", "Homer"], 1),
    ("What is the largest ocean on Earth?", ["Atlantic", "Indian Ocean", "Pacific Ocean", "Arctic Ocean"], 2),
    ("How many days are there in a leap year?", ["365", "364", "360", "366"], 3),
    ("What is the chemical symbol for gold?", ["Au", "Ag", "Gd", "Go"], 0),
    ("Which animal is the largest mammal?", ["elephant", "blue whale", "giraffe", "hippopotamus"], 1),
    ("What is 7 times 8?", ["54", "58", "56", "64"], 2),
    ("Which language is mainly spoken in Brazil?", ["Spanish", "English", "French", "Portuguese"], 3),
    ("What is the freezing point of water in Fahrenheit?", ["32 degrees", "0 degrees", "100", "-40"], 0),
    ("Which organ pumps blood through the body?", ["the lungs", "the heart", "the liver", "the kidneys"], 1),
    ("What is the smallest prime number?", ["one", "zero", "two", "three"], 2),
    ("In which continent is Kenya?", ["Asia", "Europe", "South America", "Africa"], 3),
    ("What do bees make?", ["honey", "milk", "silk", "wax paper"], 0),
    ("How many continents are there?", ["five", "seven", "six", "eight"], 1),
    ("Which metal is liquid at room temperature?", ["iron", "copper", "mercury", "aluminium"], 2),
    ("What is the square root of 81?", ["7", "8", "10", "9"], 3),
]
ITEMS = [{"query": f"Question: {q}\nAnswer:", "choices": c, "gold": g} for q, c, g in QUESTIONS]


def _tied(lls, tol=1e-3):
    top = np.sort(np.asarray(lls))[::-1]
    return top[0] - top[1] < tol


@pytest.mark.slow
def test_multiple_choice_matches_lm_eval_harness(smollm2):
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    model, tok = smollm2
    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=16)
    requests = [Instance(request_type="loglikelihood", doc=it, arguments=(it["query"], " " + c), idx=i)
                for it in ITEMS for i, c in enumerate(it["choices"])]
    harness = lm.loglikelihood(requests, disable_tqdm=True)

    probe = MultipleChoiceProbe("mc", ITEMS)
    scorer = Scorer(model, tok, batch_size=16)
    ours = scorer.loglikelihood(probe._build(tok))
    assert [a for a, _ in ours] == pytest.approx([a for a, _ in harness], abs=1e-3)
    assert [g for _, g in ours] == [g for _, g in harness]

    k, compared = 0, 0
    for it in ITEMS:
        n = len(it["choices"])
        h_ll, t_ll = [x for x, _ in harness[k:k + n]], [x for x, _ in ours[k:k + n]]
        k += n
        norm = [x / len(c) for x, c in zip(h_ll, it["choices"])]
        if _tied(h_ll) or _tied(norm):
            continue
        compared += 1
        assert decisions(t_ll, it["choices"]) == decisions(h_ll, it["choices"])
    assert compared >= len(ITEMS) - 2

    result = probe.run(scorer)
    h_acc = np.mean([decisions([x for x, _ in harness[4 * i:4 * i + 4]], it["choices"])[0] == it["gold"]
                     for i, it in enumerate(ITEMS)])
    assert result.extra["acc"] == pytest.approx(h_acc)
    assert result.score > 0.5  # SmolLM2 knows most of these
