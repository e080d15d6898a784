"""Ending a long run early without losing finished work: a signal, or the same error on image after image.

Both stop the run between two images by raising `RunStopped` from a Lightning callback, after
the result writer has saved the finished image; Lightning then runs its teardown (the writer
merges every rank's records), and the tool prints the reason and exits with `exit_code`. A second
Ctrl-C raises it at once, wherever the run is: files are written atomically, so the images
finished before it stay saved.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any

import pytorch_lightning as pl

EXIT_SOME_FAILED = 1  # the run ended, but some images failed (listed in the failures file)
EXIT_USAGE = 2  # a user error: bad setting, path, input or missing weights
EXIT_INTERRUPTED = 130  # Ctrl-C (128 + SIGINT)
EXIT_TERMINATED = 143  # SIGTERM from a job scheduler or preemption (128 + SIGTERM)


class RunStopped(BaseException):
    """The run stopped early on purpose; finished images are saved and a rerun continues with the rest.

    A BaseException, as KeyboardInterrupt: a stop raised inside an image's segmentation (a second Ctrl-C) must not be
    caught as that image's failure by the handlers that let a run go on past a bad image.
    """

    def __init__(self, reason: str, exit_code: int) -> None:
        super().__init__(reason)
        self.exit_code = exit_code


class StopOnSignal(pl.Callback):
    """SIGTERM or a first Ctrl-C: finish the current image, save it, then stop. A second Ctrl-C stops at once, with
    the same exit status (130) and a line saying so (not Lightning's KeyboardInterrupt handling, which exits 1).

    Lightning already catches SIGTERM and notes it (`trainer.received_sigterm`); Ctrl-C is caught here while
    a predict or test loop runs. Place it after the result writer, so that the last image is saved first.
    """

    def __init__(self) -> None:
        self.interrupted = False
        self._previous: Callable[[int, FrameType | None], Any] | int | None = None  # what signal.signal returns

    def _on_sigint(self, signum: int, frame: Any) -> None:
        if self.interrupted:
            raise RunStopped("stopped at once (Ctrl-C twice)", EXIT_INTERRUPTED)
        self.interrupted = True
        print("\ninterrupting after the current image (Ctrl-C again to stop at once)", flush=True)

    def _start(self) -> None:
        self.interrupted = False
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._on_sigint)

    def _restore(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None

    def _check(self, trainer: pl.Trainer) -> None:
        if trainer.received_sigterm:
            raise RunStopped("terminated (SIGTERM)", EXIT_TERMINATED)
        if self.interrupted:
            raise RunStopped("interrupted (Ctrl-C)", EXIT_INTERRUPTED)

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start()

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start()

    def on_predict_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        self._check(trainer)

    def on_test_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        self._check(trainer)

    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._restore()

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._restore()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._restore()


class RepeatedFailures:
    """Counts images in a row that failed with the same error; `record` raises RunStopped at `limit` (0 = never).

    A bad image fails with its own message (its file name, its size); the same message again and again
    means a broken setup, which every further image would only repeat.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._last: tuple[str, str] | None = None
        self._count = 0

    def record(self, error: tuple[str, str] | None) -> None:
        """One image's (error type, message), or None when it succeeded."""
        self._count = self._count + 1 if error is not None and error == self._last else int(error is not None)
        self._last = error
        if self.limit and self._count >= self.limit and error is not None:  # (a count of errors)
            kind, message = error
            raise RunStopped(
                f"stopped: {self._count} images in a row failed with the same error ({kind}: {message}). "
                "That is a broken setup rather than bad images: fix it, then rerun the same command",
                EXIT_SOME_FAILED,
            )
