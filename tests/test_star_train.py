"""star/train.py on tiny memmaps (contract format) and a tiny RoBERTa: DDP (2-process gloo) equals one process on
the same global batch, stop-and-resume equals an uninterrupted run, and CLI smoke runs of the three modes."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from helpers import (REPO, end_spawned_worker, free_port, load_weights, make_star_data, read_scalars,
                     star_cli_args)

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_star_data(tmp_path_factory.mktemp("star"))


@pytest.fixture(scope="module")
def data_no_dropout(tmp_path_factory):
    return make_star_data(tmp_path_factory.mktemp("star_nodrop"), dropout=0.0)


# -- single process: loss, CLI ------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["star", "inbatch", "rand"])
def test_cli_smoke_writes_loadable_checkpoints_and_tensorboard(data, tmp_path, mode):
    from model import DenseEncoder
    from star import train as star_train

    out = tmp_path / "out"
    star_train.main(star_cli_args(data, out, mode, "--num_train_epochs", "2", "--save_steps", "2"))
    # 12 queries / batch 4 = 3 steps per epoch: checkpoints at steps 2, 3 (epoch end), 4, 6 (epoch end)
    names = sorted(p.name for p in out.glob("checkpoint-*"))
    assert names == ["checkpoint-2", "checkpoint-3", "checkpoint-4", "checkpoint-6"]
    final = DenseEncoder.from_pretrained(out)
    last = DenseEncoder.from_pretrained(out / "checkpoint-6")
    init = load_weights(data["init"])
    for k, v in last.state_dict().items():
        assert torch.equal(v, final.state_dict()[k])
    assert any(not torch.equal(v, init[k]) for k, v in final.state_dict().items())
    state = torch.load(out / "checkpoint-4" / "trainer_state.pt", weights_only=True)
    assert state["extra"]["epoch"] == 1 and state["extra"]["step_in_epoch"] == 1
    assert list((out / "log").glob("events.out.tfevents.*"))
    scalars = read_scalars(out / "log")
    assert sorted(scalars) == ["epoch", "learning_rate", "loss"]
    assert [s for s, _ in scalars["loss"]] == [1, 2, 3, 4, 5, 6]
    assert all(np.isfinite(v) and v > 0 for _, v in scalars["loss"])


def test_accumulation_bf16_checkpointing_and_save_limit(data, tmp_path):
    """batch 2, accumulation 4: 6 micro-batches per epoch = steps of 4 + 2 micro-batches, 2 steps per epoch."""
    from star import train as star_train

    out = tmp_path / "out"
    star_train.main(star_cli_args(data, out, "star", "--num_train_epochs", "3", "--gradient_accumulation_steps", "4",
                             "--bf16", "--gradient_checkpointing", "--save_total_limit", "2",
                             "--logging_dir", str(tmp_path / "tb"), batch=2))
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-6"]
    state = torch.load(out / "checkpoint-6" / "trainer_state.pt", weights_only=True)
    assert state["global_step"] == 6 and state["extra"]["epoch"] == 3 and state["extra"]["step_in_epoch"] == 0
    losses = read_scalars(tmp_path / "tb")["loss"]
    assert [s for s, _ in losses] == [1, 2, 3, 4, 5, 6] and all(np.isfinite(v) for _, v in losses)
    assert not (out / "log").exists()


@pytest.mark.parametrize("scale", [None, 20.0], ids=["faithful", "score_scale_20"])
def test_logged_loss_is_the_pooled_formula_on_the_first_batch(data_no_dropout, tmp_path, scale):
    """Rebuild step 1's batch by hand (same sampler/dataset/collator) and compare the logged loss to STAR's
    pooled pairwise formula (the original model.py's RobertaDot_InBatch) written with plain loops; with
    ``--score_scale γ`` every score gap is multiplied by γ inside the softplus."""
    from infra.batch_plan import GlobalBatchSampler
    from dataset import (TokenIdsCache, TrainCollator, TrainInbatchWithHardDataset, load_hardneg, load_rel)
    from model import DenseEncoder
    from star import train as star_train

    d = data_no_dropout
    out = tmp_path / "out"
    star_train.main(star_cli_args(d, out, "star", "--max_steps", "1", *(["--score_scale", str(scale)] if scale else [])))
    gamma = scale or 1.0
    logged = read_scalars(out / "log")["loss"][0][1]

    rel = load_rel(d["pre"] / "train-qrel.tsv")
    ds = TrainInbatchWithHardDataset(rel, TokenIdsCache(d["pre"], "train-query"), TokenIdsCache(d["pre"], "passages"),
                                     6, 10, 42, hardneg=load_hardneg(d["hard"]), hard_num=2)
    sampler = GlobalBatchSampler(len(ds), 4, seed=42)
    items = [ds[i] for i in next(iter(sampler))]
    batch = TrainCollator(6, 10, rel)(items)
    model = DenseEncoder.from_pretrained(d["init"]).eval()
    with torch.no_grad():
        q = model(batch["query_input_ids"], batch["query_attention_mask"]).double()
        p = model(batch["doc_input_ids"], batch["doc_attention_mask"]).double()
        h = model(batch["other_doc_input_ids"], batch["other_doc_attention_mask"]).double()
    total, count = 0.0, 0
    for i, item in enumerate(items):
        positive = float(q[i] @ p[i])
        for docs, ids in ((p, [it["pos_id"] for it in items]), (h, [e for it in items for e in it["extra_ids"]])):
            for k, doc_id in enumerate(ids):
                if doc_id not in rel[item["qid"]]:
                    total += float(np.logaddexp(0.0, gamma * (float(q[i] @ docs[k]) - positive)))
                    count += 1
    assert count >= 4 * 3 + 4 * 8 - 4  # only a few pairs masked
    assert logged == pytest.approx(total / count, rel=1e-5)


def test_cli_refuses_non_empty_output_dir_and_missing_hardneg(data, tmp_path, capsys):
    from infra.io import run_cli
    from star import train as star_train

    out = tmp_path / "out"
    out.mkdir()
    (out / "something").write_text("x")
    with pytest.raises(SystemExit) as exit_info:
        run_cli(star_train.main, star_cli_args(data, out, "star"))
    assert exit_info.value.code == 2 and "--overwrite_output_dir" in capsys.readouterr().err
    args = [a for a in star_cli_args(data, tmp_path / "new", "star") if a not in (str(data["hard"]), "--hardneg_path")]
    with pytest.raises(SystemExit) as exit_info:
        run_cli(star_train.main, args)
    assert exit_info.value.code == 2 and "--hardneg_path" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()


# -- resume ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("batch,accum,stop,total", [(4, 1, 4, 7), (2, 4, 2, 5)])
def test_stop_and_resume_equals_uninterrupted_run(data, tmp_path, batch, accum, stop, total):
    """``total`` steps straight vs ``stop`` steps then --resume to ``total``; dropout on, so the RNG restore
    matters.  12 queries: batch 4 → 3 steps per epoch, the stop is mid-epoch 1; batch 2 with accumulation 4 →
    steps of 4 + 2 micro-batches, the stop is at the end of epoch 0.  warmup 100 > total: the LR of step s is
    the same whatever --max_steps is."""
    from star import train as star_train

    common = ("--warmup_steps", "100", "--learning_rate", "5e-2", "--gradient_accumulation_steps", str(accum))
    star_train.main(star_cli_args(data, tmp_path / "straight", "star", "--max_steps", str(total), *common, batch=batch))
    star_train.main(star_cli_args(data, tmp_path / "resumed", "star", "--max_steps", str(stop), *common, batch=batch))
    assert (tmp_path / "resumed" / f"checkpoint-{stop}").is_dir()
    star_train.main(star_cli_args(data, tmp_path / "resumed", "star", "--max_steps", str(total), "--resume", *common,
                             batch=batch))
    straight, resumed = load_weights(tmp_path / "straight"), load_weights(tmp_path / "resumed")
    init = load_weights(data["init"])
    assert any(not torch.equal(straight[k], init[k]) for k in straight)
    for k in straight:
        assert torch.equal(straight[k], resumed[k]), k
    interrupted = load_weights(tmp_path / "resumed" / f"checkpoint-{stop}")
    assert any(not torch.equal(straight[k], interrupted[k]) for k in straight)



@pytest.mark.parametrize("precision", [[], ["--fp16"]], ids=["fp32", "fp16"])
def test_read_ahead_batches_and_multi_tensor_lamb_train_like_the_plain_loop(data, tmp_path, monkeypatch, precision):
    """The default run (batches collated in a background thread, multi-tensor Lamb) against the plain loop
    (batches collated on the main thread by the DataLoader, Lamb one parameter at a time): the same weights bit
    for bit after 8 steps over 3 epochs with dropout, gradient accumulation and the 10 full-padded batches (CPU
    fp32, and fp16 autocast with its GradScaler)."""
    import functools

    from infra import optim
    from star import train as star_train

    args = ("--max_steps", "8", "--gradient_accumulation_steps", "2", "--learning_rate", "5e-2",
            "--warmup_steps", "2", *precision)
    star_train.main(star_cli_args(data, tmp_path / "default", "star", *args, batch=2))
    with monkeypatch.context() as m:
        m.setattr(star_train, "READ_AHEAD_STEPS", 0)
        m.setattr(optim, "Lamb", functools.partial(optim.Lamb, foreach=False))
        star_train.main(star_cli_args(data, tmp_path / "plain", "star", *args, batch=2))
    default, plain = load_weights(tmp_path / "default"), load_weights(tmp_path / "plain")
    init = load_weights(data["init"])
    assert any(not torch.equal(default[k], init[k]) for k in default)
    for k in default:
        assert torch.equal(default[k], plain[k]), k
    assert read_scalars(tmp_path / "default" / "log")["loss"] == read_scalars(tmp_path / "plain" / "log")["loss"]


@pytest.mark.parametrize("fp16", [False, True], ids=["fp32", "fp16"])
def test_step_reads_no_tensor_value_but_the_grad_scalers(data_no_dropout, monkeypatch, fp16):
    """One STAR step (forward, loss, backward, clipping, Lamb, schedule) reads no tensor value on the host in our
    code (a GPU would wait there): fp32 none, fp16 only the GradScaler's inf check.  Counted through the Tensor
    methods that read values (transformers' attention-mask check, one per encoder call, left aside)."""
    import traceback

    from infra.optim import build_optimizer, linear_schedule, make_grad_scaler, optimizer_step, param_groups
    from dataset import TokenIdsCache, TrainCollator, TrainInbatchWithHardDataset, load_hardneg, load_rel
    from model import DenseEncoder
    from star.train import BatchEncoder, accumulate_gradients

    d = data_no_dropout
    rel = load_rel(d["pre"] / "train-qrel.tsv")
    ds = TrainInbatchWithHardDataset(rel, TokenIdsCache(d["pre"], "train-query"), TokenIdsCache(d["pre"], "passages"),
                                     6, 10, 42, hardneg=load_hardneg(d["hard"]), hard_num=2)
    batch = TrainCollator(6, 10, rel)([ds[i] for i in range(4)])
    model = DenseEncoder.from_pretrained(d["init"]).train()
    encoder = BatchEncoder(model)
    optimizer = build_optimizer("lamb", param_groups(model, 0.01), 1e-3)
    scheduler = linear_schedule(optimizer, 2, 10)
    scaler = make_grad_scaler(torch.device("cpu"), fp16)

    def step() -> torch.Tensor:
        loss = accumulate_gradients(encoder, [batch], 1, "star", rel, torch.device("cpu"), scaler, fp16=fp16)
        optimizer_step(list(model.parameters()), optimizer, scheduler, scaler, 1.0)
        return loss

    def counting(name: str, original):
        def read(self, *args, **kwargs):
            caller = traceback.extract_stack(limit=2)[0]
            if "transformers" not in caller.filename:
                reads.append((name, Path(caller.filename).name))
            return original(self, *args, **kwargs)
        return read

    step()
    reads: list = []
    for name in ("item", "tolist", "__bool__", "__float__", "__int__", "cpu", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, counting(name, getattr(torch.Tensor, name)))
    loss = step()
    monkeypatch.undo()
    assert torch.isfinite(loss) and (fp16 or scheduler.last_epoch == 2)   # fp16 may skip a step on inf
    assert reads == ([("item", "grad_scaler.py")] if fp16 else [])

# -- DDP ------------------------------------------------------------------------------------------------------

def global_batch(d: dict, mode: str):
    """The first 6 items of the training set for ``mode`` (hard_num/rand_num 2), with the rel dict."""
    from dataset import (TokenIdsCache, TrainInbatchDataset, TrainInbatchWithHardDataset,
                         TrainInbatchWithRandDataset, load_hardneg, load_rel)

    rel = load_rel(d["pre"] / "train-qrel.tsv")
    common = (rel, TokenIdsCache(d["pre"], "train-query"), TokenIdsCache(d["pre"], "passages"), 6, 10, 42)
    if mode == "star":
        ds = TrainInbatchWithHardDataset(*common, hardneg=load_hardneg(d["hard"]), hard_num=2)
    elif mode == "rand":
        ds = TrainInbatchWithRandDataset(*common, rand_num=2)
    else:
        ds = TrainInbatchDataset(*common)
    return [ds[i] for i in (3, 4, 5, 0, 1, 2)], rel


def loss_and_grads(d: dict, mode: str, items: list, rel: dict, wrap_ddp: bool):
    from torch.nn.parallel import DistributedDataParallel

    from dataset import TrainCollator
    from model import DenseEncoder
    from star import train as star_train
    from infra.distributed import all_reduce_sum, get_world_size

    model = DenseEncoder.from_pretrained(d["init"])
    wrapped = star_train.BatchEncoder(model)
    if wrap_ddp:
        wrapped = DistributedDataParallel(wrapped)
    batch = TrainCollator(6, 10, rel)(items)
    loss = star_train.forward_loss(wrapped, batch, mode, rel, torch.device("cpu"))
    loss.backward()
    global_loss = all_reduce_sum(loss.detach()) / get_world_size()
    return global_loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}


def _ddp_worker(rank: int, world: int, port: int, d: dict, queue) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    from infra.distributed import barrier, cleanup_distributed, init_distributed

    init_distributed(no_cuda=True)
    try:
        for mode in ("star", "inbatch", "rand"):
            items, rel = global_batch(d, mode)
            local = items[:4] if rank == 0 else items[4:]            # unequal split: 4 + 2 queries
            loss, grads = loss_and_grads(d, mode, local, rel, wrap_ddp=True)
            if rank == 0:  # numpy: a tensor in a Queue is shared memory that dies with this process
                queue.put((mode, loss, {k: g.numpy() for k, g in grads.items()}))
        barrier()  # both ranks done before the group is torn down
    finally:
        cleanup_distributed()
    end_spawned_worker(queue)


@pytest.mark.slow
def test_ddp_two_processes_match_one_process_on_the_global_batch(data_no_dropout):
    d = data_no_dropout
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_ddp_worker, args=(r, 2, port, d, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = {}
    for _ in range(3):
        mode, loss, grads = queue.get(timeout=90)
        results[mode] = (loss, grads)
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    for mode in ("star", "inbatch", "rand"):
        items, rel = global_batch(d, mode)
        loss, grads = loss_and_grads(d, mode, items, rel, wrap_ddp=False)
        ddp_loss, ddp_grads = results[mode]
        assert ddp_loss == pytest.approx(loss, rel=1e-5), mode
        assert max(g.abs().max().item() for g in grads.values()) > 0
        for name, g in grads.items():
            torch.testing.assert_close(torch.from_numpy(ddp_grads[name]), g, rtol=1e-4, atol=1e-6,
                                       msg=f"{mode} {name}")


@pytest.mark.slow
def test_torchrun_two_processes_train_like_one_process(data_no_dropout, tmp_path):
    """End to end (the script run as a file by torchrun): 2 ranks x batch 2 and one process with batch 4 reach
    the same weights after 4 steps (12 queries: one epoch of 3 steps, then the first step of the next)."""
    from star import train as star_train

    d = data_no_dropout
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    star_train.main(star_cli_args(d, tmp_path / "one", "star", "--max_steps", "4"))
    two = star_cli_args(d, tmp_path / "two", "star", "--max_steps", "4", batch=2)
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
                          str(REPO / "star" / "train.py"), *two], env=env, timeout=120, capture_output=True,
                         text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    w1, w2 = load_weights(tmp_path / "one"), load_weights(tmp_path / "two")
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-4, atol=1e-5, msg=k)
