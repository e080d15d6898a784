"""What the commands tell the user: counts in words, the random-weights and toy-model notices, one `error:` line per
mistake, and the library's warnings on lines of their own while a progress bar is on screen."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager

from omegaconf import DictConfig

from emerdiff.config import UserError, is_random_model
from emerdiff.toy import shipped_pipeline

TOY_MODEL_NOTICE = (
    "note: model.pretrained=toy is the toy world's miniature model, trained on a CPU on synthetic "
    "128 px scenes (docs/toyworld.md). It is not Stable Diffusion: it knows only the toy world, and "
    "on photos its masks mean little."
)
RANDOM_MODEL_NOTICE = (
    "note: model.pretrained={name} is a miniature model with random weights: it runs offline, "
    "but its masks carry no meaning. Use e.g. --cfg emerdiff_sd15 for real results."
)


LIBRARY_LOGGERS = ("emerdiff", "ovseg")  # the warnings a run shows as it goes (e.g. an image skipped or squeezed)


class BesideProgressBars(logging.Handler):
    """Writes each record on a line of its own on stderr: tqdm clears the progress bars on screen, writes, and
    draws them again, so a message is never glued to a bar's line."""

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm import tqdm

        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # logging's convention: a handler never raises
            self.handleError(record)


def show_library_warnings() -> None:
    """Warnings of emerdiff and ovseg go to stderr through `BesideProgressBars` (once, however often called)."""
    for name in LIBRARY_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(handler, BesideProgressBars) for handler in logger.handlers):
            logger.addHandler(BesideProgressBars(logging.WARNING))


def plural(count: int, noun: str) -> str:
    """'1 image', '3 images'."""
    return f"{count} {noun}{'' if count == 1 else 's'}"


def random_model_notice(cfg: DictConfig) -> str | None:
    """The warning for the tiny / random-weight models, or None for real weights."""
    if not is_random_model(cfg.model):
        return None
    name = "tiny" if cfg.model.pretrained == "tiny" else f"{cfg.model.pretrained} (model.random_init=true)"
    return RANDOM_MODEL_NOTICE.format(name=name)


def toy_model_notice(cfg: DictConfig) -> str | None:
    """The note for the toy world's trained miniature model (``model.pretrained=toy``), or None for any other."""
    if is_random_model(cfg.model) or shipped_pipeline(cfg.model.pretrained) is None:
        return None
    return TOY_MODEL_NOTICE


@contextmanager
def reported_errors() -> Iterator[None]:
    """Turn a user's mistake (config, input, weights) into `error: ...` on stderr and exit status 2."""
    try:
        yield
    except (UserError, FileNotFoundError) as exc:
        print(f"error: {user_message(exc)}", file=sys.stderr)
        raise SystemExit(2) from None


def user_message(exc: BaseException) -> str:
    """The exception's message; for one re-raised from a DataLoader worker, the original message alone.

    PyTorch re-raises a worker's exception with "Caught X in DataLoader worker process N" and the worker's
    traceback as its text; the last line of that is "module.X: message".
    """
    text = str(exc)
    if text.startswith("Caught ") and "Original Traceback" in text:
        return text.rstrip().splitlines()[-1].split(": ", 1)[-1]
    return text
