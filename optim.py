"""Optimisation pieces: parameter groups, a learning-rate schedule, the Muon optimizer and Lookahead averaging.

Each is independent of the Trainer: a task script builds its optimizer, scheduler and averaging from these
and hands them to the Trainer, which steps them.
"""
import torch
from torch import nn


def parameter_groups(model, learning_rate, weight_decay, norm_bias_lr_scale=1.0, filters_apart=False):
    """Optimizer parameter groups of the trainable parameters, named by their "name" key.

    "norm biases" (the shifts of batch/layer/group norms) train at learning_rate x norm_bias_lr_scale;
    airbench raises it 64-fold: a shift is one number per channel and moves slowly at the rate the
    weights need. With filters_apart, the conv filters (4-D weights) form a group "conv filters"
    (for Muon, say); "other" holds the rest.
    weight_decay is decoupled from the learning rate: the fraction of each parameter removed per step,
    in every group (PyTorch's SGD removes lr x weight_decay, hence the division below).
    https://myrtle.ai/learn/how-to-train-your-resnet-5-hyperparameters/
    """
    norm_types = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)
    norm_biases = {id(m.bias) for m in model.modules() if isinstance(m, norm_types) and m.bias is not None}
    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = [dict(name="norm biases", lr=learning_rate * norm_bias_lr_scale,
                   params=[p for p in trainable if id(p) in norm_biases])]
    rest = [p for p in trainable if id(p) not in norm_biases]
    if filters_apart:
        groups.append(dict(name="conv filters", lr=learning_rate, params=[p for p in rest if p.dim() == 4]))
        rest = [p for p in rest if p.dim() != 4]
    groups.append(dict(name="other", lr=learning_rate, params=rest))
    groups = [group for group in groups if group["params"]]
    for group in groups:
        group["weight_decay"] = weight_decay / group["lr"]
    return groups


def orthogonalize(matrices, steps=3, eps=1e-7):
    """About U V^T for each matrix = U S V^T of `matrices` ([rows, cols], or a batch [B, rows, cols] of one shape):
    each singular value set near 1 (between about 0.5 and 1.5 after 3 steps, which trains as well as exactly 1), by
    a quintic Newton-Schulz iteration. The coefficients are Keller Jordan's, chosen for the steepest rise at 0
    (https://kellerjordan.github.io/posts/muon/). A batch is iterated at once, each product one batched matmul."""
    a, b, c = 3.4445, -4.7750, 2.0315
    wide = matrices.size(-2) <= matrices.size(-1)
    x = matrices if wide else matrices.mT  # iterate on the smaller Gram matrix
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + eps)  # every singular value <= 1, where the iteration converges
    for _ in range(steps):
        gram = x @ x.mT
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x if wide else x.mT


class Muon(torch.optim.Optimizer):
    """Nesterov SGD, except in the parameter groups with orthogonalize=True: there each weight's update (its
    filters flattened to one row each) is orthogonalised, and the weight is kept at norm sqrt(rows) (rows of
    norm 1 on average) instead of decaying.

    Muon (Keller Jordan, https://kellerjordan.github.io/posts/muon/) for conv filters, as in airbench94_muon
    (https://github.com/KellerJordan/cifar10-airbench): an orthogonalised update moves the filters by the same
    amount in every direction that the gradient spans, where SGD's update is dominated by a few directions.
    With the weight's norm fixed and batch norm after the conv, lr is the relative change of a filter bank
    per step. The other groups step exactly as torch.optim.SGD(nesterov=True) with their weight_decay.

    On a GPU a step launches a few kernels per group, not a few per weight: the elementwise work of all a group's
    weights is one _foreach op each (one fused kernel on CUDA), and the filter banks of one shape are orthogonalised
    as one batch (orthogonalized). There each small kernel costs its launch, most of the optimizer's time.
    """

    def __init__(self, params, lr, momentum=0.0, weight_decay=0.0, orthogonalize=False, newton_schulz_steps=3):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                                      orthogonalize=orthogonalize, newton_schulz_steps=newton_schulz_steps))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            if group["weight_decay"] and not group["orthogonalize"]:
                grads = torch._foreach_add(grads, params, alpha=group["weight_decay"])
            for p in params:
                if "momentum_buffer" not in self.state[p]:
                    self.state[p]["momentum_buffer"] = torch.zeros_like(p)
            buffers = [self.state[p]["momentum_buffer"] for p in params]
            torch._foreach_mul_(buffers, group["momentum"])
            torch._foreach_add_(buffers, grads)
            updates = torch._foreach_add(grads, buffers, alpha=group["momentum"])  # Nesterov: a step ahead
            if group["orthogonalize"]:
                scales = torch._foreach_reciprocal(torch._foreach_norm(params))  # each weight back to norm sqrt(rows)
                torch._foreach_mul_(scales, [len(p) ** 0.5 for p in params])
                torch._foreach_mul_(params, scales)
                updates = orthogonalized(updates, group["newton_schulz_steps"])
            torch._foreach_add_(params, updates, alpha=-group["lr"])


def orthogonalized(updates, steps, batch=None):
    """orthogonalize() of each update's filters as rows of a matrix. With batch (the default on a GPU), the
    updates of one shape are iterated as one batch: a step there is bound by kernel launches, not arithmetic.
    On the CPU, which is bound by arithmetic, one at a time: a batch of a few products spread over the cores was
    slower there (0.7-0.9x the speed; records/cpu_zen5/README.md). Both give the same bits."""
    groups = {}
    for i, update in enumerate(updates):
        together = update.is_cuda if batch is None else batch
        groups.setdefault(update.shape if together else i, []).append(i)
    result = [None] * len(updates)
    for indices in groups.values():
        shape = updates[indices[0]].shape
        if len(indices) == 1:  # no batch to make: no copy either
            result[indices[0]] = orthogonalize(updates[indices[0]].reshape(shape[0], -1), steps).view(shape)
            continue
        matrices = torch.stack([updates[i].reshape(shape[0], -1) for i in indices])  # [B, filters, inputs x kernel]
        for i, matrix in zip(indices, orthogonalize(matrices, steps), strict=True):
            result[i] = matrix.view(shape)
    return result


def warmup_decay(total_steps, start=0.0, peak_at=0.2, end=0.0):
    """A triangular learning-rate factor, step -> factor: `start` rising linearly to 1 at
    step peak_at x total_steps, then falling linearly to `end` at total_steps (and staying there)."""
    peak = max(1, round(total_steps * peak_at))

    def factor(step):
        if step < peak:
            return start + (1 - start) * step / peak
        return end + (1 - end) * max(0.0, (total_steps - step) / max(1, total_steps - peak))

    return factor


class Lookahead:
    """Lookahead weight averaging, as in airbench: every `every` steps from `start_step` on, an exponential
    average of the weights (and batch-norm statistics) moves towards the model, and the model is set back
    to the average; at the end of each epoch the model is set to the average once more.

    The average keeps decay x (step / total_steps)^power of itself at each update: the averaging is weak
    while the learning rate is high and strong as it falls, so the run ends on an average of its last few
    hundred steps. Zhang et al., "Lookahead Optimizer: k steps forward, 1 step back"
    (https://arxiv.org/abs/1907.08610); the schedule is airbench94's (every 5 steps of 1024 images, decay 0.95^5).
    """

    def __init__(self, total_steps, start_step, every=5, decay=0.95 ** 5, power=3.0):
        self.total_steps, self.start_step, self.every = total_steps, start_step, every
        self.decay, self.power = decay, power
        self.average = None  # {state-dict key: tensor}, floating-point entries only, after start_step

    def after_step(self, model, step, epoch_end):
        """Update after optimisation step number `step` (1-based)."""
        if step >= self.start_step and step % self.every == 0:
            if self.average is None:
                self.average = {k: v.detach().clone() for k, v in model.state_dict().items()
                                if v.is_floating_point()}
            else:
                self.pull(model, self.decay * (step / self.total_steps) ** self.power)
        if epoch_end and self.average is not None:
            self.pull(model, 1.0)  # the model becomes the average

    @torch.no_grad()
    def pull(self, model, decay):
        """average <- decay x average + (1 - decay) x model; then model <- average."""
        state = model.state_dict()
        for key, average in self.average.items():
            average.lerp_(state[key], 1 - decay)
            state[key].copy_(average)

    def state_dict(self):
        return dict(average=self.average)

    def load_state_dict(self, state, device):
        self.average = None if state["average"] is None else {k: v.to(device) for k, v in state["average"].items()}
