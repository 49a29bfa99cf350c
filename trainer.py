"""A small model-agnostic Trainer: training loop, validation, early stopping, checkpoints, results."""
import json
import math
import pathlib
import random
import signal
import sys
import threading
import time

import numpy as np

import torch
import torch.nn.functional as F
import tqdm
from torch import nn

import utils


def predict(model, images, tta_level=0):
    """Logits of `model` for `images`, averaged over test-time views of each image.

    tta_level 0: the image alone; 1: it and its mirror image; 2: also both of those translated by
    one pixel up-left and down-right (reflected border), weighted 1/2 untranslated, 1/4 each
    translation. The test-time augmentation of Keller Jordan's airbench
    (https://github.com/KellerJordan/cifar10-airbench): the views a model was trained on, averaged.
    """
    return predict_plain_and_views(model, images, tta_level)[1]


def predict_plain_and_views(model, images, tta_level=0):
    """(logits of the images alone, logits averaged over the views of `tta_level` as in `predict`): the
    image alone is one of the views, so both come from the same forward passes."""
    plain = model(images)
    if tta_level == 0:
        return plain, plain
    level1 = 0.5 * (plain + model(images.flip(-1)))
    if tta_level == 1:
        return plain, level1
    h, w = images.shape[-2:]
    padded = F.pad(images, (1, 1, 1, 1), mode="reflect")
    translated = [padded[..., :h, :w], padded[..., 2:, 2:]]  # content moved down-right, up-left
    return plain, 0.5 * level1 + 0.25 * sum(0.5 * (model(x) + model(x.flip(-1))) for x in translated)


def compute_loss_and_accuracy(dataloader, model, loss_criterion, tta_level=0):
    """Average loss per image and accuracy (a fraction) of `model` over every batch of `dataloader`
    (its predictions averaged over test-time views with tta_level > 0; see predict)."""
    return compute_plain_and_tta(dataloader, model, loss_criterion, tta_level)[1]


def compute_plain_and_tta(dataloader, model, loss_criterion, tta_level):
    """((loss, accuracy) of the plain predictions, (loss, accuracy) of those averaged over the views of
    `tta_level`) of `model` over every batch of `dataloader`, from one pass over the views (see
    predict_plain_and_views); the two pairs are equal at tta_level 0."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total_loss = torch.zeros(2, device=device)
    correct = torch.zeros(2, device=device, dtype=torch.long)
    count = 0
    with torch.no_grad():
        for images, labels in dataloader:
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            for i, logits in enumerate(predict_plain_and_views(model, images, tta_level)):
                logits = logits.float()  # float32 even under autocast: summed over many batches
                # The criterion averages over its batch; weigh each batch by its size so that a
                # smaller last batch counts for no more than its images.
                total_loss[i] += loss_criterion(logits, labels) * len(labels)
                correct[i] += (logits.argmax(dim=1) == labels).sum()
            count += len(labels)
    model.train(was_training)
    losses, corrects = total_loss.tolist(), correct.tolist()  # the only CPU-GPU syncs
    return tuple((loss / count, right / count) for loss, right in zip(losses, corrects))


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


def orthogonalize(matrix, steps=3, eps=1e-7):
    """About U V^T where matrix = U S V^T: each singular value set near 1 (between about 0.5 and 1.5
    after 3 steps, which trains as well as exactly 1), by a quintic Newton-Schulz iteration.
    The coefficients are Keller Jordan's, chosen for the steepest rise at 0 (https://kellerjordan.github.io/posts/muon/)."""
    a, b, c = 3.4445, -4.7750, 2.0315
    wide = matrix.size(0) <= matrix.size(1)
    x = matrix if wide else matrix.T  # iterate on the smaller Gram matrix
    x = x / (x.norm() + eps)  # every singular value <= 1, where the iteration converges
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x if wide else x.T


class Muon(torch.optim.Optimizer):
    """Nesterov SGD, except in the parameter groups with orthogonalize=True: there each weight's update (its
    filters flattened to one row each) is orthogonalised, and the weight is kept at norm sqrt(rows) (rows of
    norm 1 on average) instead of decaying.

    Muon (Keller Jordan, https://kellerjordan.github.io/posts/muon/) for conv filters, as in airbench94_muon
    (https://github.com/KellerJordan/cifar10-airbench): an orthogonalised update moves the filters by the same
    amount in every direction that the gradient spans, where SGD's update is dominated by a few directions.
    With the weight's norm fixed and batch norm after the conv, lr is the relative change of a filter bank
    per step. The other groups step exactly as torch.optim.SGD(nesterov=True) with their weight_decay.
    """

    def __init__(self, params, lr, momentum=0.0, weight_decay=0.0, orthogonalize=False, newton_schulz_steps=3):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                                      orthogonalize=orthogonalize, newton_schulz_steps=newton_schulz_steps))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                if group["weight_decay"] and not group["orthogonalize"]:
                    grad = grad.add(p, alpha=group["weight_decay"])
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buffer = state["momentum_buffer"].mul_(group["momentum"]).add_(grad)
                update = grad.add(buffer, alpha=group["momentum"])  # Nesterov: a step ahead along the momentum
                if group["orthogonalize"]:
                    p.mul_(len(p) ** 0.5 / p.norm())
                    update = orthogonalize(update.reshape(len(p), -1), group["newton_schulz_steps"]).view_as(p)
                p.add_(update, alpha=-group["lr"])


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


def progress_bars_wanted():
    """Progress bars in a terminal or a notebook; not in log files, where they would fill the log."""
    return sys.stderr.isatty() or "ipykernel" in sys.modules


def random_states():
    """The state of every global random generator a run draws from: Python, NumPy, torch (CPU and CUDA)."""
    numpy_state = np.random.get_state(legacy=False)
    numpy_state["state"]["key"] = torch.from_numpy(numpy_state["state"]["key"].astype(np.int64))
    return dict(python=random.getstate(), numpy=numpy_state, torch=torch.get_rng_state(),
                cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [])


def set_random_states(states):
    """Set the generators to what random_states() returned."""
    random.setstate(states["python"])
    numpy_state = states["numpy"]
    numpy_state["state"]["key"] = numpy_state["state"]["key"].numpy().astype(np.uint32)
    np.random.set_state(numpy_state)
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


class StopSignals:
    """While active, SIGINT (Ctrl-C) and SIGTERM (sent by a cluster's scheduler before it kills a job) only
    set `signal_number`: training ends its step and checkpoints before it stops. A second Ctrl-C stops at once."""

    def __enter__(self):
        self.signal_number, self.previous = None, {}
        if threading.current_thread() is threading.main_thread():  # only the main thread may set handlers
            for number in (signal.SIGINT, signal.SIGTERM):
                self.previous[number] = signal.signal(number, self.handle)
        return self

    def handle(self, number, frame):
        if number == signal.SIGINT and self.signal_number == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal_number = number

    def __exit__(self, *exception):
        for number, handler in self.previous.items():
            signal.signal(number, handler)


class Trainer:
    """Trains `model` on (train, validation, test) loaders; keeps the best weights by validation loss."""

    def __init__(self, batch_size, learning_rate, early_stop_count, epochs, model, dataloaders, *,
                 optimizer=None, scheduler=None, loss_criterion=None, device=None, validations_per_epoch=2,
                 autocast_dtype=None, channels_last=False, compile_model=False, lookahead=None, tta_level=0,
                 freeze_after=None, resume=False, checkpoint_every_s=300.0,
                 name="model", checkpoint_dir="checkpoints", results_dir="results", settings=None):
        self.batch_size = batch_size
        self.learning_rate = learning_rate
        self.early_stop_count = early_stop_count
        self.epochs = epochs
        self.device = device if device is not None else utils.get_device()
        # Channels-last (NHWC) lets cuDNN use its fastest convolution kernels, tensor cores above all:
        # https://pytorch.org/tutorials/intermediate/memory_format_tutorial.html
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.model = model.to(self.device, memory_format=self.memory_format)
        # The compiled module runs the plain one's parameters; checkpoints are taken from the plain one,
        # so their keys never gain torch.compile's `_orig_mod.` prefix and load into an uncompiled model.
        self.forward_model = torch.compile(self.model) if compile_model else self.model
        self.autocast_dtype = autocast_dtype  # None: float32 throughout; else forward passes in this dtype
        # float16 has too few exponent bits for small gradients: scale the loss up, and the gradients
        # back down before the step (skipping steps that overflowed). bfloat16 needs none of it.
        self.grad_scaler = torch.amp.GradScaler(self.device.type, enabled=autocast_dtype == torch.float16)
        self.optimizer = optimizer or torch.optim.SGD(self.model.parameters(), lr=learning_rate)
        self.scheduler = scheduler  # stepped after every optimisation step, not every epoch
        self.lookahead = lookahead  # a Lookahead weight average, or None
        # {parameter name: step}: from that step on the parameter stops training. Its gradient, and whatever
        # only it needed (the first conv's input gradient, for a frozen input layer), is no longer computed,
        # so the later steps are cheaper than a zero learning rate would make them (airbench's whitening bias).
        parameters = dict(self.model.named_parameters())
        unknown = set(freeze_after or {}) - set(parameters)
        if unknown:
            raise ValueError(f"freeze_after names no parameter of the model: {sorted(unknown)}")
        self.freeze_after = [(parameters[name], step) for name, step in (freeze_after or {}).items()]
        self.tta_level = tta_level  # test-time augmentation of the final evaluation (see predict), 0 for none
        # Reported losses are plain cross-entropy, comparable across runs whatever trained them
        # (label smoothing, say, raises the training criterion's floor above zero).
        self.evaluation_criterion = nn.CrossEntropyLoss()
        self.loss_criterion = loss_criterion or self.evaluation_criterion  # what is minimised
        self.dataloader_train, self.dataloader_val, self.dataloader_test = dataloaders
        self.steps_per_epoch = len(self.dataloader_train)
        # Validate at evenly spaced steps of every epoch, the last at the epoch's end.
        self.validate_after = {math.ceil(k * self.steps_per_epoch / validations_per_epoch)
                               for k in range(1, validations_per_epoch + 1)}
        self.name = name
        self.resume = resume  # continue from last.ckpt instead of starting afresh
        self.checkpoint_every_s = checkpoint_every_s  # training seconds between checkpoints besides validations
        self.checkpoint_dir = pathlib.Path(checkpoint_dir) / name
        self.results_path = pathlib.Path(results_dir) / f"{name}.json"
        # The run's settings; whether this session resumed it is not one (a resumed run's results are the same).
        self.settings = dict({k: v for k, v in (settings or {}).items() if k != "resume"}, batch_size=batch_size, learning_rate=learning_rate,
                             early_stop_count=early_stop_count, epochs=epochs,
                             validations_per_epoch=validations_per_epoch,
                             precision=str(autocast_dtype or torch.float32).removeprefix("torch."),
                             channels_last=channels_last, compiled=compile_model,
                             lookahead=lookahead is not None, tta_level=tta_level)

        self.global_step = 0  # optimisation steps taken; histories are keyed by it
        self.epoch = 0  # the epoch under way, from 0
        self.step_in_epoch = 0  # its steps taken
        self.train_history = dict(loss={}, accuracy={})  # per step, on the training batch
        self.validation_history = dict(loss={}, accuracy={})  # per validation, on the whole set
        self.best_val_loss = math.inf
        self.best_step = None
        self.stopped_early = False
        self.training_done = False  # the last step is taken; the final evaluation may still be to come
        self.earlier_train_time = 0.0  # seconds of training before a resume
        self.start_time = time.perf_counter()  # of this session's training
        self.final = None  # {train,val,test}_{loss,accuracy} of the best model, after train()

    def autocast(self):
        """The context forward passes run in: mixed precision when an autocast dtype is set, else a no-op."""
        return torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None)

    def train_step(self, images, labels):
        """One optimisation step on a batch -> (cross-entropy, accuracy) on the batch, device tensors, no sync."""
        images = images.to(self.device, memory_format=self.memory_format, non_blocking=True)
        labels = labels.to(self.device, non_blocking=True)
        with self.autocast():
            logits = self.forward_model(images)
            loss = self.loss_criterion(logits, labels)
        self.optimizer.zero_grad(set_to_none=True)
        self.grad_scaler.scale(loss).backward()
        self.grad_scaler.step(self.optimizer)
        self.grad_scaler.update()
        if self.scheduler is not None:
            self.scheduler.step()
        logits = logits.detach().float()
        # Recorded as plain cross-entropy, like validation, so the two curves compare in one plot.
        if self.loss_criterion is not self.evaluation_criterion:
            loss = self.evaluation_criterion(logits, labels)
        return loss.detach(), (logits.argmax(dim=1) == labels).float().mean()

    def evaluate_on(self, dataloader, tta_level=0):
        """(loss, accuracy) of the model over the whole of `dataloader`, in the training's precision."""
        with self.autocast():
            return compute_loss_and_accuracy(dataloader, self.forward_model, self.evaluation_criterion, tta_level)

    def elapsed(self):
        """Seconds of training so far, earlier sessions of a resumed run included."""
        return self.earlier_train_time + time.perf_counter() - self.start_time

    def validation_step(self):
        """Evaluate on the whole validation set, record it, checkpoint, and print one line."""
        loss, accuracy = self.evaluate_on(self.dataloader_val)
        self.validation_history["loss"][self.global_step] = loss
        self.validation_history["accuracy"][self.global_step] = accuracy
        improved = math.isfinite(loss) and loss < self.best_val_loss  # NaN is never "best"
        if improved:
            self.best_val_loss, self.best_step = loss, self.global_step
            self.save_model("best.ckpt")
        self.save_model("last.ckpt")
        previous = list(self.validation_history["loss"])[-2] if len(self.validation_history["loss"]) > 1 else 0
        train_loss = list(self.train_history["loss"].values())[previous - self.global_step:]
        tqdm.tqdm.write(
            f"epoch {self.global_step / self.steps_per_epoch:5.2f} | step {self.global_step:6d} | "
            f"train loss {sum(train_loss) / len(train_loss):.3f} | val loss {loss:.3f} | "
            f"val acc {accuracy:.3f}{' *' if improved else ''} | {self.elapsed():6.1f} s")

    def should_early_stop(self):
        """The starter's rule: stop when the oldest of the last `early_stop_count` validation losses is the lowest."""
        losses = list(self.validation_history["loss"].values())
        if len(losses) < self.early_stop_count:
            return False
        recent = [loss if math.isfinite(loss) else math.inf for loss in losses[-self.early_stop_count:]]
        return recent[0] == min(recent)

    def train(self):
        """Train until `epochs` or an early stop; then evaluate the best model on every split and save results.

        With resume=True, first restore the run from last.ckpt and continue it exactly where it stopped;
        a run whose results are saved already is left as it is. SIGINT (Ctrl-C) and SIGTERM end the current
        step, save a checkpoint and raise utils.TrainingInterrupted.
        """
        if self.resume:
            last = self.checkpoint_dir / "last.ckpt"
            if not last.is_file():
                raise utils.UserError(f"--resume: nothing to resume at '{last}'; leave out --resume to start the run")
            self.restore(utils.load_checkpoint(last, "cpu"))
            if self.training_done and self.results_path.is_file():
                self.final = json.loads(self.results_path.read_text())["final"]
                print(f"{self.name}: finished already; its results are in '{self.results_path}' (nothing changed)")
                return self.final
        self.start_time = time.perf_counter()
        if not self.training_done:
            self.model.train()
            with StopSignals() as stop:
                self.run_epochs(stop)
            self.training_done = True
            self.save_model("last.ckpt")
        self.train_time = self.elapsed()

        self.load_best_model()
        self.final = self.evaluate()
        self.print_final()
        self.save_results()
        return self.final

    def run_epochs(self, stop):
        """The training loop, from the position in self.epoch and self.step_in_epoch to the end or an early stop."""
        last_save = time.perf_counter()
        if self.should_early_stop():  # resumed right after the validation that decided it
            self.stopped_early = True
            return
        for self.epoch in range(self.epoch, self.epochs):
            start, pending = self.step_in_epoch, []  # pending: (step, loss, accuracy) on the device
            progress = tqdm.tqdm(total=self.steps_per_epoch, initial=start, unit="batch", leave=False,
                                 desc=f"epoch {self.epoch + 1}/{self.epochs}", disable=not progress_bars_wanted())
            for self.step_in_epoch, (images, labels) in enumerate(self.dataloader_train.batches(start), start + 1):
                for parameter, step in self.freeze_after:
                    if self.global_step >= step:
                        parameter.requires_grad_(False)
                loss, accuracy = self.train_step(images, labels)
                self.global_step += 1
                if self.lookahead is not None:
                    self.lookahead.after_step(self.model, self.global_step, self.step_in_epoch == self.steps_per_epoch)
                pending.append((self.global_step, loss, accuracy))
                progress.update()
                if self.step_in_epoch % 25 == 0 and not progress.disable:  # a sync now and then, not every step
                    rate = progress.format_dict["rate"] or 0
                    progress.set_postfix_str(f"loss {loss.item():.3f}, {rate * self.batch_size:,.0f} img/s")
                if self.step_in_epoch in self.validate_after:
                    self.record_train_history(pending)
                    pending = []
                    self.validation_step()  # checkpoints too
                    last_save = time.perf_counter()
                    if self.should_early_stop():
                        self.stopped_early = True
                        tqdm.tqdm.write(f"early stop: no lower validation loss in the last "
                                        f"{self.early_stop_count - 1} validations")
                        break
                elif stop.signal_number or time.perf_counter() - last_save > self.checkpoint_every_s:
                    self.record_train_history(pending)
                    pending = []
                    self.save_model("last.ckpt")
                    last_save = time.perf_counter()
                if stop.signal_number:
                    progress.close()
                    raise utils.TrainingInterrupted(
                        f"{signal.Signals(stop.signal_number).name} at step {self.global_step} (epoch "
                        f"{self.global_step / self.steps_per_epoch:.2f}): saved '{self.checkpoint_dir / 'last.ckpt'}'",
                        stop.signal_number)
            progress.close()
            if self.stopped_early:
                break
            self.step_in_epoch = 0

    def record_train_history(self, pending):
        """Move the pending per-step device tensors into the history as floats, with one sync."""
        if not pending:
            return
        steps, losses, accuracies = zip(*pending)
        for step, loss, accuracy in zip(steps, torch.stack(losses).tolist(), torch.stack(accuracies).tolist()):
            self.train_history["loss"][step] = loss
            self.train_history["accuracy"][step] = accuracy

    def evaluate(self):
        """Loss and accuracy of the model over the whole train (unaugmented), validation and test sets;
        with test-time augmentation, also `val_` and `test_` `loss_tta` and `accuracy_tta`."""
        results = {}
        splits = dict(train=self.dataloader_train.evaluation_view(self.dataloader_val.batch_size),
                      val=self.dataloader_val, test=self.dataloader_test)
        for split, loader in splits.items():
            tta_level = self.tta_level if split != "train" else 0
            with self.autocast():
                plain, tta = compute_plain_and_tta(loader, self.forward_model, self.evaluation_criterion, tta_level)
            results[f"{split}_loss"], results[f"{split}_accuracy"] = plain
            if tta_level:
                results[f"{split}_loss_tta"], results[f"{split}_accuracy_tta"] = tta
        return results

    def print_final(self):
        """The table of Task 2b: loss and accuracy of the best model on each split."""
        print(f"\nbest model: step {self.best_step} (epoch {self.best_step / self.steps_per_epoch:.2f})")
        rows = [("train", "train"), ("val", "validation"), ("test", "test")]
        if self.tta_level:
            rows += [("val", "validation", "_tta"), ("test", "test", "_tta")]
        width = 12 if not self.tta_level else 26
        print(f"{'':{width}}{'loss':>8}{'accuracy':>10}")
        for split, label, *tta in rows:
            suffix = tta[0] if tta else ""
            label += f" (TTA level {self.tta_level})" if tta else ""
            print(f"{label:{width}}{self.final[split + '_loss' + suffix]:8.3f}{self.final[split + '_accuracy' + suffix]:10.3f}")

    def save_model(self, filename):
        """Checkpoint everything that decides the rest of the run, in one dict: model, optimizer, scheduler,
        gradient scaler, averaged weights, random generators, the loader's epoch, position, histories."""
        utils.save_checkpoint(dict(
            model=self.model.state_dict(), optimizer=self.optimizer.state_dict(),
            scheduler=self.scheduler.state_dict() if self.scheduler else None,
            grad_scaler=self.grad_scaler.state_dict(),
            lookahead=self.lookahead.state_dict() if self.lookahead else None,
            rng=random_states(), train_loader=self.dataloader_train.state_dict(),
            global_step=self.global_step, epoch=self.epoch, step_in_epoch=self.step_in_epoch,
            train_history=self.train_history, validation_history=self.validation_history,
            best_val_loss=self.best_val_loss, best_step=self.best_step, stopped_early=self.stopped_early,
            training_done=self.training_done, train_time_s=self.elapsed(), settings=self.settings,
        ), self.checkpoint_dir / filename)

    def restore(self, checkpoint):
        """Continue the run saved in `checkpoint` (a last.ckpt); refuse one made with other settings."""
        path = self.checkpoint_dir / "last.ckpt"
        if "rng" not in checkpoint:
            raise utils.UserError(f"--resume: '{path}' was written before runs could be resumed; "
                                  f"start again without --resume")
        saved = checkpoint["settings"]
        differ = [f"{key} {saved.get(key, '(unset)')!r} in the checkpoint, {self.settings.get(key, '(unset)')!r} now"
                  for key in sorted((set(saved) | set(self.settings)) - utils.RESUME_MAY_CHANGE)
                  if saved.get(key) != self.settings.get(key)]
        if differ:
            raise utils.UserError(f"--resume: '{path}' is a run with other settings: {'; '.join(differ)}. "
                                  f"Use the checkpoint's values, or leave out --resume to start afresh")
        self.model.load_state_dict(checkpoint["model"])
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        if self.scheduler is not None:
            self.scheduler.load_state_dict(checkpoint["scheduler"])
        if checkpoint["grad_scaler"]:  # empty when saved where float16 was off (another device, say)
            self.grad_scaler.load_state_dict(checkpoint["grad_scaler"])
        if self.lookahead is not None:
            self.lookahead.load_state_dict(checkpoint["lookahead"], self.device)
        self.dataloader_train.load_state_dict(checkpoint["train_loader"])
        set_random_states(checkpoint["rng"])
        for key in ("global_step", "epoch", "step_in_epoch", "best_val_loss", "best_step", "stopped_early",
                    "training_done", "train_history", "validation_history"):
            setattr(self, key, checkpoint[key])
        self.earlier_train_time = checkpoint["train_time_s"]
        if not self.training_done:
            print(f"{self.name}: resuming at step {self.global_step} (epoch "
                  f"{self.global_step / self.steps_per_epoch:.2f}) from '{path}'")

    def load_best_model(self):
        """Load the weights with the lowest validation loss from best.ckpt into the model."""
        if self.global_step > 0 and self.best_step is None:
            raise utils.UserError("no validation loss was finite, so there is no best model: "
                                  "training diverged; try a lower --lr")
        checkpoint = utils.load_checkpoint(self.checkpoint_dir / "best.ckpt", self.device)
        self.model.load_state_dict(checkpoint["model"])

    def save_results(self):
        """Write results/<name>.json: final figures, histories, settings, device and wall time."""
        def history(h):
            return {key: {str(step): value for step, value in values.items()} for key, values in h.items()}

        results = dict(
            name=self.name,
            command=" ".join(["python", *sys.argv]),
            final=self.final,
            best_step=self.best_step,
            steps=self.global_step,
            steps_per_epoch=self.steps_per_epoch,
            epochs_run=self.global_step / self.steps_per_epoch,
            stopped_early=self.stopped_early,
            settings=self.settings,
            dataset_sizes=dict(train=self.dataloader_train.num_images, val=self.dataloader_val.num_images,
                               test=self.dataloader_test.num_images),
            model=type(self.model).__name__,
            parameters=sum(p.numel() for p in self.model.parameters()),
            optimizer=dict(name=type(self.optimizer).__name__, **self.optimizer.defaults),
            loss=type(self.loss_criterion).__name__ + (
                f" (label smoothing {self.loss_criterion.label_smoothing})"
                if getattr(self.loss_criterion, "label_smoothing", 0) else ""),
            device=utils.describe_device(self.device),
            torch_version=torch.__version__,
            train_time_s=self.train_time,
            wall_time_s=self.elapsed(),
            train_history=history(self.train_history),
            validation_history=history(self.validation_history),
        )
        utils.save_json(results, self.results_path)
        print(f"saved {self.results_path}")
