"""Keras callbacks: the hooks fit calls, History, the progress bar, and the usual
training controls, with Keras 3's defaults and monitor rules."""

from __future__ import annotations

import csv
import sys
import time

import numpy as np


class Callback:
    #: whether it writes files: in data-parallel training only process 0 runs it
    writes_files = False

    def __init__(self):
        self.model = None
        self.params: dict = {}

    def set_model(self, model) -> None:
        self.model = model

    def set_params(self, params: dict) -> None:
        self.params = params

    def on_train_begin(self, logs=None): ...
    def on_train_end(self, logs=None): ...
    def on_epoch_begin(self, epoch, logs=None): ...
    def on_epoch_end(self, epoch, logs=None): ...
    def on_train_batch_begin(self, batch, logs=None): ...
    def on_train_batch_end(self, batch, logs=None): ...


class History(Callback):
    def on_train_begin(self, logs=None):
        self.history: dict[str, list[float]] = {}
        self.epoch: list[int] = []

    def on_epoch_end(self, epoch, logs=None):
        self.epoch.append(epoch)
        for k, v in (logs or {}).items():
            self.history.setdefault(k, []).append(float(v))


def _format(v: float) -> str:
    return f"{v:.4f}" if abs(v) > 1e-3 else f"{v:.4e}"


def _per_step(seconds: float) -> str:
    if seconds >= 1:
        return f"{seconds:.0f}s/step"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.0f}ms/step"
    return f"{seconds * 1e6:.0f}us/step"


class ProgbarLogger(Callback):
    """Keras's progress output: verbose=1 a bar redrawn in place, 2 one line per epoch."""

    def __init__(self, verbose: int = 1, stream=None):
        super().__init__()
        self.verbose = verbose
        self.stream = stream or sys.stdout
        self._width = 0

    def on_epoch_begin(self, epoch, logs=None):
        self._start = self._last = time.perf_counter()
        self._width = 0
        if self.verbose == 1 and self.params.get("epochs", 1) > 1:
            self.stream.write(f"Epoch {epoch + 1}/{self.params['epochs']}\n")

    def _line(self, step: int, logs: dict, final: bool) -> str:
        steps = self.params["steps"]
        elapsed = time.perf_counter() - self._start
        per = elapsed / max(step, 1)
        values = "".join(f" - {k}: {_format(v)}" for k, v in logs.items())
        if self.verbose == 2:
            return f"{steps}/{steps} - {elapsed:.0f}s - {_per_step(per)}{values}"
        done = int(20 * step / steps)
        eta = elapsed if final else per * (steps - step)
        counter = f"{step:>{len(str(steps))}}/{steps}"
        bar = f"\x1b[32m{'━' * done}\x1b[0m\x1b[37m{'━' * (20 - done)}\x1b[0m"
        return f"\x1b[1m{counter}\x1b[0m {bar} \x1b[1m{eta:.0f}s\x1b[0m {_per_step(per)}{values}"

    def on_train_batch_end(self, batch, logs=None):
        if self.verbose != 1 or batch + 1 == self.params["steps"]:
            return
        now = time.perf_counter()
        if now - self._last < 0.05:
            return
        self._last = now
        self._redraw(self._line(batch + 1, logs or {}, final=False))

    def _redraw(self, text: str) -> None:
        self.stream.write("\b" * self._width + "\r" + text)
        self._width = len(text)
        self.stream.flush()

    def on_epoch_end(self, epoch, logs=None):
        if self.verbose == 1:
            self._redraw(self._line(self.params["steps"], logs or {}, final=True) + "\n")
        elif self.verbose == 2:
            self.stream.write(self._line(self.params["steps"], logs or {}, final=True) + "\n")
        self.stream.flush()


class CallbackList:
    """User callbacks in order, then History, then the progress bar (as Keras orders them)."""

    def __init__(self, callbacks: list[Callback], model, verbose: int, epochs: int, steps: int,
                 chief: bool = True):  # fmt: skip
        # in data-parallel training only the chief process (rank 0) writes files and prints
        self.callbacks = [c for c in callbacks if chief or not c.writes_files]
        if verbose and chief:
            self.callbacks.append(ProgbarLogger(verbose))
        params = {"verbose": verbose, "epochs": epochs, "steps": steps}
        for c in self.callbacks:
            c.set_model(model)
            c.set_params(params)

    def _each(self, hook: str, *args) -> None:
        for c in self.callbacks:
            getattr(c, hook)(*args)

    def on_train_begin(self):
        self._each("on_train_begin", {})

    def on_train_end(self):
        self._each("on_train_end", {})

    def on_epoch_begin(self, epoch):
        self._each("on_epoch_begin", epoch, {})

    def on_epoch_end(self, epoch, logs):
        self._each("on_epoch_end", epoch, logs)

    def on_train_batch_begin(self, step):
        self._each("on_train_batch_begin", step, {})

    def on_train_batch_end(self, step, logs):
        self._each("on_train_batch_end", step, logs)


class _Monitor(Callback):
    """The 'auto' mode and improvement test the monitoring callbacks share."""

    def __init__(self, monitor: str, mode: str, min_delta: float):
        super().__init__()
        self.monitor, self.mode, self.min_delta = monitor, mode, abs(min_delta)

    def _better(self, current: float, best: float | None) -> bool:
        mode = self.mode
        if mode == "auto":
            name = self.monitor.removeprefix("val_")
            if name == "loss" or "error" in name or name in ("mae", "mse"):
                mode = "min"
            elif "acc" in name:
                mode = "max"
            else:
                raise ValueError(f"cannot tell whether {self.monitor!r} should go up or down: pass mode=")
        if best is None:
            return True
        return current - self.min_delta < best if mode == "min" else current + self.min_delta > best


class EarlyStopping(_Monitor):
    def __init__(
        self,
        monitor: str = "val_loss",
        min_delta: float = 0,
        patience: int = 0,
        verbose: int = 0,
        mode: str = "auto",
        baseline: float | None = None,
        restore_best_weights: bool = False,
        start_from_epoch: int = 0,
    ):
        super().__init__(monitor, mode, min_delta)
        self.patience, self.verbose, self.baseline = patience, verbose, baseline
        self.restore_best_weights, self.start_from_epoch = restore_best_weights, start_from_epoch

    def on_train_begin(self, logs=None):
        self.wait, self.best, self.best_weights, self.best_epoch, self.stopped_epoch = 0, None, None, 0, 0

    def on_epoch_end(self, epoch, logs=None):
        current = (logs or {}).get(self.monitor)
        if current is None or epoch < self.start_from_epoch:
            return
        self.wait += 1
        if self._better(current, self.best):
            self.best, self.best_epoch = current, epoch
            if self.restore_best_weights:
                self.best_weights = self.model.get_weights()
            if self.baseline is None or self._better(current, self.baseline):
                self.wait = 0
            return
        if self.wait >= self.patience and epoch > 0:
            self.stopped_epoch = epoch
            self.model.stop_training = True

    def on_train_end(self, logs=None):
        if self.stopped_epoch and self.verbose:
            print(f"Epoch {self.stopped_epoch + 1}: early stopping")
        if self.restore_best_weights and self.best_weights is not None:
            if self.verbose:
                print(f"Restoring model weights from the end of the best epoch: {self.best_epoch + 1}.")
            self.model.set_weights(self.best_weights)


class LearningRateScheduler(Callback):
    def __init__(self, schedule, verbose: int = 0):
        super().__init__()
        self.schedule, self.verbose = schedule, verbose

    def on_epoch_begin(self, epoch, logs=None):
        lr = self.model.optimizer.learning_rate
        try:
            new = self.schedule(epoch, lr)
        except TypeError:
            new = self.schedule(epoch)
        if not isinstance(new, (float, int, np.floating, np.integer)):
            raise ValueError(f'The output of the "schedule" function should be a float. Got: {new}')
        self.model.optimizer.learning_rate = float(np.float32(new))

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            logs["learning_rate"] = float(np.float32(self.model.optimizer.learning_rate))


class ReduceLROnPlateau(_Monitor):
    def __init__(
        self,
        monitor: str = "val_loss",
        factor: float = 0.1,
        patience: int = 10,
        verbose: int = 0,
        mode: str = "auto",
        min_delta: float = 1e-4,
        cooldown: int = 0,
        min_lr: float = 0.0,
    ):
        if factor >= 1.0:
            raise ValueError(f"ReduceLROnPlateau does not support a factor >= 1.0. Received factor={factor}")
        super().__init__(monitor, mode, min_delta)
        self.factor, self.patience, self.verbose = factor, patience, verbose
        self.cooldown, self.min_lr = cooldown, min_lr

    def on_train_begin(self, logs=None):
        self.wait, self.best, self.cooldown_counter = 0, None, 0

    def on_epoch_end(self, epoch, logs=None):
        logs = logs if logs is not None else {}
        optimizer = self.model.optimizer
        logs["learning_rate"] = float(np.float32(optimizer.learning_rate))
        current = logs.get(self.monitor)
        if current is None:
            return
        if self.cooldown_counter > 0:
            self.cooldown_counter -= 1
            self.wait = 0
        if self._better(current, self.best):
            self.best, self.wait = current, 0
        elif self.cooldown_counter <= 0:
            self.wait += 1
            if self.wait >= self.patience and optimizer.learning_rate > np.float32(self.min_lr):
                new = max(optimizer.learning_rate * self.factor, self.min_lr)
                optimizer.learning_rate = float(np.float32(new))
                if self.verbose:
                    print(f"\nEpoch {epoch + 1}: ReduceLROnPlateau reducing learning rate to {new}.")
                self.cooldown_counter, self.wait = self.cooldown, 0


class CSVLogger(Callback):
    writes_files = True

    def __init__(self, filename: str, separator: str = ",", append: bool = False):
        super().__init__()
        self.filename, self.separator, self.append = filename, separator, append

    def on_train_begin(self, logs=None):
        self._file = open(self.filename, "a" if self.append else "w", newline="")  # noqa: SIM115
        self._writer = None

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        if self._writer is None:
            self._writer = csv.DictWriter(self._file, ["epoch", *logs], delimiter=self.separator)
            if not self.append or self._file.tell() == 0:
                self._writer.writeheader()
        self._writer.writerow({"epoch": epoch, **logs})
        self._file.flush()

    def on_train_end(self, logs=None):
        self._file.close()


class ModelCheckpoint(_Monitor):
    """Save the model (or its weights) after each epoch, or only when `monitor` improves."""

    writes_files = True

    def __init__(
        self,
        filepath: str,
        monitor: str = "val_loss",
        verbose: int = 0,
        save_best_only: bool = False,
        save_weights_only: bool = False,
        mode: str = "auto",
        initial_value_threshold: float | None = None,
    ):
        super().__init__(monitor, mode, 0.0)
        suffix = ".weights.h5" if save_weights_only else ".keras"
        if not str(filepath).endswith(suffix):
            raise ValueError(f"The filepath provided must end in `{suffix}`. Received: filepath={filepath}")
        self.filepath, self.verbose = str(filepath), verbose
        self.save_best_only, self.save_weights_only = save_best_only, save_weights_only
        self.best = initial_value_threshold

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        path = self.filepath.format(epoch=epoch + 1, **logs)
        if self.save_best_only:
            current = logs.get(self.monitor)
            if current is None:
                return
            if not self._better(current, self.best):
                if self.verbose:
                    print(f"\nEpoch {epoch + 1}: {self.monitor} did not improve from {self.best:.5f}")
                return
            if self.verbose:
                before = "inf" if self.best is None else f"{self.best:.5f}"
                print(
                    f"\nEpoch {epoch + 1}: {self.monitor} improved from {before} to {current:.5f}, ", end=""
                )
                print(f"saving model to {path}")
            self.best = current
        if self.save_weights_only:
            self.model.save_weights(path)
        else:
            self.model.save(path)
