"""The loop's guard on its own: a non-finite loss skips every later fused step on the device, the host learns of it
at the next read (with the position before it), and Ctrl-C asks for a stop, twice for an immediate one."""

import math

import pytest
import torch
from accelerate import Accelerator
from torch import nn
from transformers import get_cosine_schedule_with_warmup

from rrm_hub.training.guard import NonFiniteGuard, StopRequest


def _setup(fused=True):
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, fused=fused or None, foreach=None if fused else False)
    scheduler = get_cosine_schedule_with_warmup(optimizer, 0, 10)
    accelerator = Accelerator(cpu=True)
    return model, optimizer, scheduler, NonFiniteGuard(optimizer, accelerator, StopRequest(False))


def _step(model, optimizer, scheduler, guard, poison=False):
    loss = model(torch.ones(3, 4)).sum() * (float("nan") if poison else 1.0)
    go_on = guard.check(loss)
    if go_on:
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
    return go_on


def test_a_nan_skips_every_later_fused_step_until_the_host_reads():
    model, optimizer, scheduler, guard = _setup(fused=True)
    assert not guard.per_step  # a fused optimizer skips on the device: no host read per step
    for step in range(2):
        guard.mark(step, step, step, scheduler)
        assert _step(model, optimizer, scheduler, guard)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    lr_before = optimizer.param_groups[0]["lr"]
    guard.mark(2, 2, 2, scheduler)
    assert _step(model, optimizer, scheduler, guard, poison=True)  # the host has not looked yet
    guard.mark(3, 3, 3, scheduler)
    assert _step(model, optimizer, scheduler, guard)  # a finite loss after the NaN: skipped all the same
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    bad, value, stopping, last = guard.read(4)
    assert (bad.step, bad.batches, bad.count) == (2, 2, 2) and value != value and not stopping and math.isfinite(last)
    guard.rewind(scheduler, bad)
    assert optimizer.param_groups[0]["lr"] == lr_before and scheduler.last_epoch == 2


def test_an_optimizer_that_cannot_skip_is_read_at_every_step():
    model, optimizer, scheduler, guard = _setup(fused=False)
    assert guard.per_step
    guard.mark(0, 0, 0, scheduler)
    assert _step(model, optimizer, scheduler, guard)
    guard.mark(1, 1, 1, scheduler)
    assert not _step(model, optimizer, scheduler, guard, poison=True)  # refused before its optimizer step
    assert guard.read(2)[0].step == 1


def test_ctrl_c_asks_for_a_stop_and_a_second_one_stops_at_once():
    with StopRequest(True) as stop:
        assert stop.active and not stop.requested
        stop._handle(2, None)
        assert stop.requested
        with pytest.raises(KeyboardInterrupt):
            stop._handle(2, None)
    assert not StopRequest(False).active  # a run without checkpoints keeps Python's own Ctrl-C
