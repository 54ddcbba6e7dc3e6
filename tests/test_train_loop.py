"""The train loop's step on a plan's batch, without Ray: weights, probes, the epoch's batch size."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from pipeline.train.loop import epoch_batch_size, weighted_step
from pipeline.train.models import build_model


def _setup(seed=0):
    torch.manual_seed(seed)
    model = build_model("resnet", 10, 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    return model, opt, sched


def test_probes_get_their_loss_without_touching_the_gradient_or_batchnorm():
    torch.manual_seed(1)
    x, y = torch.randn(12, 1, 28, 28), torch.randint(0, 10, (12,))
    w = torch.tensor([1.5] * 8 + [0.0] * 4)  # the last four rows are probes
    model, opt, sched = _setup()
    twin = copy.deepcopy(model)
    twin_opt = torch.optim.SGD(twin.parameters(), lr=0.1)
    probe_losses_before = F.cross_entropy(copy.deepcopy(model).eval()(x[8:]), y[8:], reduction="none")

    losses = weighted_step(model, {"x": x, "label": y, "weight": w}, weight_mean=1.0, opt=opt, sched=sched)
    assert model.training  # back in training mode after the probes' eval-mode forward

    # The twin takes the same step from the trained rows alone, normalised by the whole batch.
    trained = F.cross_entropy(twin(x[:8]), y[:8], reduction="none")
    twin_opt.zero_grad()
    ((trained * w[:8]).sum() / 12).backward()
    twin_opt.step()
    for a, b in zip(model.state_dict().values(), twin.state_dict().values()):
        torch.testing.assert_close(a, b)  # parameters and BatchNorm statistics alike
    torch.testing.assert_close(losses[:8], trained.detach())
    # A probe's loss is the model's eval-mode loss, taken after the step.
    torch.testing.assert_close(losses[8:], F.cross_entropy(model.eval()(x[8:]), y[8:], reduction="none"))
    assert not torch.allclose(losses[8:], probe_losses_before)


def test_a_batch_of_probes_only_still_steps_with_zero_gradient():
    model, opt, sched = _setup()
    before = copy.deepcopy(model.state_dict())
    x, y = torch.randn(4, 1, 28, 28), torch.randint(0, 10, (4,))
    losses = weighted_step(model, {"x": x, "label": y, "weight": torch.zeros(4)}, 1.0, opt, sched)
    assert losses.shape == (4,) and sched.last_epoch == 1
    for name, value in model.state_dict().items():
        if "running" not in name and "num_batches" not in name:
            torch.testing.assert_close(value, before[name])  # no gradient: weights unchanged


def test_epoch_batch_size_keeps_the_unpruned_step_count():
    # 20,000 rows, 2 workers of 128: 79 steps an epoch.
    assert epoch_batch_size(20_000, 20_000, 128, 2, "full") == 128
    assert epoch_batch_size(12_000, 20_000, 128, 2, "full") == 76  # ceil(12000 / (2 * 79))
    assert -(-6_000 // 76) == 79
    assert epoch_batch_size(12_000, 20_000, 128, 2, "batch") == 128
    assert epoch_batch_size(1, 20_000, 128, 2, "full") == 1
