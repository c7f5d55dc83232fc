"""lmlab.train.split: each batch's rows split between threads, each on a replica of the model.

A split step computes the whole batch's loss and gradients (within fp32 rounding) and trains
as one thread over all rows does (the losses of a few AdamW steps, with accumulation), gives the
same numbers bit for bit every run (what a resumed run relies on), and is chosen by itself only
where the rows divide and each share has enough work. Models are tiny (2 layers, 32 wide).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lmlab.errors import LmlabError
from lmlab.train.config import TrainConfig, model_config
from lmlab.train.data import Batches
from lmlab.train.loop import Dist, LossModel, make_optimizer, new_model, row_split, train_step
from lmlab.train.split import MIN_SHARE_FLOPS, _parts, split_workers

CPU = torch.device("cpu")


@pytest.fixture()
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def _train(arch: str, workers: int, grad_accum: int = 1, steps: int = 4):
    """Losses and final parameters of ``steps`` steps of a tiny model on random tokens, seeded."""
    tc = TrainConfig(
        arch=arch, n_layers=2, d_model=32, n_heads=2, block_size=16, batch_size=6, grad_accum=grad_accum,
        lr=1e-2, warmup=1, steps=steps, workers=workers, dtype="float32",
    )  # fmt: skip
    torch.manual_seed(0)
    model = new_model(model_config(tc, 40), CPU)
    before = [p.detach().clone() for p in model.parameters()]
    opt = make_optimizer(model, tc, CPU)
    tokens = np.random.default_rng(0).integers(0, 40, 4000).astype(np.uint16)
    batches = Batches(tokens, tc.block_size, tc.batch_size, tc.seed)
    split = row_split(model, workers, Dist(), "float32")
    assert (split is None) == (workers == 1)
    try:
        net = LossModel(model)
        losses = [float(train_step(net, model, opt, batches, tc, s, Dist(), "float32", split)) for s in range(steps)]
    finally:
        if split is not None:
            split.close()
    return losses, before, [p.detach() for p in model.parameters()]


@pytest.mark.parametrize("arch,workers", [("gpt2", 2), ("llama", 2), ("gpt2", 3)])
def test_the_split_gradients_are_those_of_one_pass_over_all_rows(arch, workers, two_threads):
    """Each share's loss weighted by its rows, the replicas' gradients added into the model's: the
    whole batch's mean loss and gradients, within fp32 rounding (1e-5 of the largest gradient)."""
    tc = TrainConfig(arch=arch, n_layers=2, d_model=32, n_heads=2, block_size=16, batch_size=6)
    torch.manual_seed(0)
    model = new_model(model_config(tc, 40), CPU)
    ids = torch.randint(0, 40, (6, 17), generator=torch.Generator().manual_seed(1))
    x, y = ids[:, :-1], ids[:, 1:]
    loss = LossModel(model)(x, y)
    loss.backward()
    want = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    split = row_split(model, workers, Dist(), "float32")
    try:
        with split.step():
            got_loss = split.forward_backward(x, y, 1.0)
            split.reduce()
    finally:
        split.close()
    assert abs(float(got_loss) - loss.item()) <= 1e-6 * loss.item()
    for p, w in zip(model.parameters(), want):
        assert (p.grad - w).abs().max() <= 1e-5 * w.abs().max(), (p.grad - w).abs().max()
    assert all(p.grad is None for r in split.params[1:] for p in r)  # the replicas' are handed over


@pytest.mark.parametrize("arch,workers,grad_accum", [("gpt2", 2, 1), ("llama", 2, 1), ("gpt2", 3, 2)])
def test_split_steps_give_the_losses_of_one_thread_over_all_rows(arch, workers, grad_accum, two_threads):
    """Four AdamW steps (clipping, accumulation): the losses within 1e-5. (Not the parameters
    element by element: AdamW's update of a gradient near 0 turns rounding into up to lr a step.)"""
    one, _, _ = _train(arch, 1, grad_accum)
    split, _, _ = _train(arch, workers, grad_accum)
    assert all(abs(a - b) <= 1e-5 * abs(a) for a, b in zip(one, split)), (one, split)


def test_a_split_run_repeats_itself_bit_for_bit(two_threads):
    (l1, _, p1), (l2, _, p2) = _train("gpt2", 2), _train("gpt2", 2)
    assert l1 == l2
    assert all(torch.equal(a, b) for a, b in zip(p1, p2))


def test_the_split_is_chosen_where_the_rows_divide_and_each_share_has_enough_work():
    big = MIN_SHARE_FLOPS  # a row's work: any share of a row or more is enough
    assert split_workers(0, 8, 2, big) == 2
    assert split_workers(0, 12, 8, big) == 6  # the most threads that divide the rows
    assert split_workers(0, 7, 2, big) == 1  # 7 rows do not split in two
    assert split_workers(0, 12, 2, MIN_SHARE_FLOPS / 7) == 1  # 6 rows a share are not enough work
    assert split_workers(0, 12, 4, MIN_SHARE_FLOPS / 5) == 2  # 6 rows a share are enough, 4 are not
    assert split_workers(3, 12, 2, 1.0) == 3 and split_workers(1, 12, 8, big) == 1  # asked
    sizes = [5, 1, 1, 9, 2, 2, 4]
    for n in (1, 2, 3, 7, 9):
        b = _parts(sizes, n)
        assert len(b) == n + 1 and b[0] == 0 and b[-1] == len(sizes) and b == sorted(b)
    assert _parts(sizes, 2) == [0, 4, 7]  # 16 of 24 by the fourth: the halves are 0..3 and 4..6


@pytest.mark.parametrize("workers", [5, -1])
def test_workers_that_do_not_split_the_batch_get_one_sentence(workers):
    with pytest.raises(LmlabError, match="--workers"):
        TrainConfig(batch_size=12, workers=workers).check()


def test_an_error_in_another_threads_share_is_raised_by_the_step(two_threads):
    from contextlib import nullcontext

    from lmlab.train.split import RowSplit

    tc = TrainConfig(n_layers=1, d_model=32, n_heads=2, block_size=8, batch_size=4)
    model = new_model(model_config(tc, 40), CPU)

    class Fails(torch.nn.Module):
        def forward(self, x, y):
            raise ValueError(f"share of {len(x)} rows failed")

    split = RowSplit(model, 2, lambda m: LossModel(m) if m is model else Fails(), nullcontext)
    ids = torch.randint(0, 40, (4, 9))
    try:
        with pytest.raises(ValueError, match="share of 2 rows failed"):
            split.forward_backward(ids[:, :-1], ids[:, 1:], 1.0)
    finally:
        split.close()
