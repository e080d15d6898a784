"""Approximate modes judged against the exact path on a labelled split (``emerdiff-benchmark --approximations``).

A mode is ``exact`` or approximations joined by ``+`` (`parse_mode`): ``latent`` (difference in latent space, no
decodes), ``one_step`` (the modulated step's x0 estimate), ``steps<N>`` (N denoising steps after t_m),
``decode<R>`` (variants decoded at shorter side R), ``sigma<S>`` (Gaussian sigma S px). Every mode segments every
image of the split in one process, alternately, on one set of SD parts; per mode: FLOPs per image (cost model),
UNet calls and VAE decodes counted at run time, wall time, label agreement with the exact path (share of pixels)
and mIoU / Boundary IoU under the per-image Hungarian protocol. Results: docs/benchmarks.md.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .config import ConfigError, EvalConfig, SegmentorConfig
from .data import DatasetMetadata
from .evaluation.boundary import SegmentationWithBoundary
from .evaluation.scoring import miou_convention, per_image_class_map
from .profiling import StageProfiler, image_cost, profiled, total
from .segmentor import EmerDiff, modulated_masks

EXACT = "exact"
BILINEAR = "bilinear"  # the k-means masks upsampled bilinearly: the exact run's baseline, steps 1-5 only
BASELINE_STAGES = ("encode", "features", "kmeans")
# token pattern -> the segmentor settings it stands for
TOKENS: tuple[tuple[str, Callable[[re.Match], dict[str, Any]]], ...] = (
    (r"latent", lambda m: {"difference_space": "latent"}),
    (r"one_step", lambda m: {"one_step_estimate": True}),
    (r"steps(\d+)", lambda m: {"denoise_steps": int(m.group(1))}),
    (r"decode(\d+)", lambda m: {"decode_resolution": int(m.group(1))}),
    (r"sigma(\d+(?:\.\d+)?)", lambda m: {"gaussian_sigma": float(m.group(1))}),
)
AGREEMENT_FLOOR = 0.95  # the preset's bounds: share of pixels labelled as on the exact path
BOUNDARY_LOSS = 1.0  # at most this many points of Boundary IoU lost


def parse_mode(name: str) -> dict[str, Any]:
    """The segmentor settings of mode `name` (``exact``, or tokens joined by ``+``); a bad token is a ConfigError."""
    if name == EXACT:
        return {}
    settings: dict[str, Any] = {}
    for token in name.split("+"):
        found = [(match, build) for pattern, build in TOKENS if (match := re.fullmatch(pattern, token))]
        if not found:
            raise ConfigError(
                f"--approximations: unknown mode part {token!r} in {name!r}; use exact or parts joined "
                "by '+': latent, one_step, steps<N>, decode<R>, sigma<S> (e.g. one_step+latent)"
            )
        settings.update(found[0][1](found[0][0]))
    return settings


def default_modes(resolution: int) -> list[str]:
    """Every approximation alone and the combinations worth measuring, for a working `resolution`."""
    half = f"decode{resolution // 2}"
    return [
        EXACT,
        "latent",
        "one_step",
        "steps7",
        "steps5",
        "steps3",
        half,
        f"steps7+{half}",
        f"steps5+{half}",
        f"one_step+{half}",
        "one_step+latent",
    ]


@dataclass
class ModeResult:
    """One mode's figures over the split (per-image means; agreement pooled over every pixel)."""

    name: str
    settings: dict[str, Any]
    flops: float = 0.0  # cost model at the configured K, per image
    unet_calls: float = 0.0  # counted at run time, per image
    unet_samples: float = 0.0
    decodes: float = 0.0  # VAE decodes of variants (samples), per image
    cost_model_agrees: bool = True  # the counted calls and decodes equal the cost model's (images at its K)
    checked: int = 0  # images compared with the cost model
    seconds: float = 0.0  # wall time over the split
    agreement: float = float("nan")
    miou: float = float("nan")
    boundary_miou: float = float("nan")


@dataclass
class Tally:
    """What one mode adds up image by image."""

    metric: SegmentationWithBoundary
    flops: float = 0.0
    unet_calls: int = 0
    unet_samples: int = 0
    decodes: int = 0
    cost_model_agrees: bool = True
    checked: int = 0  # images at the cost model's K whose calls were compared with it
    seconds: float = 0.0
    same: int = 0
    pixels: int = 0
    images: int = 0


@dataclass
class Sweep:
    """Every mode's result, the exact path's first, and where and how they were measured."""

    results: list[ModeResult]
    num_images: int
    dataset: str
    threads: int
    preset: str | None = None  # the cheapest mode within the bounds
    notes: list[str] = field(default_factory=list)

    def result(self, name: str) -> ModeResult:
        return next(r for r in self.results if r.name == name)


def mode_models(base: EmerDiff, modes: Sequence[str]) -> dict[str, EmerDiff]:
    """One segmentor per mode on `base`'s SD parts (the settings checked as any config's)."""
    params: SegmentorConfig = base.params
    return {name: EmerDiff(base.components, replace(params, **parse_mode(name))) for name in modes}


def run_sweep(
    models: Mapping[str, EmerDiff],
    images: Iterable[Mapping[str, Any]],
    metadata: DatasetMetadata,
    settings: EvalConfig,
    dataset: str,
    log: Callable[[str], None] = lambda message: None,
    each_image: Callable[[Sweep], None] = lambda sweep: None,
) -> Sweep:
    """Segment every image with every mode (the exact path first), alternately, and score them side by side;
    `each_image` sees the results so far after every image (a long run can be stopped with its table written)."""
    if EXACT not in models:
        raise ConfigError("--approximations needs the exact mode to compare with: add 'exact'")
    order = [EXACT] + [name for name in models if name != EXACT]
    convention = miou_convention("hungarian", settings)
    tallies = {
        name: Tally(SegmentationWithBoundary(metadata.num_classes, metadata.ignore_index, convention))
        for name in [*order, BILINEAR]
    }
    # the cost model of each mode at the configured K (it takes a while on the CPU): FLOPs per image at that K
    stages = {name: image_cost(models[name], models[name].params.num_masks) for name in order}
    costs = {name: total(stages[name]) for name in order}
    baseline = sum(stages[EXACT][s].flops for s in BASELINE_STAGES)
    for index, item in enumerate(images):
        gt = np.asarray(item["label"])
        exact_labels = None
        for name in order:
            model = models[name]
            profiler = StageProfiler(model.device)
            start = time.perf_counter()
            with profiled(model, profiler):
                out = model.segment(item["image"])
            seconds = time.perf_counter() - start
            masks = len(modulated_masks(out.lowres_masks, model.params.min_mask_fraction))
            counted, modelled = total(profiler.stages), costs[name]
            tally = tallies[name]
            tally.seconds += seconds
            tally.flops += modelled.flops
            tally.unet_calls += counted.unet_calls
            tally.unet_samples += counted.unet_samples
            tally.decodes += profiler.stages["decode"].vae_samples if "decode" in profiler.stages else 0
            if masks == model.params.num_masks:  # the cost model's K: its calls and decodes must be these
                tally.checked += 1
                tally.cost_model_agrees &= (counted.unet_calls, counted.unet_samples, counted.vae_samples) == (
                    modelled.unet_calls,
                    modelled.unet_samples,
                    modelled.vae_samples,
                )
            if exact_labels is None:
                exact_labels = out.labels
                _score(tallies[BILINEAR], out.labels_bilinear, out, gt, metadata, settings, convention)
                tallies[BILINEAR].flops += baseline
                tallies[BILINEAR].same += int((out.labels_bilinear == exact_labels).sum())
                tallies[BILINEAR].pixels += exact_labels.numel()
            tally.same += int((out.labels == exact_labels).sum())
            tally.pixels += exact_labels.numel()
            _score(tally, out.labels, out, gt, metadata, settings, convention)
        log(f"image {index + 1}: " + ", ".join(f"{n} {tallies[n].same / tallies[n].pixels:.3f}" for n in order[1:]))
        each_image(_sweep(tallies, order, models, dataset))
    return _sweep(tallies, order, models, dataset)


def _sweep(tallies: Mapping[str, Tally], order: Sequence[str], models: Mapping[str, EmerDiff], dataset: str) -> Sweep:
    """The results of the images tallied so far."""
    results = [_result(name, tallies[name], models) for name in [*order, BILINEAR]]
    sweep = Sweep(results, tallies[EXACT].images, dataset, torch.get_num_threads())
    sweep.preset = cheapest_within_bounds(sweep.results)
    return sweep


def _score(
    tally: Tally,
    labels: torch.Tensor,
    out: Any,
    gt: np.ndarray,
    metadata: DatasetMetadata,
    settings: EvalConfig,
    convention: str,
) -> None:
    """Add one image's per-image Hungarian class map to the mode's metric."""
    segments = labels.numpy()
    classes = per_image_class_map(
        "hungarian",
        segments,
        gt,
        out.mask_embeddings.numpy(),
        np.zeros(0),
        metadata.num_classes,
        metadata.ignore_index,
        settings.match_criterion,
        convention,
    )
    tally.metric.update(torch.from_numpy(classes), torch.from_numpy(gt.astype(np.int64)))
    tally.images += 1


def _result(name: str, tally: Tally, models: Mapping[str, EmerDiff]) -> ModeResult:
    n = max(tally.images, 1)
    scores = tally.metric.compute()
    settings = parse_mode(name) if name in models else {"(k-means masks upsampled bilinearly)": True}
    return ModeResult(
        name,
        settings,
        tally.flops / n,
        tally.unet_calls / n,
        tally.unet_samples / n,
        tally.decodes / n,
        tally.cost_model_agrees,
        tally.checked,
        tally.seconds,
        tally.same / max(tally.pixels, 1),
        100.0 * scores.miou,
        100.0 * scores.boundary_miou,
    )


def within_bounds(result: ModeResult, exact: ModeResult) -> bool:
    """At least `AGREEMENT_FLOOR` agreement and at most `BOUNDARY_LOSS` points of Boundary IoU lost."""
    return result.agreement >= AGREEMENT_FLOOR and result.boundary_miou >= exact.boundary_miou - BOUNDARY_LOSS


def cheapest_within_bounds(results: Sequence[ModeResult]) -> str | None:
    """The approximate mode with the fewest FLOPs that stays within the bounds (None if none does)."""
    exact = next(r for r in results if r.name == EXACT)
    kept = [r for r in results if r.name not in (EXACT, BILINEAR) and within_bounds(r, exact)]
    return min(kept, key=lambda r: r.flops).name if kept else None


def markdown(sweep: Sweep, command: str) -> str:
    """The side-by-side table with its caption: FLOPs, calls, time, agreement and quality per mode."""
    exact = sweep.result(EXACT)
    head = (
        "| mode | FLOPs / image (G) | exact / mode FLOPs | UNet calls (samples) / image | VAE decodes / image | "
        "CPU speed-up | label agreement | mIoU | Boundary IoU | within bounds |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in sweep.results:
        timed = r.name != BILINEAR
        bounds = (
            "exact path"
            if r.name == EXACT
            else ("-" if r.name == BILINEAR else ("yes" if within_bounds(r, exact) else "no"))
        )
        mark = " (cost model differs!)" if not r.cost_model_agrees else ""
        name = f"**{r.name}**" if r.name in (EXACT, sweep.preset) else r.name
        lines.append(
            f"| {name} | {r.flops / 1e9:.2f} | {exact.flops / r.flops:.2f}x | "
            f"{_per_image(r.unet_calls)} ({_per_image(r.unet_samples)}){mark} | {_per_image(r.decodes)} | "
            f"{(f'{exact.seconds / r.seconds:.2f}x' if timed else '-')} | {100 * r.agreement:.1f} % | "
            f"{r.miou:.1f} | {r.boundary_miou:.1f} | {bounds} |"
        )
    preset = (
        f"Cheapest mode within the bounds (>= {100 * AGREEMENT_FLOOR:.0f} % agreement, <= {BOUNDARY_LOSS:g} "
        f"point of Boundary IoU lost): **{sweep.preset}**, {exact.flops / sweep.result(sweep.preset).flops:.2f}x "
        "fewer FLOPs than the exact path."
        if sweep.preset
        else "No approximate mode stays within the bounds."
    )
    return "\n".join(
        [
            f"`{command}`",
            "",
            f"{sweep.num_images} images of {sweep.dataset}, {sweep.threads} CPU thread(s). FLOPs per image from the "
            "cost model at the configured K; UNet calls and VAE decodes per image counted at run time (on the images "
            "where k-means kept K masks, equal to the cost model's unless marked); speed-up = "
            "exact-path wall time / mode wall time in this run; agreement = share of pixels labelled as on the exact "
            "path; mIoU and Boundary IoU under the per-image Hungarian protocol; bilinear = the exact run's k-means "
            "masks upsampled bilinearly (cost of steps 1-5).",
            "",
            *lines,
            "",
            preset,
            "",
        ]
    )


def _per_image(value: float) -> str:
    return f"{value:g}" if float(value).is_integer() else f"{value:.1f}"


LABEL_OFFSETS = ((4, 4), (4, -11), (-4, 4), (-4, -11), (4, 14), (4, -21))  # points from the marker, tried in order


def place_labels(ax: Any, points: Sequence[tuple[str, float, float]]) -> None:
    """Name each point beside it at the first offset whose text overlaps no label placed before (dense clusters
    of modes stay readable); the last offset when none is free."""
    renderer = ax.figure.canvas.get_renderer()
    placed: list[Any] = []
    for name, x, y in sorted(points, key=lambda p: -p[2]):
        for dx, dy in LABEL_OFFSETS:
            text = ax.annotate(
                name, (x, y), textcoords="offset points", xytext=(dx, dy), fontsize=7, ha="left" if dx > 0 else "right"
            )
            box = text.get_window_extent(renderer)
            if not any(box.overlaps(other) for other in placed) or (dx, dy) == LABEL_OFFSETS[-1]:
                placed.append(box)
                break
            text.remove()


def figure(sweep: Sweep, path: Path, title: str) -> None:
    """Quality against cost, one point per mode, the exact path marked: agreement and Boundary IoU vs FLOPs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    exact = sweep.result(EXACT)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    panels = (
        (axes[0], lambda r: 100 * r.agreement, "label agreement with the exact path (%)", 100 * AGREEMENT_FLOOR),
        (axes[1], lambda r: r.boundary_miou, "Boundary IoU (%)", exact.boundary_miou - BOUNDARY_LOSS),
    )
    for ax, value, label, bound in panels:
        for r in sweep.results:
            marker, colour = (
                ("*", "crimson") if r.name == EXACT else (("s", "grey") if r.name == BILINEAR else ("o", "tab:blue"))
            )
            if r.name == sweep.preset:
                colour = "tab:green"
            ax.scatter(r.flops / 1e9, value(r), marker=marker, s=160 if r.name == EXACT else 40, color=colour, zorder=3)
        ax.axhline(bound, color="grey", linestyle="--", linewidth=0.8)
        ax.set_xscale("log")
        ax.set_xlabel("GFLOP per image (cost model, log scale)")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    for ax, value, _, _ in panels:
        place_labels(ax, [(r.name, r.flops / 1e9, value(r)) for r in sweep.results])
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def record(sweep: Sweep, command: str) -> dict[str, Any]:
    """The JSON record of the sweep."""
    return {
        "command": command,
        "dataset": sweep.dataset,
        "num_images": sweep.num_images,
        "threads": sweep.threads,
        "preset": sweep.preset,
        "results": [
            {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in asdict(r).items()}
            for r in sweep.results
        ],
    }
