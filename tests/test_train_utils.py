"""train_utils and the modules it re-exports: Lamb against a numpy transcription of the original lamb.py,
parameter groups, schedule, data order, checkpoint round trips, the shared flags, the loop skeleton (steps, logs,
checkpoints, resume) and the differentiable all-gather (2-process gloo)."""
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from infra.batch_plan import GlobalBatchSampler, Progress, TrainingPlan
from infra.checkpoint_paths import TRAINER_STATE_NAME, latest_checkpoint, list_checkpoints
from infra.checkpoints import (get_rng_state, load_checkpoint, prepare_output_dir, save_checkpoint, set_rng_state,
                               set_seed)
from infra.distributed import (all_gather_object, all_gather_with_grad, all_reduce_sum, barrier, cleanup_distributed,
                               init_distributed)
from infra.optim import (Lamb, autocast_context, build_optimizer, fp32_context, linear_schedule, make_grad_scaler,
                         optimizer_step, param_groups)
from infra.training_loop import (EpochData, StepDriver, TrainLogger, TrainerFlags, TrainingRun, add_training_args,
                                 run_steps)
from helpers import end_spawned_worker, free_port, read_scalars
from infra.io import InputError

# transformers/model are imported inside the helpers below so that the spawned DDP workers, which re-import
# this module, start quickly
pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def tiny_encoder(dropout: float = 0.1):
    from transformers import RobertaConfig

    from model import DenseEncoder

    config = RobertaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                           vocab_size=60, max_position_embeddings=40, hidden_dropout_prob=dropout,
                           attention_probs_dropout_prob=dropout)
    return DenseEncoder.from_config(config)


# -- Lamb -----------------------------------------------------------------------------------------------------

def numpy_lamb(params, grads_per_step, lr, betas, eps, wd, adam=False):
    """The original lamb.py's step written out with numpy (float64)."""
    params = [p.astype(np.float64).copy() for p in params]
    m = [np.zeros_like(p) for p in params]
    v = [np.zeros_like(p) for p in params]
    for grads in grads_per_step:
        for i, g in enumerate(grads):
            g = g.astype(np.float64)
            m[i] = betas[0] * m[i] + (1 - betas[0]) * g
            v[i] = betas[1] * v[i] + (1 - betas[1]) * g * g
            u = m[i] / (np.sqrt(v[i]) + eps)
            if wd:
                u = u + wd * params[i]
            w_norm = min(max(np.linalg.norm(params[i]), 0.0), 10.0)
            u_norm = np.linalg.norm(u)
            ratio = 1.0 if (w_norm == 0 or u_norm == 0 or adam) else w_norm / u_norm
            params[i] = params[i] - lr * ratio * u
    return params


@pytest.mark.parametrize("wd,adam,steps", [(0.0, False, 1), (0.01, False, 1), (0.01, False, 5), (0.1, True, 3)])
def test_lamb_matches_the_original_formulas(wd, adam, steps):
    rng = np.random.default_rng(0)
    start = [rng.normal(size=(4, 3)).astype(np.float32),          # ‖p‖ < 10
             (rng.normal(size=(50,)) * 5).astype(np.float32),     # ‖p‖ > 10: clamped
             np.zeros(3, dtype=np.float32)]                       # ‖p‖ = 0: ratio 1
    grads = [[rng.normal(size=p.shape).astype(np.float32) for p in start] for _ in range(steps)]
    assert np.linalg.norm(start[1]) > 10
    params = [torch.nn.Parameter(torch.from_numpy(p.copy())) for p in start]
    opt = Lamb(params, lr=0.05, betas=(0.8, 0.95), eps=1e-6, weight_decay=wd, adam=adam)
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = torch.from_numpy(g.copy())
        opt.step()
    expected = numpy_lamb(start, grads, 0.05, (0.8, 0.95), 1e-6, wd, adam)
    for p, e in zip(params, expected):
        np.testing.assert_allclose(p.detach().numpy(), e, rtol=2e-5, atol=1e-6)
    assert opt.state[params[0]]["step"] == steps


def test_lamb_zero_gradient_keeps_ratio_one_and_does_not_move():
    p = torch.nn.Parameter(torch.ones(3))
    opt = Lamb([p], lr=0.1)
    p.grad = torch.zeros(3)
    opt.step()
    assert torch.equal(p.detach(), torch.ones(3))
    assert opt.state[p]["trust_ratio"].item() == 1.0



def test_lamb_first_step_by_hand():
    """eps 0, betas (0.9, 0.99): step 1 gives m = 0.1·g, √v = 0.1·|g|, so u = sign(g) and ‖u‖ = √2 for two
    elements; the ratio is ‖p‖ (clamped to 10) / √2, so p moves by lr·‖p‖/√2 per element."""
    lr = 2 ** 0.5 / 100
    small = torch.nn.Parameter(torch.tensor([3.0, 4.0]))      # ‖p‖ 5: ratio 5/√2, moves 0.05
    large = torch.nn.Parameter(torch.tensor([9.0, 12.0]))     # ‖p‖ 15, clamped to 10: moves 0.1
    zero = torch.nn.Parameter(torch.zeros(2))                 # ‖p‖ 0: ratio 1, moves lr
    for foreach in (True, False):
        params = [torch.nn.Parameter(q.detach().clone()) for q in (small, large, zero)]
        opt = Lamb(params, lr=lr, betas=(0.9, 0.99), eps=0.0, foreach=foreach)
        for q in params:
            q.grad = torch.tensor([1.0, -2.0])
        opt.step()
        expected = [[2.95, 4.05], [8.9, 12.1], [-lr, lr]]
        for q, e in zip(params, expected):
            np.testing.assert_allclose(q.detach().numpy(), e, rtol=1e-6, atol=1e-7)
        assert [opt.state[q]["trust_ratio"].item() for q in params] == pytest.approx([5 / 2 ** 0.5, 10 / 2 ** 0.5, 1])


def _lamb_run(model, foreach: bool, steps: int, adam: bool = False, chunk_numel: int = 1 << 26):
    """``steps`` Lamb steps on the tiny encoder's two parameter groups with seeded random gradients (every third
    step the word embeddings have none, so their state stays behind); returns the optimizer."""
    opt = Lamb(param_groups(model, 0.01), lr=1e-2, betas=(0.9, 0.98), eps=1e-6, adam=adam, foreach=foreach,
                  chunk_numel=chunk_numel)
    g = torch.Generator().manual_seed(5)
    for step in range(steps):
        for name, p in model.named_parameters():
            p.grad = torch.randn(p.shape, generator=g) * 0.1
            if step % 3 == 2 and "word_embeddings" in name:
                p.grad = None
        opt.step()
    return opt


@pytest.mark.parametrize("adam,chunk_numel", [(False, 1 << 26), (False, 3000), (True, 1 << 26)])
def test_lamb_multi_tensor_equals_the_per_parameter_update_bitwise(adam, chunk_numel):
    """The default multi-tensor path (torch._foreach_*) against the per-parameter loop (foreach=False), 7 steps
    on the tiny encoder (its 39 parameters, two groups, one zero-norm bias start): weights and every state entry
    equal bit for bit on the CPU (tolerance 0).  chunk_numel 3000 splits the groups into many chunks."""
    torch.manual_seed(0)
    reference = tiny_encoder()
    fast = tiny_encoder()
    fast.load_state_dict(reference.state_dict())
    with torch.no_grad():
        reference.norm.weight.mul_(30)                    # one parameter with ‖p‖ > 10: the clamp
        fast.norm.weight.mul_(30)
    assert reference.norm.weight.norm() > 10
    assert any(p.norm() == 0 for p in reference.parameters())    # biases start at zero: ratio 1
    ref_opt = _lamb_run(reference, False, 7, adam)
    fast_opt = _lamb_run(fast, True, 7, adam, chunk_numel)
    for (name, p), q in zip(reference.named_parameters(), fast.parameters()):
        assert torch.equal(p, q), name
        s, t = ref_opt.state[p], fast_opt.state[q]
        assert s.keys() == t.keys() and s["step"] == t["step"], name
        for key in ("exp_avg", "exp_avg_sq", "weight_norm", "adam_norm", "trust_ratio"):
            assert torch.equal(s[key], t[key]), (name, key)
    embeddings = fast.roberta.embeddings.word_embeddings.weight
    assert fast_opt.state[embeddings]["step"] == 5          # no gradient on steps 3 and 6
    assert not torch.equal(embeddings, tiny_encoder().roberta.embeddings.word_embeddings.weight)


def test_lamb_state_saves_and_loads_with_either_path(tmp_path):
    """A multi-tensor Lamb's state_dict loads into a per-parameter one and they continue identically."""
    torch.manual_seed(0)
    a, b = tiny_encoder(), tiny_encoder()
    b.load_state_dict(a.state_dict())
    opt_a = _lamb_run(a, True, 2)
    torch.save(opt_a.state_dict(), tmp_path / "opt.pt")
    opt_b = Lamb(param_groups(b, 0.01), lr=1e-2, betas=(0.9, 0.98), eps=1e-6, foreach=False)
    for p, q in zip(a.parameters(), b.parameters()):
        q.data.copy_(p.data)
    opt_b.load_state_dict(torch.load(tmp_path / "opt.pt", weights_only=True))
    for opt, model in ((opt_a, a), (opt_b, b)):
        for p in model.parameters():
            p.grad = torch.ones_like(p)
        opt.step()
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


# -- groups, optimizer, schedule ----------------------------------------------------------------------------

def test_param_groups_exclude_bias_and_LayerNorm_weight_but_decay_head_norm():
    model = tiny_encoder()
    decay, no_decay = param_groups(model, 0.01)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    excluded = {names[id(p)] for p in no_decay["params"]}
    assert decay["weight_decay"] == 0.01 and no_decay["weight_decay"] == 0.0
    assert "norm.weight" in decayed and "embeddingHead.weight" in decayed
    assert {"norm.bias", "embeddingHead.bias", "roberta.embeddings.LayerNorm.weight"} <= excluded
    assert all("bias" in n or "LayerNorm.weight" in n for n in excluded)
    assert not any("bias" in n or "LayerNorm.weight" in n for n in decayed)
    assert len(decayed) + len(excluded) == len(list(model.parameters()))


def test_build_optimizer_kinds():
    groups = param_groups(torch.nn.Linear(2, 2), 0.01)
    assert isinstance(build_optimizer("lamb", groups, 1e-4), Lamb)
    adamw = build_optimizer("adamw", param_groups(torch.nn.Linear(2, 2), 0.01), 1e-4, (0.8, 0.9), 1e-7)
    assert isinstance(adamw, torch.optim.AdamW) and adamw.param_groups[0]["betas"] == (0.8, 0.9)
    with pytest.raises(ValueError):
        build_optimizer("sgd", groups, 1e-4)


def test_linear_schedule_warmup_and_decay_points():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
    sched = linear_schedule(opt, warmup_steps=4, total_steps=12)
    lrs = []
    for _ in range(14):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == 0.0 and lrs[2] == pytest.approx(1.0) and lrs[4] == pytest.approx(2.0)
    assert lrs[8] == pytest.approx(1.0) and lrs[10] == pytest.approx(0.5)
    assert lrs[12] == 0.0 and lrs[13] == 0.0


def test_training_plan():
    plan = TrainingPlan.create(10, 3, num_train_epochs=2)
    assert (plan.steps_per_epoch, plan.total_steps, plan.num_epochs) == (4, 8, 2)
    assert [plan.micro_batches_in_step(s) for s in range(4)] == [3, 3, 3, 1]
    plan = TrainingPlan.create(10, 1, num_train_epochs=100, max_steps=25)
    assert (plan.total_steps, plan.num_epochs) == (25, 3)
    assert TrainingPlan.create(10, 1, num_train_epochs=1.5).total_steps == 15
    with pytest.raises(InputError):
        TrainingPlan.create(0, 1, 1)


def test_progress_rolls_over_at_epoch_ends_and_counts_micro_batches_read():
    plan = TrainingPlan.create(10, 3, num_train_epochs=2)          # steps of 3, 3, 3, 1 micro-batches
    progress = Progress()
    assert [progress.advance(plan.steps_per_epoch) for _ in range(5)] == [False, False, False, True, False]
    assert progress == Progress(epoch=1, step_in_epoch=1, global_step=5)
    assert plan.first_micro_batch(3) == 9 and plan.micro_batches_before(progress) == 13


# -- data order ---------------------------------------------------------------------------------------------

def test_global_batch_sampler_splits_the_single_process_batches():
    single = GlobalBatchSampler(23, batch_size=6, seed=7)
    single.set_epoch(3)
    ranks = [GlobalBatchSampler(23, batch_size=3, seed=7, world_size=2, rank=r) for r in range(2)]
    for s in ranks:
        s.set_epoch(3)
    single_batches = list(single)
    rank_batches = [list(s) for s in ranks]
    assert len(single_batches) == 4 and all(len(b) == 4 for b in rank_batches)
    for k, batch in enumerate(single_batches):
        assert rank_batches[0][k] + rank_batches[1][k] == batch
    assert [len(b) for b in rank_batches[0]] == [3, 3, 3, 3] and len(rank_batches[1][-1]) == 2
    assert sorted(i for b in single_batches for i in b) == list(range(23))


def test_sampler_is_deterministic_per_seed_and_epoch_and_resumable():
    def batches(seed, epoch, start=0):
        s = GlobalBatchSampler(20, batch_size=4, seed=seed)
        s.set_epoch(epoch, start_batch=start)
        return list(s)

    assert batches(1, 0) == batches(1, 0)
    assert batches(1, 0) != batches(1, 1) and batches(1, 0) != batches(2, 0)
    assert batches(1, 1, start=2) == batches(1, 1)[2:]
    s = GlobalBatchSampler(20, batch_size=4, seed=1)
    s.set_epoch(0, start_batch=3)
    assert len(s) == 2


def test_sampler_drops_a_last_global_batch_smaller_than_the_world():
    s = GlobalBatchSampler(9, batch_size=2, seed=0, world_size=4, rank=3)
    assert s.batches_per_epoch == 1 and len(list(s)) == 1


# -- RNG and checkpoints ------------------------------------------------------------------------------------

def test_background_iterator_yields_the_same_items_in_order_and_reraises_errors_in_place():
    import itertools
    import threading

    from infra.batch_plan import BackgroundIterator

    calls = []

    def source(n, fail_at=None):
        for i in range(n):
            calls.append((i, threading.current_thread().name))
            if i == fail_at:
                raise InputError("bad item", value=i)
            yield {"i": i, "t": torch.full((2,), i)}

    items = BackgroundIterator(source(7), depth=2)
    first = list(itertools.islice(items, 3))                       # as run_steps reads a step's micro-batches
    rest = list(items)
    assert [x["i"] for x in first + rest] == list(range(7)) and torch.equal(rest[-1]["t"], torch.full((2,), 6))
    assert [i for i, _ in calls] == list(range(7)) and {t for _, t in calls} == {"batch-prefetch"}
    assert next(items, None) is None                               # exhausted stays exhausted
    failing = BackgroundIterator(source(5, fail_at=3))
    assert [next(failing)["i"] for _ in range(3)] == [0, 1, 2]
    with pytest.raises(InputError, match="bad item"):
        next(failing)
    with pytest.raises(ValueError):
        BackgroundIterator(source(1), depth=0)


def test_background_iterator_close_stops_reading_ahead():
    import itertools
    import time

    from infra.batch_plan import BackgroundIterator

    read = []

    def endless():
        for i in itertools.count():
            read.append(i)
            yield i

    items = BackgroundIterator(endless(), depth=2)
    assert next(items) == 0
    time.sleep(0.2)
    items.close()
    assert not items._thread.is_alive()
    assert len(read) <= 1 + 2 + 1                                  # the one taken, the queue, the one held
    assert next(items, None) is None


def test_rng_state_round_trip():
    import random

    set_seed(5)
    state = get_rng_state()
    first = (random.random(), np.random.rand(), torch.rand(2))
    set_rng_state(state)
    second = (random.random(), np.random.rand(), torch.rand(2))
    assert first[0] == second[0] and first[1] == second[1] and torch.equal(first[2], second[2])


def _train_steps(model, opt, sched, batches):
    model.train()
    for ids in batches:
        emb = model(ids, torch.ones_like(ids))
        emb.pow(2).mean().backward()
        optimizer_step(list(model.parameters()), opt, sched, make_grad_scaler(torch.device("cpu"), False),
                          max_grad_norm=1.0)


def _fresh(seed=0):
    torch.manual_seed(seed)
    model = tiny_encoder(dropout=0.3)
    opt = build_optimizer("lamb", param_groups(model, 0.01), lr=1e-2)
    return model, opt, linear_schedule(opt, warmup_steps=1, total_steps=6)


def test_checkpoint_resume_continues_exactly(tmp_path):
    batches = [torch.randint(3, 60, (4, 7), generator=torch.Generator().manual_seed(i)) for i in range(6)]
    model, opt, sched = _fresh()
    set_seed(11)
    _train_steps(model, opt, sched, batches[:3])
    path = save_checkpoint(tmp_path, 3, model, opt, sched, None, {"epoch": 1, "step_in_epoch": 0})
    _train_steps(model, opt, sched, batches[3:])          # dropout draws from the RNG saved above
    straight = {k: v.clone() for k, v in model.state_dict().items()}

    resumed, opt2, sched2 = _fresh(seed=99)                # different init: everything must come from disk
    torch.manual_seed(1234)                                # different RNG: restored from the checkpoint
    extra = load_checkpoint(path, resumed, opt2, sched2)
    assert extra == {"epoch": 1, "step_in_epoch": 0, "global_step": 3}
    assert sched2.last_epoch == 3
    _train_steps(resumed, opt2, sched2, batches[3:])
    for k, v in resumed.state_dict().items():
        assert torch.equal(v, straight[k]), k


def test_checkpoint_files_layout_and_rotation(tmp_path):
    model, opt, sched = _fresh()
    _train_steps(model, opt, sched, [torch.randint(3, 60, (2, 5))])
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, model, opt, sched, make_grad_scaler(torch.device("cpu"), False),
                           {"epoch": 0}, save_total_limit=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-2", "checkpoint-3"]
    latest = latest_checkpoint(tmp_path)
    assert latest.name == "checkpoint-3"
    state = torch.load(latest / TRAINER_STATE_NAME, weights_only=True)
    assert state["global_step"] == 3 and isinstance(state["rng"][0]["torch"], torch.Tensor)
    from model import DenseEncoder

    loaded = DenseEncoder.from_pretrained(latest)
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, model.state_dict()[k])
    (tmp_path / "checkpoint-9").mkdir()                     # incomplete (no trainer_state.pt): ignored
    (tmp_path / "checkpoint-8.tmp-1").mkdir()
    assert latest_checkpoint(tmp_path).name == "checkpoint-3"
    assert not list(tmp_path.glob("*.tmp-*.*")) and not list(tmp_path.glob("*.old-*"))


def test_prepare_output_dir_rules(tmp_path):
    out = tmp_path / "out"
    prepare_output_dir(out, overwrite=False, resume=False)      # absent: fine
    (out / "checkpoint-5").mkdir(parents=True)
    with pytest.raises(InputError, match="overwrite_output_dir"):
        prepare_output_dir(out, overwrite=False, resume=False)
    prepare_output_dir(out, overwrite=False, resume=True)
    assert (out / "checkpoint-5").exists()
    prepare_output_dir(out, overwrite=True, resume=False)
    assert not (out / "checkpoint-5").exists()


def test_checkpoint_paths_cli_prints_the_latest_or_fails(tmp_path, capsys):
    from infra import checkpoint_paths

    for step in (2, 10):
        (tmp_path / f"checkpoint-{step}").mkdir()
        (tmp_path / f"checkpoint-{step}" / TRAINER_STATE_NAME).touch()
    (tmp_path / "checkpoint-11.tmp-5").mkdir()
    assert checkpoint_paths.main([str(tmp_path)]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "checkpoint-10")
    assert checkpoint_paths.main([str(tmp_path / "none")]) == 1
    assert capsys.readouterr().err.strip() == f"no checkpoint-* in {tmp_path / 'none'}"


def test_optimizer_step_clips_and_steps_schedule():
    p = torch.nn.Parameter(torch.zeros(4))
    opt = torch.optim.SGD([p], lr=1.0)
    sched = linear_schedule(opt, warmup_steps=0, total_steps=10)
    p.grad = torch.full((4,), 3.0)                              # norm 6 → clipped to 1
    norm = optimizer_step([p], opt, sched, make_grad_scaler(torch.device("cpu"), False), 1.0)
    assert norm.item() == pytest.approx(6.0)
    np.testing.assert_allclose(p.detach().numpy(), -np.full(4, 0.5), rtol=1e-6)
    assert p.grad is None and opt.param_groups[0]["lr"] == pytest.approx(0.9)


def test_optimizer_step_fp16_skips_the_step_and_the_schedule_on_inf_without_reading_the_scale():
    """fp16: an inf gradient skips the optimizer and the schedule and halves the scale; a finite one steps both.
    The only host read is the GradScaler's own inf check (counted through Tensor.item)."""
    p = torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.SGD([p], lr=1.0)
    sched = linear_schedule(opt, warmup_steps=0, total_steps=10)
    scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
    scaler.scale(torch.ones(()))                            # creates the scale, as scaling the loss does
    items = []
    item = torch.Tensor.item

    def counting_item(self):
        items.append(1)
        return item(self)

    p.grad = torch.tensor([float("inf"), 1.0])
    with pytest.MonkeyPatch.context() as mp_:
        mp_.setattr(torch.Tensor, "item", counting_item)
        optimizer_step([p], opt, sched, scaler, 0.0)
    assert len(items) == 1
    assert torch.equal(p.detach(), torch.ones(2)) and sched.last_epoch == 0 and scaler.get_scale() == 2.0
    p.grad = torch.tensor([2.0, 2.0])                       # unscaled by 2: 1.0 each
    optimizer_step([p], opt, sched, scaler, 0.0)
    assert torch.equal(p.detach(), torch.zeros(2)) and sched.last_epoch == 1


def test_autocast_contexts_keep_fp32_where_asked():
    cpu = torch.device("cpu")
    a = torch.randn(3, 3)
    with autocast_context(cpu, bf16=True):
        assert (a @ a).dtype == torch.bfloat16
        with fp32_context(cpu):
            assert (a @ a).dtype == torch.float32
    with pytest.raises(InputError):
        autocast_context(cpu, fp16=True, bf16=True)


def test_train_logger_writes_tensorboard_events(tmp_path):

    log = TrainLogger(tmp_path / "log", total_steps=3)
    log.step(1, loss=0.5)
    log.log({"loss": 0.5, "learning_rate": 1e-4}, step=1)
    log.step(1)
    log.log({"loss": 0.25, "learning_rate": 2e-4}, step=2)
    log.close()
    assert list((tmp_path / "log").glob("events.out.tfevents.*"))
    scalars = read_scalars(tmp_path / "log")
    assert scalars == {"loss": [(1, 0.5), (2, 0.25)],
                       "learning_rate": [(1, pytest.approx(1e-4)), (2, pytest.approx(2e-4))]}
    resumed = TrainLogger(tmp_path / "log", total_steps=3, initial_step=1, purge_step=2)  # resumed at step 1
    resumed.log({"loss": 0.75, "learning_rate": 3e-4}, step=2)
    resumed.close()
    assert read_scalars(tmp_path / "log")["loss"] == [(1, 0.5), (2, 0.75)]   # the old step 2 is purged
    silent = TrainLogger(tmp_path / "other_rank", total_steps=3, enabled=False)
    silent.log({"loss": 1.0}, step=1)
    silent.close()
    assert not (tmp_path / "other_rank").exists()


# -- shared flags and the loop ---------------------------------------------------------------------------------

def test_shared_flags_take_each_trainer_defaults_and_are_validated(capsys):
    import argparse

    flags = TrainerFlags(learning_rate=5e-6, num_train_epochs=6.0, warmup_steps=2000, logging_steps=100,
                            init_help="i", preprocess_help="p", clip_help="c", run_folder="out", run_folders="x")
    parser = argparse.ArgumentParser()
    add_training_args(parser, flags)
    args = parser.parse_args(["--init_path", "m", "--preprocess_dir", "d"])
    assert (args.learning_rate, args.num_train_epochs, args.warmup_steps, args.logging_steps) == (5e-6, 6.0, 2000, 100)
    assert (args.save_steps, args.save_total_limit, args.max_steps, args.seed) == (None, None, -1, 42)
    for flag, value in (("--logging_steps", "0"), ("--warmup_steps", "-1")):  # ranges are checked while parsing
        with pytest.raises(SystemExit):
            parser.parse_args(["--init_path", "m", "--preprocess_dir", "d", flag, value])
        assert f"argument {flag}: must be an integer >= " in capsys.readouterr().err


class SavableLinear(torch.nn.Linear):
    def save_pretrained(self, folder) -> None:
        from safetensors.torch import save_file

        save_file(self.state_dict(), str(Path(folder) / "model.safetensors"))


class RecordingCollator:
    def __init__(self):
        self.seen = None

    def __call__(self, items):
        return list(items)

    def mark_batches_seen(self, n):
        self.seen = n


class RecordingDriver(StepDriver):
    """Records what the loop asks: each step's micro-batches, each log window's size and each epoch end."""

    def __init__(self, run):
        self.run, self.events = run, []

    def step(self, micro_batches, n_micro):
        batches = list(micro_batches)
        assert len(batches) == n_micro
        self.events.append(("step", batches))
        return {}

    def scalars(self, steps):
        self.events.append(("log", self.run.progress.global_step, steps))
        return {"steps": float(steps)}

    def epoch_done(self, epoch):
        saved = [p.name for p in list_checkpoints(self.run.output_dir)]
        self.events.append(("epoch", epoch, saved))


def skeleton_run(out: Path, collator: RecordingCollator, save_steps=None):
    """5 items of batch 1, accumulation 2: steps of 2, 2, 1 micro-batches, 3 steps per epoch, 2 epochs."""
    torch.manual_seed(0)
    model = SavableLinear(2, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    sampler = GlobalBatchSampler(5, batch_size=1, seed=3)
    plan = TrainingPlan.create(sampler.batches_per_epoch, 2, num_train_epochs=2)
    run = TrainingRun(out, model, optimizer, linear_schedule(optimizer, 0, plan.total_steps),
                         make_grad_scaler(torch.device("cpu"), False), plan, {"seed": 3}, save_steps=save_steps)
    return run, EpochData(list(range(5)), sampler, collator, seed=3)


def test_run_steps_logs_saves_and_calls_epoch_ends_on_schedule(tmp_path):
    run, data = skeleton_run(tmp_path / "out", RecordingCollator(), save_steps=4)
    driver = RecordingDriver(run)
    run_steps(run, data, driver, log_dir=None, logging_steps=4)
    steps = [e[1] for e in driver.events if e[0] == "step"]
    assert [len(b) for b in steps] == [2, 2, 1, 2, 2, 1]
    items = [[i for micro_batch in step for i in micro_batch] for step in steps]
    assert sorted(sum(items[:3], [])) == list(range(5)) == sorted(sum(items[3:], []))   # each epoch: every item
    others = [e for e in driver.events if e[0] != "step"]
    # epoch ends before their checkpoints; a log window at step 4 and the leftover 2 steps at the end
    assert others == [("epoch", 1, []), ("log", 4, 4), ("epoch", 2, ["checkpoint-3", "checkpoint-4"]),
                      ("log", 6, 2)]
    assert [p.name for p in list_checkpoints(run.output_dir)] == ["checkpoint-3", "checkpoint-4", "checkpoint-6"]
    assert torch.load(run.output_dir / "checkpoint-4" / TRAINER_STATE_NAME, weights_only=True)["extra"] == \
        {"epoch": 1, "step_in_epoch": 1, "settings": {"seed": 3}}


def test_run_steps_stopped_and_resumed_reads_the_same_batches(tmp_path):
    straight_run, straight_data = skeleton_run(tmp_path / "straight", RecordingCollator())
    straight = RecordingDriver(straight_run)
    run_steps(straight_run, straight_data, straight, log_dir=None, logging_steps=100)

    first_run, first_data = skeleton_run(tmp_path / "resumed", RecordingCollator())
    first = RecordingDriver(first_run)
    run_steps(first_run, first_data, first, log_dir=None, logging_steps=100, end_step=2)
    assert [p.name for p in list_checkpoints(tmp_path / "resumed")] == ["checkpoint-2"]   # saved at the stop
    collator = RecordingCollator()
    second_run, second_data = skeleton_run(tmp_path / "resumed", collator)
    second_run.resume(tmp_path / "resumed" / "checkpoint-2", collator)
    assert second_run.progress == Progress(0, 2, 2) and collator.seen == 4
    second = RecordingDriver(second_run)
    run_steps(second_run, second_data, second, log_dir=None, logging_steps=100)
    batches = [e[1] for d in (first, second) for e in d.events if e[0] == "step"]
    assert batches == [e[1] for e in straight.events if e[0] == "step"]
    assert [e for e in second.events if e[0] == "epoch"] == [("epoch", 1, ["checkpoint-2"]),
                                                              ("epoch", 2, ["checkpoint-2", "checkpoint-3"])]


# -- distributed --------------------------------------------------------------------------------------------

def _gather_worker(rank: int, world: int, port: int, queue) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    info = init_distributed(no_cuda=True)
    try:
        local = torch.arange(rank + 2, dtype=torch.float32).mul(rank + 1).unsqueeze(1).repeat(1, 2)
        local.requires_grad_(True)
        gathered = all_gather_with_grad(local)
        weights = torch.arange(gathered.shape[0], dtype=torch.float32).add(1).unsqueeze(1) * (rank + 1)
        (gathered * weights).sum().backward()                    # rank r's loss: Σ_k (k+1)(r+1)·x_k
        count = all_reduce_sum(torch.tensor(float(local.shape[0])))
        # numpy: a tensor in a Queue is shared memory that dies with this process
        queue.put((info.rank, gathered.detach().numpy(), local.grad.numpy(), all_gather_object(rank * 10),
                   count.item()))
        barrier()  # both ranks done before the group is torn down
    finally:
        cleanup_distributed()
    end_spawned_worker(queue)


@pytest.mark.slow
def test_all_gather_with_grad_two_processes_unequal_sizes():
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_gather_worker, args=(r, 2, port, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = dict((r[0], r[1:]) for r in (queue.get(timeout=60) for _ in procs))
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    expected = torch.tensor([0.0, 1.0, 0.0, 2.0, 4.0]).unsqueeze(1).repeat(1, 2)   # rank 0: 2 rows, rank 1: 3
    for rank in range(2):
        gathered, grad, objects, count = results[rank]
        assert np.array_equal(gathered, expected.numpy()) and objects == [0, 10] and count == 5.0
    # d(Σ_r loss_r)/dx_k = (k+1)·(1+2): the gradient carries both ranks' contributions
    full = torch.arange(1, 6, dtype=torch.float32).mul(3).unsqueeze(1).repeat(1, 2)
    assert np.array_equal(results[0][1], full[:2].numpy()) and np.array_equal(results[1][1], full[2:].numpy())
