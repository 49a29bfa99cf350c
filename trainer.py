"""A small model-agnostic Trainer: training loop, validation, early stopping, checkpoints, results."""
import contextlib
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


def predict_plain_and_views(model, images, tta_level=0, memory_format=torch.contiguous_format):
    """(logits of `model` for the images alone, its logits averaged over test-time views of each image).

    tta_level 0: the image alone; 1: it and its mirror image; 2: also both of those translated by
    one pixel up-left and down-right (reflected border), weighted 1/2 untranslated, 1/4 each
    translation. The test-time augmentation of Keller Jordan's airbench
    (https://github.com/KellerJordan/cifar10-airbench): the views a model was trained on, averaged.
    The image alone is one of the views, so both come from the same forward passes. Each view goes in in
    `memory_format`, the model's (a flipped or shifted view of a channels-last batch is not channels-last).
    """
    def logits(x):  # float32 even under autocast: views averaged in bfloat16 would round away close calls
        return model(x.contiguous(memory_format=memory_format)).float()

    plain = logits(images)
    if tta_level == 0:
        return plain, plain
    level1 = 0.5 * (plain + logits(images.flip(-1)))
    if tta_level == 1:
        return plain, level1
    h, w = images.shape[-2:]
    padded = F.pad(images, (1, 1, 1, 1), mode="reflect")
    translated = [padded[..., :h, :w], padded[..., 2:, 2:]]  # content moved down-right, up-left
    return plain, 0.5 * level1 + 0.25 * sum(0.5 * (logits(x) + logits(x.flip(-1))) for x in translated)


def compute_loss_and_accuracy(dataloader, model, loss_criterion, tta_level=0, memory_format=torch.contiguous_format):
    """Average loss per image and accuracy (a fraction) of `model` over every batch of `dataloader`
    (its predictions averaged over test-time views with tta_level > 0; see predict_plain_and_views)."""
    return compute_plain_and_tta(dataloader, model, loss_criterion, tta_level, memory_format)[1]


def compute_plain_and_tta(dataloader, model, loss_criterion, tta_level, memory_format=torch.contiguous_format):
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
            for i, logits in enumerate(predict_plain_and_views(model, images, tta_level, memory_format)):  # float32
                # The criterion averages over its batch; weigh each batch by its size so that a
                # smaller last batch counts for no more than its images.
                total_loss[i] += loss_criterion(logits, labels) * len(labels)
                correct[i] += (logits.argmax(dim=1) == labels).sum()
            count += len(labels)
    model.train(was_training)
    losses, corrects = total_loss.tolist(), correct.tolist()  # the only CPU-GPU syncs
    return tuple((loss / count, right / count) for loss, right in zip(losses, corrects, strict=True))


class Trainer:
    """Trains `model` on (train, validation, test) loaders; keeps the best weights by validation loss.

    Read in order: __init__ (what a run is made of), train (the whole run), run_epochs (the loop),
    train_step, validation_step and should_early_stop, evaluate and save_results (the end), then the
    run state a checkpoint holds (save_run_state, restore).
    """

    def __init__(self, batch_size, learning_rate, early_stop_count, epochs, model, dataloaders, *,
                 optimizer=None, scheduler=None, loss_criterion=None, device=None, validations_per_epoch=2,
                 autocast_dtype=None, channels_last=False, compile_model=False, lookahead=None, tta_level=0,
                 freeze_after=None, resume=False, checkpoint_every_s=300.0,
                 name="model", checkpoint_dir="checkpoints", results_dir="results", settings=None):
        self.batch_size = batch_size
        self.early_stop_count = early_stop_count
        self.epochs = epochs
        self.device = device if device is not None else utils.get_device()
        # Channels-last (NHWC) lets cuDNN use its fastest convolution kernels, tensor cores above all:
        # https://pytorch.org/tutorials/intermediate/memory_format_tutorial.html
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.model = model.to(self.device, memory_format=self.memory_format)
        # What a forward pass calls: the compiled model, or the model itself. The compiled module runs the
        # plain one's parameters; checkpoints are taken from the plain one, so their keys never gain
        # torch.compile's `_orig_mod.` prefix and load into an uncompiled model.
        self.forward_pass = torch.compile(self.model) if compile_model else self.model
        self.autocast_dtype = autocast_dtype  # None: float32 throughout; else forward passes in this dtype
        # float16 has too few exponent bits for small gradients: scale the loss up, and the gradients
        # back down before the step (skipping steps that overflowed). bfloat16 needs none of it.
        self.grad_scaler = torch.amp.GradScaler(self.device.type, enabled=autocast_dtype == torch.float16)
        self.optimizer = optimizer or torch.optim.SGD(self.model.parameters(), lr=learning_rate)
        self.scheduler = scheduler  # stepped after every optimisation step, not every epoch
        self.lookahead = lookahead  # an optim.Lookahead weight average, or None
        # {parameter name: step}: from that step on the parameter stops training. Its gradient, and whatever
        # only it needed (the first conv's input gradient, for a frozen input layer), is no longer computed,
        # so the later steps are cheaper than a zero learning rate would make them (airbench's whitening bias).
        parameters = dict(self.model.named_parameters())
        unknown = set(freeze_after or {}) - set(parameters)
        if unknown:
            raise ValueError(f"freeze_after names no parameter of the model: {sorted(unknown)}")
        self.freeze_after = [(parameters[name], step) for name, step in (freeze_after or {}).items()]
        self.tta_level = tta_level  # test-time augmentation of the final evaluation (see predict_plain_and_views)
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
        self.resume = resume  # True: continue from last.ckpt; "auto": continue, start or skip, whichever fits
        self.checkpoint_every_s = checkpoint_every_s  # training seconds between checkpoints besides validations
        self.checkpoint_dir = pathlib.Path(checkpoint_dir) / name
        self.results_path = pathlib.Path(results_dir) / f"{name}.json"
        # The run's settings; whether this session resumed it is not one (a resumed run's results are the same).
        self.settings = dict({k: v for k, v in (settings or {}).items() if k != "resume"}, batch_size=batch_size,
                             learning_rate=learning_rate, early_stop_count=early_stop_count, epochs=epochs,
                             validations_per_epoch=validations_per_epoch,
                             precision=str(autocast_dtype or torch.float32).removeprefix("torch."),
                             channels_last=channels_last, compiled=compile_model,
                             lookahead=lookahead is not None, tta_level=tta_level)

        # The run state: what a checkpoint saves (save_run_state) besides the model, optimizer and friends.
        self.global_step = 0  # optimisation steps taken; histories are keyed by it, and the position follows from it
        self.skipped_steps = 0  # float16: steps the gradient scaler skipped, their gradients having overflowed
        self.train_history = dict(loss={}, accuracy={})  # per step, on the training batch
        self.validation_history = dict(loss={}, accuracy={})  # per validation, on the whole set
        self.best_val_loss = math.inf
        self.best_step = None
        self.stopped_early = False
        self.training_done = False  # the last step is taken; the final evaluation may still be to come
        self.earlier_train_time = 0.0  # seconds of training before a resume
        self.start_time = time.perf_counter()  # of this session's training
        self.final = None  # {train,val,test}_{loss,accuracy} of the best model, after train()

    def train(self):
        """Train until `epochs` or an early stop; then evaluate the best model on every split and save results.

        With resume=True, first restore the run from last.ckpt and continue it exactly where it stopped;
        a run whose results are saved already is left as it is. resume="auto" (a batch job that a scheduler may
        requeue) does the same where there is a checkpoint, starts the run where there is none, and leaves a
        run whose results file holds it, finished, as it is. SIGINT (Ctrl-C) and SIGTERM end the current step,
        save a checkpoint and raise utils.TrainingInterrupted.

        One process at a time trains a run: another that asks for the same run (a job of an array, say) waits
        for the lock in its checkpoint folder, and then, with resume="auto", finds it finished.
        """
        last = self.checkpoint_dir / "last.ckpt"
        if self.resume is True and not last.is_file():  # refused before anything is made
            raise utils.UserError(f"--resume: nothing to resume at '{last}'; leave out --resume to start the run")
        utils.writable_folder(self.results_path.parent)
        with utils.file_lock(utils.writable_folder(self.checkpoint_dir) / ".train.lock",
                             f"another process training {self.name}"):
            return self.train_unlocked()

    def train_unlocked(self):
        """train(), once this process holds the run's lock."""
        if self.resume == "auto" and self.finished_before():
            print(f"{self.name}: finished already; its results are in '{self.results_path}' (nothing changed)")
            return self.final
        last = self.checkpoint_dir / "last.ckpt"
        if self.resume and last.is_file():
            self.restore(utils.load_checkpoint(last, "cpu"))
            if self.training_done and self.results_path.is_file():
                # The results file may be another run's: one whose own results could not be written (a full disk)
                # leaves the file it would have replaced.
                results = finished_results(self.results_path, self.settings)
                if results is None:
                    print(f"note: '{self.results_path}' does not hold this run (unreadable, or another run's); "
                          f"evaluating the finished run again to remake it")
                else:
                    self.final = results["final"]
                    print(f"{self.name}: finished already; its results are in '{self.results_path}' (nothing changed)")
                    return self.final
        elif self.resume == "auto":
            print(f"{self.name}: nothing to resume at '{last}'; starting the run")
        self.start_time = time.perf_counter()
        if not self.training_done:
            self.model.train()
            with StopSignals() as stop:
                self.run_epochs(stop)
            self.training_done = True
            self.save_run_state("last.ckpt")
        self.train_time = self.elapsed()

        self.load_best_model()
        self.final = self.evaluate()
        self.print_final()
        self.save_results()
        return self.final

    def run_epochs(self, stop):
        """The training loop, from the step after self.global_step to the last epoch's end or an early stop."""
        if self.should_early_stop():  # resumed right after the validation that decided it
            self.stopped_early = True
            return
        first_epoch, first_step = self.position()
        last_save = time.perf_counter()
        for epoch in range(first_epoch, self.epochs):
            start = first_step if epoch == first_epoch else 0  # steps of this epoch taken before a resume
            pending = []  # (step, loss, accuracy) on the device, until the next checkpoint
            progress = tqdm.tqdm(total=self.steps_per_epoch, initial=start, unit="batch", leave=False,
                                 desc=f"epoch {epoch + 1}/{self.epochs}", disable=not progress_bars_wanted())
            for step_in_epoch, (images, labels) in enumerate(self.dataloader_train.batches(start), start + 1):
                for parameter, freeze_at in self.freeze_after:
                    if self.global_step >= freeze_at:
                        parameter.requires_grad_(False)
                loss, accuracy = self.train_step(images, labels)
                self.global_step += 1
                if self.lookahead is not None:
                    self.lookahead.after_step(self.model, self.global_step, step_in_epoch == self.steps_per_epoch)
                pending.append((self.global_step, loss, accuracy))
                progress.update()
                if step_in_epoch % 25 == 0 and not progress.disable:  # a sync now and then, not every step
                    rate = progress.format_dict["rate"] or 0
                    progress.set_postfix_str(f"loss {loss.item():.3f}, {rate * self.batch_size:,.0f} img/s")

                # Checkpoint if due: at every validation, on a stop signal, and every checkpoint_every_s.
                validate = step_in_epoch in self.validate_after
                if validate or stop.signal_number or time.perf_counter() - last_save > self.checkpoint_every_s:
                    self.record_train_history(pending)
                    pending = []
                    if validate:
                        self.validation_step()  # saves last.ckpt (and best.ckpt when it improved)
                    else:
                        self.save_run_state("last.ckpt")
                    last_save = time.perf_counter()
                if stop.signal_number:
                    progress.close()
                    raise utils.TrainingInterrupted(
                        f"{signal.Signals(stop.signal_number).name} at step {self.global_step} (epoch "
                        f"{self.global_step / self.steps_per_epoch:.2f}): saved '{self.checkpoint_dir / 'last.ckpt'}'",
                        stop.signal_number)
                if validate and self.should_early_stop():
                    self.stopped_early = True
                    progress.close()
                    tqdm.tqdm.write(f"early stop: no lower validation loss in the last "
                                    f"{self.early_stop_count - 1} validations")
                    return
            progress.close()

    def position(self):
        """(epoch, steps taken in it) of the latest step, 0-based epoch: a finished epoch is (e, steps_per_epoch),
        since the training loader's saved state is the start of the latest epoch it began."""
        if self.global_step == 0:
            return 0, 0
        epoch = (self.global_step - 1) // self.steps_per_epoch
        return epoch, self.global_step - epoch * self.steps_per_epoch

    def autocast(self):
        """The context forward passes run in: mixed precision when an autocast dtype is set, else none at all
        (a disabled torch.autocast is not free, and on Apple's MPS up to torch 2.3 it raises)."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def train_step(self, images, labels):
        """One optimisation step on a batch -> (cross-entropy, accuracy) on the batch, device tensors, no sync."""
        images = images.to(self.device, memory_format=self.memory_format, non_blocking=True)
        labels = labels.to(self.device, non_blocking=True)
        with self.autocast():
            logits = self.forward_pass(images)
            loss = self.loss_criterion(logits, labels)
        self.optimizer.zero_grad(set_to_none=True)
        self.grad_scaler.scale(loss).backward()
        if self.grad_scaler.is_enabled():
            # The scaler skips a step whose gradients overflowed and halves its scale; it reads the overflow flag on
            # the CPU anyway (a sync in step), so reading the scale twice costs nothing more that matters.
            scale = self.grad_scaler.get_scale()
            self.grad_scaler.step(self.optimizer)
            self.grad_scaler.update()
            self.skipped_steps += self.grad_scaler.get_scale() < scale
        else:
            self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        logits = logits.detach().float()
        # Recorded as plain cross-entropy, like validation, so the two curves compare in one plot.
        if self.loss_criterion is not self.evaluation_criterion:
            loss = self.evaluation_criterion(logits, labels)
        return loss.detach(), (logits.argmax(dim=1) == labels).float().mean()

    def record_train_history(self, pending):
        """Move the pending per-step device tensors into the history as floats, with one sync."""
        if not pending:
            return
        steps, losses, accuracies = zip(*pending, strict=True)
        losses, accuracies = torch.stack(losses).tolist(), torch.stack(accuracies).tolist()  # the one sync
        for step, loss, accuracy in zip(steps, losses, accuracies, strict=True):
            self.train_history["loss"][step] = loss
            self.train_history["accuracy"][step] = accuracy

    def evaluate_on(self, dataloader):
        """(loss, accuracy) of the model over the whole of `dataloader`, in the training's precision."""
        with self.autocast():
            return compute_loss_and_accuracy(dataloader, self.forward_pass, self.evaluation_criterion,
                                             memory_format=self.memory_format)

    def elapsed(self):
        """Seconds of training so far, earlier sessions of a resumed run included."""
        return self.earlier_train_time + time.perf_counter() - self.start_time

    def validation_step(self):
        """Evaluate on the whole validation set, record it, checkpoint, and print one line."""
        previous_validation = max(self.validation_history["loss"], default=0)
        loss, accuracy = self.evaluate_on(self.dataloader_val)
        self.validation_history["loss"][self.global_step] = loss
        self.validation_history["accuracy"][self.global_step] = accuracy
        improved = math.isfinite(loss) and loss < self.best_val_loss  # NaN is never "best"
        if improved:
            self.best_val_loss, self.best_step = loss, self.global_step
            self.save_run_state("best.ckpt")
        self.save_run_state("last.ckpt")
        train_losses = [value for step, value in self.train_history["loss"].items() if step > previous_validation]
        tqdm.tqdm.write(
            f"epoch {self.global_step / self.steps_per_epoch:5.2f} | step {self.global_step:6d} | "
            f"train loss {sum(train_losses) / len(train_losses):.3f} | val loss {loss:.3f} | "
            f"val acc {accuracy:.3f}{' *' if improved else ''} | {self.elapsed():6.1f} s")

    def should_early_stop(self):
        """The starter's rule: stop when the oldest of the last `early_stop_count` validation losses is the lowest."""
        losses = list(self.validation_history["loss"].values())
        if len(losses) < self.early_stop_count:
            return False
        recent = [loss if math.isfinite(loss) else math.inf for loss in losses[-self.early_stop_count:]]
        return recent[0] == min(recent)

    def load_best_model(self):
        """Load the weights with the lowest validation loss from best.ckpt into the model."""
        if self.global_step > 0 and self.best_step is None:
            raise utils.UserError("no validation loss was finite, so there is no best model: "
                                  "training diverged; try a lower --lr")
        # Read on the CPU: the file also holds the optimizer, the averaged weights and the random states, which
        # would all be copied to the GPU first; load_state_dict copies the weights alone into the model.
        checkpoint = utils.load_checkpoint(self.checkpoint_dir / "best.ckpt", "cpu")
        self.model.load_state_dict(checkpoint["model"])

    def evaluate(self):
        """Loss and accuracy of the model over the whole train (unaugmented), validation and test sets;
        with test-time augmentation, also `val_` and `test_` `loss_tta` and `accuracy_tta`."""
        results = {}
        splits = dict(train=self.dataloader_train.evaluation_view(self.dataloader_val.batch_size),
                      val=self.dataloader_val, test=self.dataloader_test)
        for split, loader in splits.items():
            tta_level = self.tta_level if split != "train" else 0
            with self.autocast():
                plain, tta = compute_plain_and_tta(loader, self.forward_pass, self.evaluation_criterion, tta_level,
                                                   self.memory_format)
            results[f"{split}_loss"], results[f"{split}_accuracy"] = plain
            if tta_level:
                results[f"{split}_loss_tta"], results[f"{split}_accuracy_tta"] = tta
        return results

    def print_final(self):
        """The table of Task 2b: loss and accuracy of the best model on each split."""
        print(f"\nbest model: step {self.best_step} (epoch {self.best_step / self.steps_per_epoch:.2f})")
        if self.grad_scaler.is_enabled():
            print(f"float16: the gradient scaler skipped {self.skipped_steps} of {self.global_step} steps "
                  f"(gradients that overflowed)")
        rows = [("train", "train"), ("val", "validation"), ("test", "test")]
        if self.tta_level:
            rows += [("val", "validation", "_tta"), ("test", "test", "_tta")]
        width = 12 if not self.tta_level else 26
        print(f"{'':{width}}{'loss':>8}{'accuracy':>10}")
        for split, label, *tta in rows:
            suffix = tta[0] if tta else ""
            label += f" (TTA level {self.tta_level})" if tta else ""
            loss, accuracy = self.final[f"{split}_loss{suffix}"], self.final[f"{split}_accuracy{suffix}"]
            print(f"{label:{width}}{loss:8.3f}{accuracy:10.3f}")

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
            skipped_steps=self.skipped_steps,
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

    # ------------------------------------------------------------ the run state: checkpoints and resume

    def save_run_state(self, filename):
        """Checkpoint everything that decides the rest of the run, in one dict: model, optimizer, scheduler,
        gradient scaler, averaged weights, random generators, the training loader's epoch, the step, histories."""
        utils.save_checkpoint(dict(
            model=self.model.state_dict(), optimizer=self.optimizer.state_dict(),
            scheduler=self.scheduler.state_dict() if self.scheduler else None,
            grad_scaler=self.grad_scaler.state_dict(),
            lookahead=self.lookahead.state_dict() if self.lookahead else None,
            rng=random_states(), train_loader=self.dataloader_train.state_dict(), global_step=self.global_step,
            skipped_steps=self.skipped_steps,
            train_history=self.train_history, validation_history=self.validation_history,
            best_val_loss=self.best_val_loss, best_step=self.best_step, stopped_early=self.stopped_early,
            training_done=self.training_done, train_time_s=self.elapsed(), settings=self.settings,
        ), self.checkpoint_dir / filename)

    def finished_before(self):
        """Whether the results file holds this run, finished, with these settings; if so, take its figures and
        histories (for the plots), as a restored checkpoint would give them."""
        results = finished_results(self.results_path, self.settings)
        if results is None:
            return False
        self.final, self.best_step, self.global_step = results["final"], results["best_step"], results["steps"]
        self.stopped_early, self.training_done = results["stopped_early"], True
        self.skipped_steps = results.get("skipped_steps", 0)
        self.train_history, self.validation_history = (
            {key: {int(step): value for step, value in values.items()} for key, values in history.items()}
            for history in (results["train_history"], results["validation_history"]))
        return True

    def restore(self, checkpoint):
        """Continue the run saved in `checkpoint` (a last.ckpt); refuse one made with other settings."""
        path = self.checkpoint_dir / "last.ckpt"
        differ = [f"{key} {saved!r} in the checkpoint, {now!r} now"
                  for key, saved, now in settings_differences(checkpoint["settings"], self.settings)]
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
        for key in ("global_step", "best_val_loss", "best_step", "stopped_early", "training_done",
                    "train_history", "validation_history"):
            setattr(self, key, checkpoint[key])
        self.skipped_steps = checkpoint.get("skipped_steps", 0)  # absent from checkpoints made before it was counted
        self.earlier_train_time = checkpoint["train_time_s"]
        if not self.training_done:
            print(f"{self.name}: resuming at step {self.global_step} (epoch "
                  f"{self.global_step / self.steps_per_epoch:.2f}) from '{path}'")


# Settings that say where and how fast a run goes, not what it computes: --resume may change them.
# A precision change is one of them: the checkpoint's weights and optimizer state are float32 whatever the
# forward passes ran in, so a run may go on in another precision (its figures then differ in the last digits).
RESUME_MAY_CHANGE = {"device", "show", "resume", "checkpoint_every", "no_autocast", "bfloat16", "no_channels_last",
                     "compile", "precision", "channels_last", "compiled", "seeds"}


def last_checkpoint(name, checkpoint_dir="checkpoints"):
    """Where the Trainer of run `name` keeps the checkpoint --resume continues from."""
    return pathlib.Path(checkpoint_dir) / name / "last.ckpt"


def settings_differences(saved, now):
    """[(key, saved value, value now)] for each setting that decides what a run computes and differs between two
    settings dicts (nested ones compared entry by entry, as "recipe.lr"); "(unset)" where one lacks it."""
    saved, now = flatten(saved), flatten(now)
    return [(key, saved.get(key, "(unset)"), now.get(key, "(unset)"))
            for key in sorted((set(saved) | set(now)) - RESUME_MAY_CHANGE) if saved.get(key) != now.get(key)]


def finished_results(path, settings):
    """The results file at `path` if it holds a finished run made with `settings` (each of them; where and how fast
    aside), else None: missing, unreadable, cut short, or from other settings."""
    try:
        results = json.loads(pathlib.Path(path).read_text())
        asked = flatten(settings)
        if any(key in asked for key, *_ in settings_differences(results["settings"], settings)) \
                or not isinstance(results["final"], dict):
            return None
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError):
        return None
    return results


def flatten(settings, prefix=""):
    """{"recipe": {"lr": 1.5}} -> {"recipe.lr": 1.5}: nested settings compared and named entry by entry."""
    flat = {}
    for key, value in settings.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat


def random_states():
    """The state of every global random generator a run draws from: Python, NumPy, torch's CPU generator. Not the
    GPUs' generators: nothing draws from them (the loaders draw on the CPU), and their states, one per visible GPU,
    would not restore where fewer GPUs are visible (a cluster job pinned to one)."""
    numpy_state = np.random.get_state(legacy=False)
    numpy_state["state"]["key"] = torch.from_numpy(numpy_state["state"]["key"].astype(np.int64))
    return dict(python=random.getstate(), numpy=numpy_state, torch=torch.get_rng_state())


def set_random_states(states):
    """Set the generators to what random_states() returned (a checkpoint's GPU states, saved before, are left)."""
    random.setstate(states["python"])
    numpy_state = states["numpy"]
    numpy_state["state"]["key"] = numpy_state["state"]["key"].numpy().astype(np.uint32)
    np.random.set_state(numpy_state)
    torch.set_rng_state(states["torch"])


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


def progress_bars_wanted():
    """Progress bars in a terminal or a notebook; not in log files, where they would fill the log. A notebook: this
    process is a Jupyter kernel (IPython's shell there is ZMQInteractiveShell), not merely one that imported
    ipykernel (jupyter_client does, to find its kernels)."""
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None else None
    return sys.stderr.isatty() or type(shell).__name__ == "ZMQInteractiveShell"
