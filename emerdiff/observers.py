"""Stage observers: whatever watches the segmentor's stages (a profiler, a progress bar), several at once.

`EmerDiff` runs each stage of its recipe inside ``self.stage(name)``, which enters the stage of every
observer in its `observers` list, in the order they were added. `observing` adds one for a block:

>>> with observing(model, StageProfiler(device)) as profiler, observing(model, progress):
...     model.segment(photo)  # both see every stage
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, ExitStack, contextmanager
from typing import Protocol, TypeVar


class StageObserver(Protocol):
    """Sees the segmentor's stages: each is a block entered when the stage starts and left when it ends."""

    def stage(self, name: str) -> AbstractContextManager[object]:
        """The block around stage `name` (e.g. "encode", "kmeans"; see `emerdiff.profiling.STAGES`)."""


class Observed(Protocol):
    """What observers are added to: an object with a list of them (`EmerDiff`)."""

    observers: list[StageObserver]


ObserverT = TypeVar("ObserverT", bound=StageObserver)


@contextmanager
def observed_stage(observers: Sequence[StageObserver], name: str) -> Iterator[None]:
    """Stage `name` entered in every observer (the first added is the outermost)."""
    with ExitStack() as stack:
        for observer in list(observers):
            stack.enter_context(observer.stage(name))
        yield


@contextmanager
def observing(model: Observed, observer: ObserverT) -> Iterator[ObserverT]:
    """`observer` sees `model`'s stages inside the block, beside the observers it already has; removed on exit."""
    model.observers.append(observer)
    try:
        yield observer
    finally:
        model.observers.remove(observer)
