"""LoRA: wraps with PEFT, trains only the adapter, fails on a target that matches nothing, and
saves an adapter PEFT can load or a merged model transformers can load."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_llama
from pydantic import ValidationError

from tether.methods.base import Context
from tether.methods.lora import LoRA, LoraMethodConfig

VOCAB = 64


def ids() -> torch.Tensor:
    return torch.randint(3, VOCAB, (2, 6), generator=torch.Generator().manual_seed(0))


def wrapped(config: dict | None = None):
    method = LoRA(config or {"r": 4})
    model = method.prepare_model(make_tiny_llama(VOCAB, hidden=16), Context())
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.3)
    return method, model.eval()


def test_wraps_trains_only_the_adapter_and_logs_matches(caplog):
    with caplog.at_level("INFO"):
        method, model = wrapped()
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A.default." in n or ".lora_B.default." in n for n in trainable)
    assert len(trainable) == 2 * 7 * 2  # A and B, seven projections, two layers
    assert "on 14 modules" in caplog.text and "q_proj x2" in caplog.text
    assert model.peft_config["default"].r == 4 and model.peft_config["default"].lora_alpha == 32


def test_all_linear_and_existing_peft_model():
    method, model = wrapped({"r": 2, "target_modules": "all-linear"})
    names = {n for n, m in model.named_modules() if hasattr(m, "lora_A")}
    assert any(n.endswith("mlp.down_proj") for n in names) and not any(n.endswith("lm_head") for n in names)
    second = LoRA({"r": 2, "target_modules": ["q_proj"], "adapter_name": "second"})
    again = second.prepare_model(model, Context())
    assert again is model and set(model.peft_config) == {"default", "second"}
    assert any(".lora_A.second." in n and p.requires_grad for n, p in model.named_parameters())


def test_target_matching_nothing_names_it():
    with pytest.raises(ValueError, match=r"lora.target_modules: 'qproj' matched no module"):
        method = LoRA({"target_modules": ["q_proj", "qproj"]})
        method.prepare_model(make_tiny_llama(VOCAB, hidden=16), Context())


def test_save_adapter_loads_with_peft(tmp_path):
    from peft import PeftModel

    method, model = wrapped()
    out = method.save_model(model, tmp_path / "adapter")
    assert (out / "adapter_config.json").exists() and (out / "adapter_model.safetensors").exists()
    loaded = PeftModel.from_pretrained(make_tiny_llama(VOCAB, hidden=16), out).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids()).logits, model(input_ids=ids()).logits)


def test_adapters_nothing_trains_are_dropped_and_the_adapter_reloads_without_them(tmp_path, recwarn):
    """freeze after LoRA (the default recipe): block 0's adapters are frozen with B = 0. on_task_start takes
    them off (the forward no longer runs them, the saved adapter leaves them out), the model's outputs are
    unchanged, and PEFT reloads the adapter onto exactly the modules that kept it, with nothing missing."""
    from peft import PeftModel

    from tether.methods.freeze import Freeze

    method = LoRA({"r": 4, "target_modules": ["q_proj", "v_proj", "down_proj"]})
    model = method.prepare_model(make_tiny_llama(VOCAB, hidden=16, layers=4), Context())
    model = Freeze({"fraction": 0.5}).prepare_model(model, Context())
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n and p.requires_grad:
                p.normal_(0, 0.5)
        before = model.eval()(input_ids=ids()).logits
    method.on_task_start(model, Context())
    kept = sorted(n for n, m in model.get_base_model().named_modules() if hasattr(m, "lora_A"))
    assert kept == [f"model.layers.{i}.{m}" for i in (2, 3) for m in ("mlp.down_proj", "self_attn.q_proj",
                                                                      "self_attn.v_proj")]
    assert sorted(model.peft_config["default"].exclude_modules) == [
        f"model.layers.{i}.{m}" for i in (0, 1) for m in ("mlp.down_proj", "self_attn.q_proj", "self_attn.v_proj")]
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids()).logits, before)
    out = method.save_model(model, tmp_path / "adapter")
    from safetensors.torch import load_file

    assert not any(".layers.0." in k or ".layers.1." in k for k in load_file(out / "adapter_model.safetensors"))
    loaded = PeftModel.from_pretrained(make_tiny_llama(VOCAB, hidden=16, layers=4), out).eval()
    assert sorted(n for n, m in loaded.get_base_model().named_modules() if hasattr(m, "lora_A")) == kept
    assert not [w for w in recwarn if "missing" in str(w.message).lower()]
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids()).logits, before)


def test_save_merged_loads_with_transformers_and_keeps_the_adapter(tmp_path):
    from transformers import AutoModelForCausalLM

    method, model = wrapped({"r": 4, "merge_on_save": True})
    out = method.save_model(model, tmp_path / "merged")
    assert (out / "config.json").exists() and not (out / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids()).logits, model(input_ids=ids()).logits,
                                   rtol=1e-4, atol=1e-5)
    assert any("lora_A" in n for n, _ in model.named_parameters()), "the training model keeps its adapter"
    with pytest.raises(ValueError, match="PEFT-wrapped"):
        method.save_model(make_tiny_llama(VOCAB, hidden=16), tmp_path / "x", merge=False)


def test_config_errors():
    with pytest.raises(ValidationError, match="lora.r must be > 0"):
        LoraMethodConfig(r=0)
    with pytest.raises(ValidationError, match=r"lora.dropout must be in \[0, 1\)"):
        LoraMethodConfig(dropout=1.0)
    with pytest.raises(ValidationError, match="lora.target_modules"):
        LoraMethodConfig(target_modules=[])
    with pytest.raises(ValidationError):
        LoraMethodConfig(target_modules="everything")


def test_lora_family_settings_and_targets_fail_naming_each_methods_key():
    """LoRA, O-LoRA and OPLoRA share one config base and one target matcher; errors name the method's key."""
    from tether.methods._lora_family import match_targets
    from tether.methods.olora import OLoRAConfig
    from tether.methods.oplora import OPLoRAConfig

    for cls in (LoraMethodConfig, OLoRAConfig, OPLoRAConfig):
        for bad, msg in (({"r": 0}, "r must be > 0"), ({"alpha": 0}, "alpha must be > 0"),
                         ({"dropout": 1.0}, r"dropout must be in \[0, 1\)"),
                         ({"target_modules": [""]}, "target_modules must be")):
            with pytest.raises(ValidationError, match=f"{cls.key}.{msg}"):
                cls(**bad)
    with pytest.raises(ValueError, match=r"x.target_modules: 'nope', 'nah' matched no module"):
        match_targets(make_tiny_llama(VOCAB, hidden=16), ["q_proj", "nope", "nah"], "x")
    found = match_targets(make_tiny_llama(VOCAB, hidden=16), ["v_proj", "q_proj"], "x")
    assert list(found) == ["model.layers.0.self_attn.v_proj", "model.layers.1.self_attn.v_proj",
                           "model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]


def test_eva_init_starts_at_the_base_with_a_from_the_task_inputs_principal_directions():
    """``init: eva``: B = 0 (the model is the base, the disabled view stays the base), each A has
    orthonormal rows spanning the leading principal directions of its layer's inputs on the task
    data, and the same seed gives the same A."""
    from tether.data.formats import Example

    g = torch.Generator().manual_seed(1)
    examples = [Example(x := torch.randint(3, VOCAB, (12,), generator=g).tolist(), [-100] * 10 + x[10:], "", "")
                for _ in range(32)]
    base = make_tiny_llama(VOCAB, hidden=16).eval()
    inputs = []
    hook = base.model.layers[0].self_attn.q_proj.register_forward_hook(lambda m, a, out: inputs.append(a[0]))
    with torch.no_grad():
        reference = base(input_ids=torch.tensor([e.input_ids for e in examples])).logits
    hook.remove()
    x = torch.cat(inputs).reshape(-1, 16)
    top = torch.linalg.svd(x - x.mean(0), full_matrices=False).Vh

    def eva(seed):
        model = make_tiny_llama(VOCAB, hidden=16).eval()
        ctx = Context(task_examples=examples, batch_size=8, seed=seed)
        model = LoRA({"r": 4, "init": "eva"}).prepare_model(model, ctx)
        return model.eval(), model.base_model.model.model.layers[0].self_attn.q_proj

    model, layer = eva(0)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=torch.tensor([e.input_ids for e in examples])).logits, reference)
    a, b = layer.lora_A["default"].weight.detach(), layer.lora_B["default"].weight.detach()
    assert torch.count_nonzero(b) == 0
    torch.testing.assert_close(a @ a.T, torch.eye(4), atol=1e-4, rtol=0)
    # the cosines of the principal angles between A's rows and the inputs' two leading directions
    assert torch.linalg.svdvals(top[:2] @ a.T).min() > 0.95  # a random A: ~0.5 (EVA stops its SVD early)
    assert torch.equal(a, eva(0)[1].lora_A["default"].weight.detach())
    assert all(p.requires_grad for n, p in model.named_parameters() if "lora_" in n)
    with pytest.raises(ValueError, match="needs the task data"):
        LoRA({"r": 4, "init": "eva"}).prepare_model(make_tiny_llama(VOCAB, hidden=16), Context())


def _rows(lo: int, hi: int, n: int, seed: int, length: int = 12):
    from tether.data.formats import Example

    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x = torch.randint(lo, hi, (length,), generator=g).tolist()
        out.append(Example(x, [-100] * (length - 2) + x[-2:], "", ""))
    return out


def _q_inputs(model, examples, layer: int = 1) -> torch.Tensor:
    """Every position's input to block ``layer``'s q_proj, by a plain hook (no sharing, no cap)."""
    seen = []
    mod = model.get_base_model().model.layers[layer].self_attn.q_proj
    h = mod.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach()))
    with torch.no_grad():
        model(input_ids=torch.tensor([e.input_ids for e in examples]))
    h.remove()
    return torch.cat(seen).reshape(-1, seen[0].shape[-1]).double()


def test_input_moments_match_a_plain_hook_and_share_one_matrix_per_input():
    from tether.data.collate import Collator
    from tether.methods._contrast_init import input_moments

    examples = _rows(3, VOCAB, 24, seed=2)
    model = LoRA({"r": 4}).prepare_model(make_tiny_llama(VOCAB, hidden=16), Context()).eval()
    layers = {n: m for n, m in model.named_modules() if "default" in getattr(m, "lora_A", {})}
    batches = [Collator.for_tokenizer(None)(examples[i:i + 8]) for i in range(0, 24, 8)]
    moments, count = input_moments(model, layers, batches)
    assert count == 24 * 12 and set(moments) == set(layers)
    x = _q_inputs(model, examples)
    q = "base_model.model.model.layers.1.self_attn."
    want = x.T @ x / len(x)
    # the moments come from float32 products per batch of 8 (the reference: float64 on one batch of 24), so
    # they match to float32 accumulation error, relative to the matrix's scale
    torch.testing.assert_close(moments[q + "q_proj"], want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
    assert moments[q + "q_proj"] is moments[q + "k_proj"] is moments[q + "v_proj"]
    assert moments[q + "o_proj"] is not moments[q + "q_proj"]
    # the cap: reading stops once enough positions are in (whole batches)
    assert input_moments(model, layers, batches, positions=100)[1] == 2 * 8 * 12
    # a chunk of the first block's layers (each forward stops at its last one) gives the same matrices
    first = {n: m for n, m in layers.items() if ".layers.0." in n}
    part, _ = input_moments(model, first, batches)
    assert all(torch.equal(part[n], moments[n]) for n in first)


def test_moment_chunks_split_by_budget_and_keep_order():
    from tether.methods._contrast_init import moment_chunks

    model = LoRA({"r": 4}).prepare_model(make_tiny_llama(VOCAB, hidden=16), Context())
    layers = {n: m for n, m in model.named_modules() if "default" in getattr(m, "lora_A", {})}
    assert moment_chunks(layers, "default") == [layers]
    chunks = moment_chunks(layers, "default", budget=7 * 2 * 8 * 16**2)  # 7 layers of 16 inputs; down is 32
    assert [n for c in chunks for n in c] == list(layers) and len(chunks) > 2
    assert all(len(c) == 1 for c in moment_chunks(layers, "default", budget=1))


def test_contrast_init_points_a_where_task_inputs_outweigh_general_ones():
    """``init: contrast``: B = 0 (the model starts as the base), each trained A's rows are unit vectors
    whose task-to-general energy ratio is the generalised eigenproblem's largest (checked against an
    eigen-solve of ``(C_general + ridge)^-1 C_task``) and far above a random direction's; adapters
    that do not train (frozen by a later method) are taken off their modules; ``freeze_a`` trains B only."""
    from tether.methods._contrast_init import contrast_directions

    task, general = _rows(3, 12, 32, seed=3), _rows(12, VOCAB, 64, seed=4)
    probe = _rows(3, VOCAB, 4, seed=5)

    def build(config):
        method = LoRA({"r": 4, **config})
        model = method.prepare_model(make_tiny_llama(VOCAB, hidden=16), Context()).eval()
        return method, model

    method, model = build({"init": "contrast"})
    assert method.needs_general and not LoRA({"r": 4}).needs_general
    with torch.no_grad():
        before = model(input_ids=torch.tensor([e.input_ids for e in probe])).logits
    layers = model.get_base_model().model.layers
    for p in layers[0].parameters():  # block 0 frozen, as freeze: would after LoRA's prepare_model
        p.requires_grad_(False)
    ctx = Context(task_examples=task, general_examples=general, batch_size=8, seed=0)
    method.on_task_start(model, ctx)
    method.on_task_start(model, ctx)  # once per run: a second task start changes nothing
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=torch.tensor([e.input_ids for e in probe])).logits, before)
    assert not hasattr(layers[0].self_attn.q_proj, "lora_A")  # frozen with B = 0: dropped
    assert "model.layers.0.self_attn.q_proj" in model.peft_config["default"].exclude_modules

    a = layers[1].self_attn.q_proj.lora_A["default"].weight.detach().double()
    torch.testing.assert_close(a.norm(dim=1), torch.ones(4, dtype=torch.float64))
    xt, xg = _q_inputs(model, task), _q_inputs(model, general)
    ct, cg = xt.T @ xt / len(xt), xg.T @ xg / len(xg)
    reg = cg + 1e-2 * torch.trace(cg) / 16 * torch.eye(16, dtype=torch.float64)

    def ratio(v):
        return (v @ ct @ v) / (v @ reg @ v)

    top = torch.linalg.eigvals(torch.linalg.solve(reg, ct)).real.sort(descending=True).values[:4]
    torch.testing.assert_close(torch.stack([ratio(v) for v in a]), top, rtol=1e-3, atol=0)
    torch.testing.assert_close(torch.stack([ratio(v) for v in contrast_directions(ct, cg, 4).double().T]), top,
                               rtol=1e-3, atol=0)
    rand = torch.randn(200, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    best_random = max(ratio(v) for v in rand)
    assert ratio(a[0]) > 2 * best_random and min(ratio(v) for v in a) > best_random

    # several passes over the batches (a budget too small for all the moments at once): the same A
    import tether.methods._contrast_init as contrast_init

    chunked, chunked_model = build({"init": "contrast"})
    for p in chunked_model.get_base_model().model.layers[0].parameters():
        p.requires_grad_(False)
    budget, contrast_init.MOMENT_BYTES = contrast_init.MOMENT_BYTES, 2 * 8 * 16**2
    try:
        chunked.on_task_start(chunked_model, ctx)
    finally:
        contrast_init.MOMENT_BYTES = budget
    for (n, p), (n2, p2) in zip(model.named_parameters(), chunked_model.named_parameters()):
        assert n == n2 and torch.equal(p, p2), n

    method, model = build({"init": "contrast", "freeze_a": True})
    train = [n for n, p in model.named_parameters() if p.requires_grad]
    assert train and all(".lora_B." in n for n in train)
    with pytest.raises(ValueError, match="needs general data"):
        method.on_task_start(model, Context(task_examples=task, batch_size=8))


def test_answer_tokens_train_only_their_tied_rows_keep_the_base_view_and_reload(tmp_path):
    """lora.trainable_tokens 'answers': the answers' non-special tokens get trainable embedding rows
    (the output rows too, tied); nothing else of the embedding moves, the adapter-disabled teacher is
    still the base model, and the saved adapter reloads with PEFT to the same logits."""
    from types import SimpleNamespace

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from tether.methods.base import Batch
    from tether.training.teacher import make_reference

    tok = SimpleNamespace(all_special_ids=[2], decode=lambda t: str(t))
    task = [SimpleNamespace(labels=[-100, -100, 5, 7, 2]), SimpleNamespace(labels=[-100, 9, 2])]
    method = LoRA({"r": 4, "trainable_tokens": "answers"})
    assert method.answer_tokens(Context(tokenizer=tok, task_examples=task)) == [5, 7, 9]
    base = make_tiny_llama(VOCAB, hidden=16)
    x = ids()
    with torch.no_grad():
        base_logits = base(input_ids=x).logits.clone()
        base_embed = base.get_input_embeddings().weight.detach().clone()
    model = method.prepare_model(base, Context(tokenizer=tok, task_examples=task))
    deltas = [(n, p) for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n]
    assert [p.shape for _, p in deltas] == [torch.Size([3, 16])] and "trainable_tokens_delta" in deltas[0][0]

    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for _ in range(3):
        loss = torch.nn.functional.cross_entropy(model(input_ids=x).logits[:, :-1].reshape(-1, VOCAB),
                                                 torch.full((x.numel() - 2,), 7))
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        embed = model.get_input_embeddings().weight
        moved = (embed - base_embed).abs().sum(-1).nonzero().squeeze(-1).tolist()
        assert moved == [5, 7, 9]
        assert torch.equal(model.get_output_embeddings().weight, embed)  # tied: the output rows moved with them
        trained = model(input_ids=x).logits
        assert not torch.allclose(trained, base_logits, atol=1e-3)
        teacher = make_reference(model)(model, Batch(input_ids=x, labels=x))
        assert torch.allclose(teacher, base_logits, atol=1e-5)

    method.save_model(model, tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(make_tiny_llama(VOCAB, hidden=16), tmp_path / "adapter").eval()
    method.save_model(model, tmp_path / "merged", merge=True)  # the rows folded into the (tied) embedding
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        assert torch.allclose(reloaded(input_ids=x).logits, trained, atol=1e-5)
        assert torch.allclose(merged(input_ids=x).logits, trained, atol=1e-5)

    with pytest.raises(ValueError, match="needs the task data"):
        LoRA({"trainable_tokens": "answers"}).prepare_model(make_tiny_llama(VOCAB, hidden=16), Context())
    with pytest.raises(ValueError, match="no non-special token"):
        LoRA({"trainable_tokens": "answers"}).answer_tokens(
            Context(tokenizer=tok, task_examples=[SimpleNamespace(labels=[-100, 2])]))
