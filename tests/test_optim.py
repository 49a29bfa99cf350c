"""The optimisation pieces: parameter groups, the schedule, Muon and Lookahead."""
import pytest
import torch
from torch import nn

import optim


def test_lookahead_follows_its_formula_step_by_step():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    lookahead = optim.Lookahead(total_steps=20, start_step=4, every=2, decay=0.5, power=2.0)
    average = None
    for step in range(1, 21):
        with torch.no_grad():  # an "optimiser step": every float entry moves
            for value in model.state_dict().values():
                if value.is_floating_point():
                    value.add_(torch.randn_like(value))
        before = {k: v.clone() for k, v in model.state_dict().items() if v.is_floating_point()}
        epoch_end = step % 10 == 0
        lookahead.after_step(model, step, epoch_end)
        after = {k: v for k, v in model.state_dict().items() if v.is_floating_point()}
        if step < 4 or (step % 2 and average is None):
            assert all(torch.equal(before[k], after[k]) for k in before)  # not started: untouched
            continue
        if step % 2 == 0:
            if average is None:
                average = before  # the first update only takes a copy
            else:
                rho = 0.5 * (step / 20) ** 2
                average = {k: rho * average[k] + (1 - rho) * before[k] for k in before}
            assert all(torch.allclose(after[k], average[k]) for k in before)  # the model is set to the average
        elif epoch_end:
            assert all(torch.allclose(after[k], average[k]) for k in before)
        else:
            assert all(torch.equal(before[k], after[k]) for k in before)
    assert "1.running_mean" in average and "1.num_batches_tracked" not in average  # statistics too, counters not


def test_parameter_groups_raise_norm_biases_and_decouple_weight_decay():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, bias=True), nn.BatchNorm2d(4), nn.Linear(4, 2))
    model[1].weight.requires_grad_(False)
    groups = {g["name"]: g for g in optim.parameter_groups(model, 0.1, 0.01, norm_bias_lr_scale=64)}
    assert [p is model[1].bias for p in groups["norm biases"]["params"]] == [True]
    assert groups["norm biases"]["lr"] == pytest.approx(6.4)
    assert {id(p) for p in groups["other"]["params"]} == {id(model[0].weight), id(model[0].bias), id(model[2].weight),
                                                         id(model[2].bias)}  # not the frozen norm scale
    assert all(g["lr"] * g["weight_decay"] == pytest.approx(0.01) for g in groups.values())


def test_warmup_decay_is_a_triangle():
    factor = optim.warmup_decay(100, start=0.2, peak_at=0.25, end=0.1)
    assert factor(0) == pytest.approx(0.2) and factor(25) == pytest.approx(1.0)
    assert factor(12.5) == pytest.approx(0.6) and factor(100) == pytest.approx(0.1)
    assert factor(62.5) == pytest.approx(0.55) and factor(150) == pytest.approx(0.1)


def test_parameter_groups_can_put_conv_filters_apart():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, bias=True), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 2))
    groups = {g["name"]: g for g in optim.parameter_groups(model, 0.1, 0.01, filters_apart=True)}
    assert [p is model[0].weight for p in groups["conv filters"]["params"]] == [True]
    # A norm's scale and a linear layer's weight are "other" too.
    assert {id(p) for p in groups["other"]["params"]} == {id(model[0].bias), id(model[1].weight), id(model[3].weight),
                                                          id(model[3].bias)}


def test_orthogonalize_keeps_the_singular_vectors_and_sets_the_singular_values_near_one():
    torch.manual_seed(0)
    for rows, columns in ((8, 36), (36, 8)):
        k = min(rows, columns)
        u, _ = torch.linalg.qr(torch.randn(rows, k))
        v, _ = torch.linalg.qr(torch.randn(columns, k))
        singular_values = torch.logspace(-1, 1, k)  # two decades apart
        result = optim.orthogonalize(u @ torch.diag(singular_values) @ v.T, steps=5)
        assert result.shape == (rows, columns)
        inner = u.T @ result @ v  # diagonal when the singular vectors are kept
        assert torch.allclose(inner, torch.diag(torch.diagonal(inner)), atol=1e-4)
        assert torch.all(torch.diagonal(inner) > 0.5) and torch.all(torch.diagonal(inner) < 1.5)


def test_muon_is_nesterov_sgd_outside_its_orthogonalised_groups():
    torch.manual_seed(0)
    models = [nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 2)) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    sgd = torch.optim.SGD(models[0].parameters(), lr=0.1, momentum=0.8, nesterov=True, weight_decay=0.01)
    muon = optim.Muon(models[1].parameters(), lr=0.1, momentum=0.8, weight_decay=0.01)
    for _ in range(4):
        images, labels = torch.randn(5, 3, 8, 8), torch.randint(0, 2, (5,))
        for model, optimizer in zip(models, (sgd, muon), strict=True):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(images), labels).backward()
            optimizer.step()
    for a, b in zip(models[0].parameters(), models[1].parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-6)


def test_muon_steps_filters_by_orthogonalised_nesterov_momentum_at_a_fixed_norm():
    torch.manual_seed(0)
    weight = nn.Parameter(torch.randn(4, 3, 3, 3))
    optimizer = optim.Muon([weight], lr=0.1, momentum=0.5, weight_decay=0.3, orthogonalize=True)
    buffer = torch.zeros_like(weight)
    for _ in range(3):
        weight.grad = torch.randn_like(weight)
        before = weight.detach().clone()
        optimizer.step()
        buffer = 0.5 * buffer + weight.grad
        update = optim.orthogonalize((weight.grad + 0.5 * buffer).reshape(4, -1)).view_as(weight)
        expected = before * 2 / before.norm() - 0.1 * update  # norm sqrt(4) rows; no weight decay here
        assert torch.allclose(weight.detach(), expected, atol=1e-6)
        assert not torch.allclose(update, weight.grad / weight.grad.norm() * update.norm(), atol=1e-2)  # not plain SGD


def per_bank_muon_step(params, state, lr, momentum, steps=3):
    """Muon's step on conv filters as it was written before it was batched: one filter bank at a time."""
    for p in params:
        buffer = state.setdefault(p, torch.zeros_like(p)).mul_(momentum).add_(p.grad)
        update = p.grad.add(buffer, alpha=momentum)
        p.mul_(len(p) ** 0.5 / p.norm())
        matrix = update.reshape(len(p), -1)
        wide = matrix.size(0) <= matrix.size(1)
        x = matrix if wide else matrix.T
        x = x / (x.norm() + 1e-7)
        for _ in range(steps):
            gram = x @ x.T
            x = 3.4445 * x + (-4.7750 * gram + 2.0315 * gram @ gram) @ x
        p.add_((x if wide else x.T).view_as(p), alpha=-lr)


@pytest.mark.parametrize("model", ["resnet", "vgg"])
def test_muon_batched_over_banks_of_one_shape_steps_as_one_bank_at_a_time_to_the_bit(model):
    """The filter banks of the recipes' networks (and a 1x1 bank with more filters than inputs, whose matrix is
    tall), stepped five times both ways from the same random filters and gradients."""
    import task3

    torch.manual_seed(0)
    network = task3.MODELS[model](widths=task3.RECIPES[model]["widths"])
    shapes = [p.shape for p in network.parameters() if p.dim() == 4 and p.requires_grad] + [(64, 16, 1, 1)]
    assert len(shapes) > len(set(shapes))  # banks of one shape: a batch of more than one
    batched = [torch.randn(shape, requires_grad=True) for shape in shapes]
    reference = [p.detach().clone() for p in batched]
    muon = optim.Muon([dict(params=batched, orthogonalize=True)], lr=0.03, momentum=0.85)
    state = {}
    for _ in range(5):
        grads = [torch.randn(shape) for shape in shapes]
        for p, q, grad in zip(batched, reference, grads, strict=True):
            p.grad, q.grad = grad.clone(), grad.clone()
        muon.step()
        with torch.no_grad():
            per_bank_muon_step(reference, state, lr=0.03, momentum=0.85)
    assert all(torch.equal(p, q) for p, q in zip(batched, reference, strict=True))
    assert all(torch.equal(muon.state[p]["momentum_buffer"], state[q]) for p, q in zip(batched, reference, strict=True))
    # The batches a GPU's step makes (here on the CPU, which steps one bank at a time) give the same bits.
    updates = [torch.randn(shape) for shape in shapes]
    one_by_one, together = (optim.orthogonalized(updates, 3, batch=batch) for batch in (False, True))
    assert all(torch.equal(a, b) for a, b in zip(one_by_one, together, strict=True))
