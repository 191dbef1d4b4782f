"""One conformance suite over every registered method (scikit-learn's ``parametrize_with_checks``).

Each method builds from its default config and from a dict, reaches every hook on a 2-layer
Llama, returns finite scalar loss terms, adds nothing before it should, round-trips its state,
and composes with the others in one model without importing them.
"""

from __future__ import annotations

import ast
import copy
import math
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from tether.data.collate import Collator
from tether.data.formats import Example
from tether.methods.base import Batch, Context, Method
from tether.registry import METHODS

NAMES = METHODS.names()
METHODS_DIR = Path(__file__).resolve().parents[1] / "src" / "tether" / "methods"

TEXTS = [
    "The cat sat on the mat and looked at the birds outside.",
    "Water boils at one hundred degrees Celsius at sea level.",
    "Paris is the capital of France, and Rome is the capital of Italy.",
    "To sort a list in Python, call sorted on it.",
    "The quick brown fox jumps over the lazy dog.",
    "A triangle has three sides and its angles sum to one hundred and eighty degrees.",
    "Bread is made from flour, water, salt and yeast.",
    "The moon orbits the earth about once a month.",
]


def examples(tok, n: int, prompt_tokens: int = 3, offset: int = 0) -> list[Example]:
    out = []
    for i in range(n):
        text = f"{TEXTS[(i + offset) % len(TEXTS)]} ({i + offset})"
        ids = tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        labels = [-100] * prompt_tokens + ids[prompt_tokens:]
        out.append(Example(ids, labels, "", text))
    return out


class FrozenReference:
    """A method-agnostic ``ctx.reference`` (the `Reference` protocol): a frozen copy of the model as it is now."""

    skipped_blocks = 0

    def __init__(self, model: torch.nn.Module):
        self.teacher = copy.deepcopy(model).eval().requires_grad_(False)

    def __call__(self, _m, batch: Batch, student_ran: bool = False) -> torch.Tensor:
        with torch.no_grad():
            return self.teacher(**batch.forward_inputs()).logits


def first_batch(data, tok, size: int = 4) -> Batch:
    items = [data[i] for i in data.batches[0]] if hasattr(data, "batches") else list(data[:size])
    return Batch.from_inputs(Collator(tok.pad_token_id)(items))


def assert_terms(terms: dict, *, zero: bool = False) -> None:
    assert isinstance(terms, dict)
    for name, value in terms.items():
        assert isinstance(name, str) and isinstance(value, torch.Tensor), name
        assert value.dim() == 0 and torch.isfinite(value), (name, value)
        if zero:
            assert abs(value.item()) < 1e-6, (name, value.item())


def assert_state_equal(a, b) -> None:
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_state_equal(a[k], b[k])
    else:
        assert a == b


@pytest.mark.parametrize("name", NAMES)
def test_config_defaults_dict_and_docs(name):
    cls = METHODS.get(name)
    assert issubclass(cls, Method) and cls.registered_name == name
    default = cls()
    assert isinstance(default.config, cls.config_class)
    as_dict = default.config.model_dump(by_alias=True)
    assert cls(as_dict).config == default.config
    assert cls(cls.config_class.model_validate(as_dict)).config == default.config
    with pytest.raises(ValidationError):
        cls.config_class.model_validate({"no_such_key": 1})
    assert "https://" in cls.config_class.__doc__.splitlines()[0], "config docstring opens with the paper"


# settings a method needs to fit the 2-layer, 32-wide test model (v_proj is 16 x 32)
TINY_SETTINGS = {"oplora": {"k": 4}}


@pytest.mark.parametrize("name", NAMES)
def test_hooks_run_on_tiny_model(name, tokenizer, tiny_model):
    cls = METHODS.get(name)
    method = cls(TINY_SETTINGS.get(name))
    task, general = examples(tokenizer, 8), examples(tokenizer, 6, offset=3)
    ctx = Context(tokenizer=tokenizer, general_examples=general, task_examples=task, batch_size=4,
                  num_batches=3)
    model = method.prepare_model(tiny_model.train(), ctx)
    ctx = Context(**{**ctx.__dict__, "reference": FrozenReference(model)})
    data = method.prepare_data(task, ctx)
    batch = first_batch(data, tokenizer)
    inputs = {**batch.forward_inputs(), "labels": batch.labels}

    # nothing before it should: before and right after on_task_start, every term is 0
    assert_terms(method.extra_loss(model, batch, model(**inputs), ctx), zero=True)
    method.on_task_start(model, ctx)
    out = model(**inputs)
    terms = method.extra_loss(model, batch, out, ctx)
    assert_terms(terms, zero=True)

    (out.loss + sum(terms.values(), torch.zeros(()))).backward()
    method.before_optimizer_step(model, ctx)
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5).step()
    model.zero_grad()
    assert_terms(method.extra_loss(model, batch, model(**inputs), ctx))
    method.on_task_end(model, ctx)
    assert all(isinstance(v, float) and math.isfinite(v) for v in method.metrics().values())

    state = method.state_dict()
    fresh = cls()
    fresh.load_state_dict(copy.deepcopy(state))
    assert_state_equal(fresh.state_dict(), state)


def test_methods_compose_in_one_model(tokenizer, tiny_model):
    from tether.training.teacher import make_reference

    configs = {"lora": {"r": 4}, "freeze": {"fraction": 0.5}, "replay": {"ratio": 0.25},
               "ewc": {"fisher_samples": 4}, "lwf": {"on": "task+general", "general_batch_size": 2}}
    methods = [METHODS.get(n)(c) for n, c in configs.items()]
    task, general = examples(tokenizer, 8), examples(tokenizer, 6, offset=3)
    ctx = Context(tokenizer=tokenizer, general_examples=general, task_examples=task, batch_size=4,
                  num_batches=2)
    model = tiny_model.train()
    for m in methods:
        model = m.prepare_model(model, ctx)
    ctx = Context(**{**ctx.__dict__, "reference": make_reference(model)})
    data: object = task
    for m in methods:
        data = m.prepare_data(data, ctx)
    for m in methods:
        m.on_task_start(model, ctx)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if "layers.0." in n}
    assert frozen and all(not p.requires_grad for n, p in model.named_parameters() if "layers.0." in n)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    collate = Collator(tokenizer.pad_token_id)
    seen: set[str] = set()
    for idx in data.batches:
        batch = Batch.from_inputs(collate([data[i] for i in idx]))
        out = model(**batch.forward_inputs(), labels=batch.labels)
        terms: dict = {}
        for m in methods:
            t = m.extra_loss(model, batch, out, ctx)
            assert not set(t) & set(terms), "loss term names collide"
            terms.update(t)
        assert_terms(terms)
        seen |= set(terms)
        (out.loss + sum(terms.values())).backward()
        for m in methods:
            m.before_optimizer_step(model, ctx)
        opt.step()
        opt.zero_grad()
    assert {"ewc", "lwf", "lwf_general"} <= seen
    for m in methods:
        m.on_task_end(model, ctx)
    after = dict(model.named_parameters())
    assert all(torch.equal(v, after[n]) for n, v in frozen.items())
    metrics = {k: v for m in methods for k, v in m.metrics().items()}
    assert metrics["replay_realised_examples"] == pytest.approx(0.25)
    assert metrics["ewc_memory_mb"] > 0


def _imported_modules(source: str) -> set[str]:
    """Every module an import statement names, spelled relative to ``tether.methods``."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found |= {a.name.removeprefix("tether.methods.") for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level == 1 or base.startswith("tether.methods"):
                base = base.removeprefix("tether.methods").lstrip(".")
                found |= {base} if base else {a.name for a in node.names}
    return found


def _imported_packages(source: str) -> set[str]:
    """The package right below ``tether`` each import statement reaches (``..training.x`` -> ``training``)."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("tether.")}
        elif isinstance(node, ast.ImportFrom) and (node.level == 2 or (node.module or "").split(".")[0] == "tether"):
            module = (node.module or "").removeprefix("tether").lstrip(".")
            found |= {module.split(".")[0]} if module else {a.name for a in node.names}
    return found


def test_methods_never_import_each_other():
    """A method may import ``base`` and the private helpers (``_*.py``), never another method; no file
    under ``methods/`` imports the training layer above it (the teacher reaches LwF as ``ctx.reference``)."""
    files = {p.stem: p for p in METHODS_DIR.glob("*.py")}
    methods = {m for m in files if not m.startswith("_") and m != "base"}
    assert set(NAMES) <= methods
    for mod, path in sorted(files.items()):
        source = path.read_text()
        siblings = _imported_modules(source) & (methods - {mod})
        assert not siblings, f"methods/{mod}.py imports sibling method(s) {sorted(siblings)}"
        assert "training" not in _imported_packages(source), f"methods/{mod}.py imports tether.training"
    assert _imported_modules("from .lora import x\nfrom . import ewc\nimport tether.methods.lwf\n"
                             "from ._distill import lwf_kl") == {"lora", "ewc", "lwf", "_distill"}
    assert _imported_packages("from ..training.teacher import x\nimport tether.training.trainer\n"
                              "from .. import prefix\nfrom tether import trunk\nfrom .base import Batch") == {
        "training", "prefix", "trunk"}
