"""The teacher starting at the first trained block (`tether.trunk`): the same logits as a whole teacher
forward, with and without shared prompt prefixes; blocks below are not run; anything that makes the
lower blocks differ (training, a non-zero frozen adapter, dropout, another batch) turns it off."""

from __future__ import annotations

import dataclasses
import gc

import pytest
import torch
from conftest import make_tiny_llama

from tether import prefix
from tether.methods._distill import lwf_kl
from tether.methods.base import Batch
from tether.models import find_blocks
from tether.training.teacher import make_reference, run_logits
from tether.trunk import Mismatch, Trunk, calls, shared_depth, trainable_below

VOCAB = 90


def frozen_half(layers: int = 4, dropout: float = 0.0, seed: int = 0):
    """A tiny Llama under LoRA with blocks 0..layers/2-1 frozen (adapters at B = 0) and the upper
    adapters' B non-zero, so teacher and student differ above the middle only."""
    from peft import LoraConfig, get_peft_model

    base = make_tiny_llama(VOCAB, hidden=32, layers=layers, seed=seed)
    cfg = LoraConfig(r=2, lora_alpha=4, lora_dropout=dropout, target_modules=["q_proj", "v_proj", "down_proj"],
                     task_type="CAUSAL_LM")
    model = get_peft_model(base, cfg)
    _, blocks = find_blocks(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for i, block in enumerate(blocks):
            for n, p in block.named_parameters():
                if i < layers // 2:
                    p.requires_grad_(False)
                elif "lora_B" in n:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return model.train(), blocks


def inputs(shared: bool, rows: int = 3, seed: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (rows, 30), generator=g)
    mask = torch.ones_like(ids)
    mask[0, -4:] = 0
    ids[mask == 0] = 0
    if shared:
        ids[:, :20] = ids[0, :20]
    batch = Batch(input_ids=ids, labels=ids.masked_fill(mask == 0, -100), attention_mask=mask)
    if shared:
        groups = prefix.plan(ids, mask)
        assert groups[0].shared == 20
        batch = dataclasses.replace(batch, prefix_groups=groups)
    return batch


def student_then_teacher(model, ref, batch):
    """What LwF does each step: the student's forward (gradients on), then the teacher on the same batch."""
    student = run_logits(model, batch)
    return student, ref(model, batch, student_ran=True)


@pytest.mark.parametrize("shared", [False, True], ids=["plain", "shared-prefix"])
def test_teacher_from_the_first_trained_block_matches_the_whole_teacher(shared):
    model, blocks = frozen_half()
    batch = inputs(shared)
    ref, whole = make_reference(model), make_reference(model, share_trunk=False)
    lower_runs = []
    hook = blocks[0].mlp.register_forward_hook(lambda *a: lower_runs.append(torch.is_grad_enabled()))
    expected = whole(model, batch)
    for step in range(3):  # 1: builds the trunk; 2: checks it against a whole forward; 3: trunk only
        lower_runs.clear()
        _, teacher = student_then_teacher(model, ref, batch)
        assert torch.allclose(teacher, expected, atol=1e-5, rtol=1e-5), step
    assert ref.trunk.depth == ref.skipped_blocks == 2
    assert lower_runs == [True] * calls(batch.prefix_groups)  # block 0 ran for the student only
    assert all("forward" not in b.__dict__ for b in blocks)  # the stubs are gone
    assert len(ref.trunk.trunk.records) == 0
    hook.remove()
    # the teacher's view differs from the student's above the frozen half (the test would be empty otherwise)
    student, _ = student_then_teacher(model, ref, batch)
    assert not torch.allclose(student, expected, atol=1e-3)


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "gradient-checkpointing"])
def test_gradients_and_the_lwf_loss_are_those_of_the_whole_teacher(checkpointing):
    grads = []
    for share in (True, False):
        model, _ = frozen_half()
        if checkpointing:  # the blocks' forwards run again in backward (records of those must not confuse it);
            # no shared prefixes then (HF drops the cache under checkpointing; the trainer turns sharing off)
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        ref = make_reference(model, share_trunk=share)
        for _ in range(3):
            model.zero_grad()
            batch = inputs(not checkpointing)
            student, teacher = student_then_teacher(model, ref, batch)
            loss = lwf_kl(student, teacher, batch.attention_mask, 2.0)
            loss.backward()
        grads.append((loss.item(), [p.grad.clone() for p in model.parameters() if p.requires_grad]))
        assert ref.trunk.depth == (2 if share else 0)
    (l1, g1), (l2, g2) = grads
    assert l1 == pytest.approx(l2, rel=1e-5)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(g1, g2))


def test_what_makes_the_lower_blocks_differ_stops_the_trunk_there():
    model, blocks = frozen_half()
    assert shared_depth(blocks) == 2
    with torch.no_grad():
        next(p for n, p in blocks[1].named_parameters() if "lora_B" in n).add_(0.1)  # frozen, not zero
    assert shared_depth(blocks) == 1
    blocks[0].self_attn.q_proj.lora_A.default.weight.requires_grad_(True)  # trains
    assert shared_depth(blocks) == 0
    _, dropped = frozen_half(dropout=0.1)
    assert shared_depth(dropped) == 0
    unfrozen = make_tiny_llama(VOCAB, layers=2)
    assert Trunk.build(unfrozen, unfrozen) is None  # a plain model, every block trains


def test_a_batch_the_student_did_not_run_falls_back_to_the_whole_teacher():
    model, _ = frozen_half()
    ref, whole = make_reference(model), make_reference(model, share_trunk=False)
    for _ in range(2):
        student_then_teacher(model, ref, inputs(False))
    assert ref.trunk.depth == 2
    other = inputs(False, rows=2, seed=1)
    run_logits(model, inputs(False))  # the student ran 3 rows; the teacher is asked about 2 others
    got = ref(model, other, student_ran=True)
    assert torch.allclose(got, whole(model, other), atol=1e-5)
    assert ref.trunk.depth == 0 and not ref.trunk.enabled


def test_trunk_replay_checks_counts_and_shapes():
    model, blocks = frozen_half()
    trunk = Trunk(blocks, blocks, 2)
    with pytest.raises(Mismatch, match="2 forwards to replay, 0 recorded"):
        trunk.take(2)
    run_logits(model, inputs(False))
    records = trunk.take(1)
    with pytest.raises(Mismatch, match="recorded"), torch.no_grad():
        with trunk.replaying(records):
            model(**inputs(False, rows=2).forward_inputs())
    assert "forward" not in blocks[0].__dict__


def test_the_recording_hook_goes_with_its_reference():
    model, blocks = frozen_half()
    ref = make_reference(model)
    for _ in range(2):
        student_then_teacher(model, ref, inputs(False))
    assert len(blocks[1]._forward_hooks) == 1
    del ref
    gc.collect()
    assert len(blocks[1]._forward_hooks) == 0
    with torch.no_grad():  # eval forwards record nothing either way
        model.eval()(**inputs(False).forward_inputs())


def test_frozen_copy_teacher_of_a_full_fine_tune_with_frozen_blocks():
    model = make_tiny_llama(VOCAB, layers=4).train()
    _, blocks = find_blocks(model)
    for block in blocks[:2]:
        block.requires_grad_(False)
    model.model.embed_tokens.requires_grad_(False)
    ref = make_reference(model)  # a frozen deep copy
    batch = inputs(True)
    expected = make_reference(model, share_trunk=False)(model, batch)
    for _ in range(3):
        _, teacher = student_then_teacher(model, ref, batch)
        assert torch.allclose(teacher, expected, atol=1e-5)
    assert ref.trunk.depth == 2
    # the embedding trains (tied to the output head): the student's activations below block 0 are its own
    model.model.embed_tokens.requires_grad_(True)
    assert trainable_below(model, find_blocks(model)[1])
    for _ in range(2):
        student_then_teacher(model, ref, batch)
    assert ref.trunk.depth == 0 and ref.trunk.trunk is None


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "gemma2", "gpt2"])
def test_each_architecture_with_a_shared_prefix(arch):
    """A frozen first block under LoRA: the teacher starts at block 1 and gives the whole teacher's logits
    (Mistral and Gemma 2 with a sliding window shorter than the 20-token prefix; Gemma scales its
    embeddings, GPT-2 adds learnt positions: both before block 0, which the trunk leaves to the model)."""
    from peft import LoraConfig, get_peft_model
    from test_prefix import tiny

    base = tiny(arch)
    targets = ["c_attn"] if arch == "gpt2" else ["q_proj", "v_proj"]
    model = get_peft_model(base, LoraConfig(r=2, lora_dropout=0.0, target_modules=targets))
    _, blocks = find_blocks(model)
    blocks[0].requires_grad_(False)
    with torch.no_grad():
        for n, p in blocks[-1].named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    model.train()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 128, (3, 26), generator=g)
    ids[:, :20] = ids[0, :20]
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0
    batch = Batch(input_ids=ids, labels=ids, attention_mask=mask, prefix_groups=prefix.plan(ids, mask))
    ref = make_reference(model)
    expected = make_reference(model, share_trunk=False)(model, batch)
    for _ in range(3):
        _, teacher = student_then_teacher(model, ref, batch)
        assert torch.allclose(teacher[mask.bool()], expected[mask.bool()], atol=1e-5)
    assert ref.trunk.depth == 1


def test_exact_under_bf16_autocast():
    """Mixed precision (Accelerate's autocast): the student's frozen blocks with zero adapters round
    exactly as the teacher's would, so the trunk stays on and its logits are the whole teacher's."""
    model, _ = frozen_half()
    ref, whole = make_reference(model), make_reference(model, share_trunk=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for shared in (False, True):
            batch = inputs(shared)
            for _ in range(3):
                _, teacher = student_then_teacher(model, ref, batch)
            assert torch.equal(teacher, whole(model, batch))
    assert ref.trunk.depth == 2
