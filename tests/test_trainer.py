"""TetherTrainer wiring: extra loss terms weigh the same at any gradient accumulation; DDP via torchrun."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from tether.data.collate import Collator
from tether.methods.base import Batch, Context, Method
from tether.registry import METHODS
from tether.training.trainer import TetherTrainer, training_arguments, weighted_example_loss


class EqualExamples(Method):
    """Every example weighs the same (what replay's ``balance_loss`` asks for)."""

    def example_weights(self, batch, ctx):
        return torch.ones(batch.input_ids.shape[0])


def run_steps(tokenizer, batch_size, grad_accum, tmp_path, ewc_lambda, weighted=False):
    from tests.conftest import make_tiny_llama
    from tether.config import TrainingSpec

    model = make_tiny_llama(len(tokenizer)).train()
    g = torch.Generator().manual_seed(0)
    lengths = [5, 9, 7, 12, 6, 8, 10, 11]
    data = [{"input_ids": (ids := torch.randint(3, 400, (n,), generator=g).tolist()), "labels": ids} for n in lengths]
    ewc = METHODS.get("ewc")({"lambda": ewc_lambda})
    # anchor somewhere else than the start so the penalty has a gradient from step one
    ewc.anchor_ = {n: p.detach() + 0.05 for n, p in model.named_parameters()}
    ewc.fisher_ = {n: torch.ones_like(p) for n, p in model.named_parameters()}
    spec = TrainingSpec(max_steps=1, batch_size=batch_size, grad_accum=grad_accum, lr=0.1, logging_steps=1)
    args = training_arguments(spec, str(tmp_path / f"o{batch_size}"))
    args.optim = "sgd"
    methods = {"ewc": ewc, **({"w": EqualExamples()} if weighted else {})}
    trainer = TetherTrainer(model=model, args=args, train_dataset=data, data_collator=Collator(0),
                            methods=methods, context=Context(grad_accum_steps=grad_accum))
    trainer.get_train_dataloader = _sequential(trainer, batch_size)
    trainer.train()
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _sequential(trainer, batch_size):
    def loader():
        dl = torch.utils.data.DataLoader(trainer.train_dataset, batch_size=batch_size, shuffle=False,
                                         collate_fn=trainer.data_collator)
        return trainer.accelerator.prepare(dl)
    return loader


@pytest.mark.parametrize("ewc_lambda", [0.0, 50.0])
@pytest.mark.parametrize("weighted", [False, True])
def test_extra_loss_weighs_the_same_at_any_accumulation(tokenizer, tmp_path, ewc_lambda, weighted):
    one = run_steps(tokenizer, 8, 1, tmp_path, ewc_lambda, weighted)
    two = run_steps(tokenizer, 4, 2, tmp_path, ewc_lambda, weighted)
    for n in one:
        assert torch.allclose(one[n], two[n], atol=1e-6), n


def test_weighted_example_loss_averages_within_each_example_first():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 6, 11, generator=g)
    labels = torch.full((3, 6), -100)
    labels[0, 1:6] = torch.tensor([1, 2, 3, 4, 5])  # 5 targets
    labels[1, 5] = 7  # 1 target
    # row 2 has none: it must not count
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), labels[:, 1:], ignore_index=-100,
                                            reduction="none")
    per = [nll[0].sum() / 5, nll[1].sum()]
    got = weighted_example_loss(logits, labels, torch.ones(3))
    assert got.item() == pytest.approx(((per[0] + per[1]) / 2).item(), rel=1e-5)
    got = weighted_example_loss(logits, labels, torch.tensor([1.0, 3.0, 5.0]))
    assert got.item() == pytest.approx(((per[0] + 3 * per[1]) / 4).item(), rel=1e-5)
    plain = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 11), labels[:, 1:].reshape(-1))
    assert plain.item() != pytest.approx(got.item())  # the per-token mean is a different loss


TORCHRUN = shutil.which("torchrun") or os.path.join(os.path.dirname(sys.executable), "torchrun")


@pytest.mark.skipif(not os.path.exists(TORCHRUN), reason="torchrun not installed")
def test_train_under_torchrun_two_processes(tmp_path, tiny_model_dir, tiny_task, tiny_suite):
    """The same `tether train` under torchrun (2 CPU processes, gloo): one run directory, one model."""
    run = tmp_path / "ddp"
    cmd = [TORCHRUN, "--nproc_per_node=2", "--master_port=29533", "-m", "tether.cli", "train",
           "--task", str(tiny_task[0]), "--eval", str(tiny_task[1]), "--model", str(tiny_model_dir), "-o", str(run),
           "--set", f"general={tiny_suite}", "--set", f"guard.suite={tiny_suite}", "--set", "guard.every=2",
           "--set", "guard.action=warn", "--set", "training.max_steps=2", "--set", "training.batch_size=4",
           "--set", "lora.r=4", "--set", "task.max_new_tokens=3", "--set", "training.logging_steps=1"]
    # CPU processes even where a GPU is visible: two ranks on one GPU is not a valid NCCL setup
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    s = json.loads((run / "summary.json").read_text())
    assert s["steps"] == 2 and (run / "model" / "adapter_config.json").exists()
    logs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [x for x in logs if "loss" in x]
    assert len(steps) == 2, logs  # written once, by the main process
    # DDP runs the teacher locally on each rank: it starts at the first trained block (block 1 of 2) there too
    assert steps[-1]["lwf/teacher_skips_blocks"] == 1.0, steps[-1]


def test_example_nll_matches_full_cross_entropy_value_and_gradient():
    """Only target positions reach the softmax; sums, counts and gradients equal the per-position
    cross-entropy over the whole shifted sequence (a row with no target gives 0 and 0)."""
    from tether.methods.base import example_nll

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 6, 11, generator=g, requires_grad=True)
    labels = torch.randint(0, 11, (3, 6), generator=g)
    labels[0, :3] = -100
    labels[1, :] = -100
    labels[2, 4:] = -100
    sums, counts = example_nll(logits, labels)
    ref_logits = logits.detach().clone().requires_grad_(True)
    nll = torch.nn.functional.cross_entropy(ref_logits[:, :-1].transpose(1, 2), labels[:, 1:], ignore_index=-100,
                                            reduction="none")
    ref_sums = nll.sum(1)
    assert torch.allclose(sums, ref_sums, atol=1e-6)
    assert counts.tolist() == [3.0, 0.0, 3.0]
    (sums * torch.tensor([1.0, 2.0, 3.0])).sum().backward()
    (ref_sums * torch.tensor([1.0, 2.0, 3.0])).sum().backward()
    assert torch.allclose(logits.grad, ref_logits.grad, atol=1e-6)
    assert logits.grad[1].abs().sum() == 0 and logits.grad[:, -1].abs().sum() == 0


def test_lora_plus_gives_b_its_ratio_of_the_learning_rate_and_matches_peft_grouping(tokenizer, tmp_path):
    """LoRA+ (lora.lr_ratio): B learns at lr * ratio, A at lr; the same split PEFT's
    create_loraplus_optimizer makes, and one SGD step moves B by exactly ratio * lr * grad."""
    from peft.optimizers import create_loraplus_optimizer

    from tests.conftest import make_tiny_llama
    from tether.config import TrainingSpec

    def trainer_for(ratio):
        torch.manual_seed(0)
        lora = METHODS.get("lora")({"r": 4, "alpha": 8, "dropout": 0.0, "lr_ratio": ratio})
        model = lora.prepare_model(make_tiny_llama(len(tokenizer)), Context()).train()
        with torch.no_grad():  # B = 0 at init gives A no gradient: start from a nonzero B
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.02, generator=torch.Generator().manual_seed(1))
        spec = TrainingSpec(max_steps=1, batch_size=4, lr=0.01, logging_steps=1, weight_decay=0.0)
        args = training_arguments(spec, str(tmp_path / f"r{ratio}"))
        args.optim = "sgd"
        g = torch.Generator().manual_seed(0)
        data = [{"input_ids": (x := torch.randint(3, 400, (8,), generator=g).tolist()), "labels": x}
                for _ in range(4)]
        return TetherTrainer(model=model, args=args, train_dataset=data, data_collator=Collator(0),
                             methods={"lora": lora}, context=Context()), model

    trainer, model = trainer_for(16.0)
    opt = trainer.create_optimizer()
    lr_of = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert {n: lr_of[id(p)] for n, p in named.items()} == {
        n: pytest.approx(0.16 if ".lora_B." in n else 0.01) for n in named}
    peft_opt = create_loraplus_optimizer(model, torch.optim.SGD, lr=0.01, loraplus_lr_ratio=16.0)
    peft_lr = {id(p): g["lr"] for g in peft_opt.param_groups for p in g["params"]}
    assert peft_lr == pytest.approx(lr_of)
    assert sum(len(g["params"]) for g in opt.param_groups) == len(named)  # every trainable parameter, once

    # one SGD step: each parameter moved by -lr_of(p) * grad; the plain trainer (ratio 1) moves B 16x less
    moved = {}
    for ratio in (16.0, 1.0):
        trainer, model = trainer_for(ratio)
        before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        trainer.train()
        moved[ratio] = {n: (p.detach() - before[n]) for n, p in model.named_parameters() if n in before}
    for n, delta in moved[16.0].items():
        want = moved[1.0][n] * (16.0 if ".lora_B." in n else 1.0)
        assert torch.allclose(delta, want, atol=1e-7, rtol=1e-4), n
    assert any(d.abs().max() > 0 for n, d in moved[1.0].items() if ".lora_A." in n)


def test_lora_plus_keeps_hfs_optimizer_groups_and_refuses_one_it_cannot_rebuild(tokenizer, tmp_path):
    """The scaled groups start from HF's own (AdamW, weight decay on matrices only); an optimizer
    that is not one torch optimizer over all parameters gets a clear error, not a silent plain LR."""
    from tests.conftest import make_tiny_llama
    from tether.config import TrainingSpec

    def trainer_for(**trainer_kwargs):
        lora = METHODS.get("lora")({"r": 4, "alpha": 8, "dropout": 0.0, "lr_ratio": 4.0, "target_modules": ["q_proj"]})
        model = lora.prepare_model(make_tiny_llama(len(tokenizer)), Context()).train()
        spec = TrainingSpec(max_steps=1, batch_size=2, lr=0.001, weight_decay=0.1)
        return TetherTrainer(model=model, args=training_arguments(spec, str(tmp_path)), train_dataset=[],
                             data_collator=Collator(0), methods={"lora": lora}, context=Context(),
                             **trainer_kwargs), model

    trainer, model = trainer_for()
    opt = trainer.create_optimizer()
    assert isinstance(opt, torch.optim.AdamW) and trainer.create_optimizer() is opt
    decay = set(trainer.get_decay_parameter_names(model))
    for g in opt.param_groups:
        for p in g["params"]:
            name = next(n for n, q in model.named_parameters() if q is p)
            assert g["lr"] == pytest.approx(0.004 if ".lora_B." in name else 0.001), name
            assert g["weight_decay"] == (0.1 if name in decay else 0.0), name

    class Wrapper:  # an optimizer factory as HF calls Muon/Dion's: it holds torch optimizers, is none
        def __call__(self, model, lr):
            self.inner = [torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)]
            return self

    trainer, _ = trainer_for(optimizer_cls_and_kwargs=(Wrapper, {"lr": 0.001}))
    with pytest.raises(ValueError, match="lora.lr_ratio.*Wrapper"):
        trainer.create_optimizer()


def test_lora_plus_ratio_must_be_positive():
    with pytest.raises(Exception, match="lora.lr_ratio must be > 0"):
        METHODS.get("lora")({"lr_ratio": 0.0})


def test_logged_terms_and_task_replay_split_accumulate_without_readback(tmp_path):
    """Terms and the task/replay loss split are summed as tensors per micro-batch and read once per
    log: each is the mean over the micro-batches that had it (a batch without replay rows gives no
    replay loss), and the replay fraction counts every batch."""
    from transformers import TrainingArguments

    from tests.conftest import make_tiny_llama

    args = TrainingArguments(output_dir=str(tmp_path), max_steps=1, report_to=[], save_strategy="no", use_cpu=True)
    trainer = TetherTrainer(model=make_tiny_llama(50, hidden=8), args=args, train_dataset=[],
                            data_collator=Collator(0), methods={}, context=Context())
    sums, counts = torch.tensor([2.0, 6.0, 3.0]), torch.tensor([1.0, 3.0, 3.0])
    ids = torch.zeros((3, 4), dtype=torch.long)
    for flags, ewc in (([False, True, False], 0.5), ([False, False, False], 1.5)):
        batch = Batch(input_ids=ids, labels=ids, is_replay=torch.tensor(flags))
        trainer._record({"ewc": torch.tensor(ewc)}, batch, None, (sums, counts))
    assert all(isinstance(v, torch.Tensor) for v in trainer._term_sums.values())
    logs = {"loss": 1.0}
    trainer.log(logs)
    assert logs["ewc"] == pytest.approx(1.0)
    assert logs["loss_task"] == pytest.approx((5 / 4 + 11 / 7) / 2)
    assert logs["loss_replay"] == pytest.approx(2.0)
    assert logs["replay_fraction"] == pytest.approx(1 / 6)
    again = {"loss": 1.0}
    trainer.log(again)  # nothing accumulated since: nothing added
    assert set(again) <= {"loss", "epoch"}


def test_training_logs_are_one_short_line_each():
    from tether.training.trainer import compact_line

    logs = {"loss": 1.758, "grad_norm": 16.19, "learning_rate": 1e-4, "prefix_saved": 0.40, "lwf_inputs": 0.138,
            "loss_task": 1.246, "loss_replay": 2.399, "replay_fraction": 0.2, "replay/replay_planned_ratio": 0.2,
            "epoch": 0.125}
    assert compact_line(5, 40, logs) == ("step 5/40  loss 1.758 (task 1.246, replayed 2.399)  lwf_inputs 0.138  "
                                         "grad 16.2  lr 1.0e-04")
    guard = {"guard/worst_drop": 0.007468, "guard/breached": 0.0, "guard/task_score": 0.625, "epoch": 1.0}
    assert compact_line(40, 40, guard) == "step 40/40  guard: worst drop 0.7%, within budget, task 0.625"
    assert compact_line(40, 40, {"train_runtime": 181.6, "train_loss": 0.5026}) == \
        "done: 40 steps in 182 s, train_loss 0.5026"
