"""OPLoRA: the projected update leaves the base weight's top-k singular triplets untouched."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_llama
from pydantic import ValidationError
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from tether.methods import oplora as op
from tether.methods._lora_family import lora_layers
from tether.methods.base import Context
from tether.methods.oplora import OPLoRA, OPLoRAConfig, OPLoRALinear, merge, top_k_singular
from tether.registry import METHODS

VOCAB = 128


def orthonormal(d: int, k: int, seed: int) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(d, k, generator=torch.Generator().manual_seed(seed)))[0]


def test_config_and_registration():
    assert METHODS.get("oplora") is OPLoRA
    with pytest.raises(ValidationError, match="oplora.k must be > 0"):
        OPLoRAConfig(k=0)
    with pytest.raises(ValidationError, match="oplora.oversample must be >= 0"):
        OPLoRAConfig(oversample=-1)
    with pytest.raises(ValidationError):
        OPLoRAConfig(rank=4)
    with pytest.raises(ValueError, match="oplora.k=16 must be < min"):  # v_proj is 16 x 32 in the tiny model
        OPLoRA().prepare_model(make_tiny_llama(VOCAB), Context())
    with pytest.raises(ValueError, match="'nope' matched no module"):
        OPLoRA({"k": 2, "target_modules": ["nope"]}).prepare_model(make_tiny_llama(VOCAB), Context())


def test_forward_matches_the_dense_projected_update():
    torch.manual_seed(0)
    base = nn.Linear(12, 10)
    U, V = orthonormal(10, 3, 1), orthonormal(12, 3, 2)
    layer = OPLoRALinear(base, r=4, alpha=8, U_k=U, V_k=V)
    nn.init.normal_(layer.lora_B)
    x = torch.randn(5, 7, 12)
    P_U, P_V = torch.eye(10) - U @ U.T, torch.eye(12) - V @ V.T
    dW = 2.0 * P_U @ layer.lora_B @ layer.lora_A @ P_V
    assert torch.allclose(layer.delta_weight(), dW, atol=1e-5)
    assert torch.allclose(layer(x), base(x) + x @ dW.T, atol=1e-5)
    assert max(layer.rho_k()) < 1e-10  # no energy of the applied update inside the protected subspaces
    with torch.no_grad():
        raw = (U.T @ layer.lora_B @ layer.lora_A).norm() ** 2 / (layer.lora_B @ layer.lora_A).norm() ** 2
    assert layer.raw_share() == pytest.approx(float(raw), rel=1e-4) and raw > 0.01  # what projecting strips


def test_randomised_svd_is_accurate_and_leaves_the_global_rng_alone():
    g = torch.Generator().manual_seed(0)
    Q1 = torch.linalg.qr(torch.randn(300, 200, generator=g))[0]
    Q2 = torch.linalg.qr(torch.randn(200, 200, generator=g))[0]
    W = Q1 @ torch.diag(0.9 ** torch.arange(200.0) + 0.01) @ Q2.T  # a decaying spectrum, like trained weights
    U0, S0, Vh0 = torch.linalg.svd(W)
    state = torch.get_rng_state()
    U, S, V = top_k_singular(W, 16, niter=4, oversample=10)
    assert torch.equal(state, torch.get_rng_state())
    assert torch.allclose(S, S0[:16], rtol=1e-4)
    assert (U.T @ U0[:, :16]).diag().abs().min() > 0.999
    assert (V.T @ Vh0[:16].T).diag().abs().min() > 0.999


def test_training_then_merge_keeps_the_top_k_singular_triplets():
    k = 4
    model = make_tiny_llama(VOCAB)
    base_w = {}
    with torch.no_grad():
        for n, m in model.named_modules():
            if n.endswith(("q_proj", "v_proj")):
                # a random init has no spectral gap; pre-trained weights have a dominant top, so give it one
                U, S, Vh = torch.linalg.svd(m.weight, full_matrices=False)
                S[:k] *= 2
                m.weight.copy_(U @ torch.diag(S) @ Vh)
                base_w[n] = m.weight.detach().clone()
    method = OPLoRA({"r": 4, "alpha": 8, "k": k, "oversample": 32})  # k + oversample >= 32: exact SVD here
    model = method.prepare_model(model, Context())
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert len(trainable) == 8 and all(n.endswith(("lora_A", "lora_B")) for n in trainable)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    g = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(6):  # random targets
        ids = torch.randint(3, VOCAB, (4, 10), generator=g)
        model(input_ids=ids, labels=torch.randint(3, VOCAB, (4, 10), generator=g)).loss.backward()
        method.before_optimizer_step(model, Context())
        opt.step()
        opt.zero_grad()
    assert method.metrics()["rho_k_max"] < 1e-8
    ids = torch.randint(3, VOCAB, (2, 9), generator=g)
    with torch.no_grad():
        before = model.eval()(input_ids=ids).logits
        merged = merge(model)
        after = merged(input_ids=ids).logits
    assert not lora_layers(merged, of=OPLoRALinear) and torch.allclose(before, after, atol=1e-5)
    for name, W0 in base_w.items():
        W1 = merged.get_submodule(name).weight.detach()
        assert isinstance(merged.get_submodule(name), nn.Linear)
        assert (W1 - W0).norm() > 1e-2 * W0.norm()  # it did learn something
        U0, S0, Vh0 = torch.linalg.svd(W0.double())
        U1, S1, Vh1 = torch.linalg.svd(W1.double())
        assert torch.allclose(S1[:k], S0[:k], rtol=1e-5, atol=1e-7), name
        assert ((U1[:, :k] * U0[:, :k]).sum(0).abs() > 1 - 1e-5).all(), name
        assert ((Vh1[:k] * Vh0[:k]).sum(1).abs() > 1 - 1e-5).all(), name
        assert torch.allclose(W1 @ Vh0[:k].T.float(), W0 @ Vh0[:k].T.float(), atol=1e-6)  # W' V_k = W V_k


def test_projection_never_forms_a_d_by_d_matrix():
    class Shapes(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.largest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            ins = {a.untyped_storage().data_ptr() for a in args if isinstance(a, torch.Tensor)}
            for o in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(o, torch.Tensor) and o.untyped_storage().data_ptr() not in ins:  # skip views
                    self.largest = max(self.largest, o.numel())
            return out

    d, k, r = 2048, 16, 8
    layer = OPLoRALinear(nn.Linear(d, d, bias=False), r=r, alpha=16, U_k=orthonormal(d, k, 0),
                         V_k=orthonormal(d, k, 1))
    x = torch.randn(2, 4, d)
    with Shapes() as mode:
        layer(x).sum().backward()
    assert layer.lora_A.grad is not None
    assert mode.largest <= 8 * d * max(k, r)  # O(d k) allocations; a projector would be d * d = 4M


def test_svd_cache_in_memory_and_on_disk(tmp_path, monkeypatch):
    cfg = {"k": 2, "svd_cache_dir": str(tmp_path / "svd")}
    OPLoRA(cfg).prepare_model(make_tiny_llama(VOCAB), Context())
    assert len(list((tmp_path / "svd").glob("*.pt"))) == 4  # q_proj and v_proj of two layers

    def boom(*a, **kw):
        raise AssertionError("recomputed an SVD that was cached")

    monkeypatch.setattr(op, "top_k_singular", boom)
    method = OPLoRA(cfg)
    method.prepare_model(make_tiny_llama(VOCAB), Context())  # same weights: loaded from disk
    assert len(method.svd_cache_) == 4
    with pytest.raises(AssertionError, match="recomputed"):  # other weights, same names: not trusted
        OPLoRA(cfg).prepare_model(make_tiny_llama(VOCAB, seed=1), Context())


def test_save_model_writes_a_merged_loadable_model(tmp_path):
    from transformers import LlamaForCausalLM

    method = OPLoRA({"k": 2})
    model = method.prepare_model(make_tiny_llama(VOCAB), Context())
    for layer in lora_layers(model, of=OPLoRALinear).values():
        nn.init.normal_(layer.lora_B, std=0.1)
    method.save_model(model, tmp_path / "model")
    assert lora_layers(model, of=OPLoRALinear)  # the training model keeps its adapters
    loaded = LlamaForCausalLM.from_pretrained(tmp_path / "model").eval()
    ids = torch.randint(3, VOCAB, (2, 7))
    with torch.no_grad():
        assert torch.allclose(loaded(input_ids=ids).logits, model.eval()(input_ids=ids).logits, atol=1e-5)
    other = OPLoRA({"k": 2})
    method.before_optimizer_step(model, Context())
    other.load_state_dict(method.state_dict())
    assert other.metrics() == method.metrics()
