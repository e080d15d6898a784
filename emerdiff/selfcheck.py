"""Self-check of a first real run: invariants that hold for any weights, checked on the user's model, device and dtype.

``python tools/selfcheck.py --cfg configs/emerdiff_sd15.yaml [--image PHOTO] --output DIR`` runs
`run_selfcheck` and writes DIR/selfcheck.json and DIR/selfcheck.md (`emerdiff.selfcheck_report`). Every check
has a figure, a threshold and a status (pass / fail / skipped with the reason):

- ``replay``: the unmodulated replay of the inversion (a zero offset through the modulated-denoising
  path, with injection) reproduces z0; relative error within what the dtype allows;
- ``lambda_zero``: with lambda = 0 the +/- variants are the same, so the difference maps are zero;
- ``injection``: the recorded Q/K are used in every attention layer at every step (counted through the
  observer of `modulation.denoise_variants`), and injection changes the modulated result;
- ``fast_vs_reference``: the fast path equals the reference path on one image at a small K (difference
  maps and labels);
- ``faiss_gpu``: faiss k-means on the GPU reaches the CPU's objective (needs a GPU and faiss-gpu);
- ``memory``: the measured CUDA peak of one image stays within the planner's estimate (CUDA only);
- timings: seconds per stage of one image and images/s, extrapolated to the configured K;
- the approximate preset (``--cfg fast`` unless ``--preset``): the share of the image's pixels it labels as
  the exact path does (it holds at >= 95 %), and its speed-up, on the user's weights, image and device. It is
  a measurement, not a check: an approximation that does not hold is no bug, only a reason to stay exact.

Thresholds follow docs/benchmarks.md ("Half precision"): float32 replays reproduce z0 to ~1e-5,
float16 within 2 %, bfloat16 within 10 %.
"""

from __future__ import annotations

import platform
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from .clustering import Clusters, kmeans
from .image import ImageInput, image_seed, load_image
from .memory import GIB
from .modulation import variant_offsets
from .processors import layer_names
from .profiling import StageProfiler, profiled
from .segmentor import EmerDiff, modulated_masks
from .selfcheck_report import FAIL, Check, SelfCheckReport

SMALL_K = 3  # masks of the fast-vs-reference, lambda = 0 and injection checks
MEMORY = "measured CUDA peak of one image (GiB) within the planner's estimate"
SCALED_STAGES = ("modulated", "decode", "assignment")  # stages whose cost grows with the number of masks
PRESET_AGREEMENT = 0.95  # the approximate preset holds on these weights at this share of exact-path labels


@dataclass(frozen=True)
class Tolerance:
    """What a dtype allows (docs/benchmarks.md, "Half precision")."""

    replay: float  # relative error of the unmodulated replay vs z0
    maps: float  # fast vs reference difference maps, max abs difference / max value
    labels: float  # fast vs reference, share of equal labels at the working resolution
    lambda_zero: float  # lambda = 0 difference maps, max value / max value at lambda
    objective: float = 1e-3  # faiss GPU vs CPU k-means objective, relative


TOLERANCES = {
    torch.float32: Tolerance(replay=1e-4, maps=1e-4, labels=0.99, lambda_zero=1e-5),
    torch.float16: Tolerance(replay=0.02, maps=0.05, labels=0.95, lambda_zero=1e-2),
    torch.bfloat16: Tolerance(replay=0.10, maps=0.30, labels=0.75, lambda_zero=5e-2),
}
# PyTorch runs float32 convolutions in TF32 on CUDA by default (torch.backends.cudnn.allow_tf32): ~10 bits of mantissa.
CUDA_FLOAT32 = Tolerance(replay=1e-3, maps=1e-3, labels=0.99, lambda_zero=1e-5)


def tolerance(dtype: torch.dtype, device: torch.device) -> Tolerance:
    if dtype == torch.float32 and device.type == "cuda" and torch.backends.cudnn.allow_tf32:
        return CUDA_FLOAT32
    return TOLERANCES[dtype]


def environment(model: EmerDiff) -> dict[str, Any]:
    """Versions and hardware a bug report needs."""
    import diffusers
    import faiss

    cuda = torch.cuda.is_available()
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "cuda (torch build)": torch.version.cuda,
        "cuda available": cuda,
        "gpu": torch.cuda.get_device_name(model.device)
        if model.device.type == "cuda"
        else (torch.cuda.get_device_name(0) if cuda else None),
        "diffusers": diffusers.__version__,
        "faiss": getattr(faiss, "__version__", "unknown"),
        "faiss gpus": faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0,
        "model": model.components.name,
        "device": str(model.device),
        "dtype": str(model.unet.dtype).removeprefix("torch."),
        "prediction type": model.grid.prediction_type,
    }


def default_image() -> np.ndarray:
    """scikit-image's astronaut when installed, else a synthetic picture (a few shapes on a gradient)."""
    try:
        from skimage import data

        return data.astronaut()
    except ImportError:
        y, x = np.mgrid[0:512, 0:512] / 512.0
        rgb = np.stack([x, y, 1 - x], -1) * 0.6
        rgb[(x - 0.3) ** 2 + (y - 0.4) ** 2 < 0.04] = (0.9, 0.2, 0.1)
        rgb[(x > 0.55) & (x < 0.9) & (y > 0.5) & (y < 0.85)] = (0.1, 0.7, 0.2)
        return (rgb * 255).astype(np.uint8)


def _variant(model: EmerDiff, **changes: Any) -> EmerDiff:
    """The same SD parts under other segmentor settings (never compiled twice), with the same chunk plan."""
    other = EmerDiff(model.components, replace(model.params, compile=False, **changes))
    other.chunks = model.chunk_plan()
    return other


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


def _maps(model: EmerDiff, inversion, record, clusters: Clusters, lam: float, chunk: int, size) -> torch.Tensor:
    """The smoothed difference maps of every mask of `clusters` at the working size."""
    count = len(clusters.centroids)
    latents = model.denoise(inversion, record, variant_offsets(clusters.masks, lam), chunk)
    return model.decoded_maps(latents, torch.arange(count), count, size).float()


def kmeans_objective(points: torch.Tensor, assignment: torch.Tensor, centroids: torch.Tensor) -> float:
    """Sum of squared distances of the points to their assigned centroids."""
    x = points.float().cpu()
    return ((x - centroids.float()[assignment]) ** 2).sum().item()


def check_faiss_gpu(features: torch.Tensor, k: int, seed: int, restarts: int, iters: int, tol: float = 1e-3) -> Check:
    import faiss

    what = "faiss GPU k-means objective == CPU (relative difference)"
    gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    if not torch.cuda.is_available():
        return Check.skipped("faiss_gpu", what, "no GPU")
    if gpus == 0:
        return Check.skipped(
            "faiss_gpu",
            what,
            "the installed faiss has no GPU support (faiss-cpu); pip install -e '.[gpu]' installs faiss-gpu-cu12",
        )
    cpu = kmeans_objective(features, *kmeans(features, k, seed, restarts, iters, gpu=False))
    gpu = kmeans_objective(features, *kmeans(features, k, seed, restarts, iters, gpu=True))
    return Check.measured(
        "faiss_gpu",
        what,
        abs(gpu - cpu) / max(cpu, 1e-12),
        tol,
        detail=f"objective CPU {cpu:.6g}, GPU {gpu:.6g}, K = {k}",
    )


def weight_bytes(model: EmerDiff) -> int:
    return sum(t.numel() * t.element_size() for m in model.components.modules for t in [*m.parameters(), *m.buffers()])


def memory_estimate(model: EmerDiff, variants: int) -> int | None:
    """The planner's bound for one image: weights + injection record + the largest batched stage at its planned size."""
    plan = model.chunk_plan()
    profile = plan.profile
    if profile is None:
        return None
    steps = len(model.grid.tail(model.params.t_modulate))

    def at(line, size: int, count: int) -> int:
        n = count if size <= 0 else min(size, count)
        return line.fixed + line.per_item * n

    stages = (
        at(profile.inversion, plan.inversion, steps),
        at(profile.variants, plan.variants, variants),
        at(profile.decode, plan.decode, variants),
    )
    return weight_bytes(model) + profile.record + max(stages)


def run_selfcheck(
    model: EmerDiff,
    image: ImageInput | None = None,
    small_k: int | None = None,
    log: Callable[[str], None] = lambda message: None,
    timed: bool = True,
    preset: Mapping[str, Any] | None = None,
    preset_name: str = "fast",
) -> SelfCheckReport:
    """Run every check on `model` (its device, dtype and settings) with one image; see the module docstring.

    ``small_k`` is the K of the fast-vs-reference, lambda = 0 and injection checks (None: SMALL_K).
    ``timed=False`` leaves out the timed whole-image run (and so the memory check, which measures it).
    ``preset`` (segmentor settings, e.g. configs/fast.yaml's) is compared with the exact path on the image.
    """
    small_k = small_k or SMALL_K
    p = model.params
    device, dtype = model.device, model.unet.dtype
    tol = tolerance(dtype, device)
    rgb = load_image(default_image() if image is None else image)
    seed = image_seed(rgb, p.seed)
    checks: list[Check] = []
    with torch.no_grad():
        log("encoding, features, k-means, inversion")
        start = _variant(model, num_masks=small_k).inverted(rgb, seed)  # the recipe's steps 1-7 at the small K
        features, clusters, size = start.features, start.clusters, start.size
        inversion, record = start.inversion, start.record
        del start  # so that `del inversion, record` below frees them
        variants_chunk = model.chunk_plan().variants

        log("replay")
        zero = torch.zeros(1, 1, features.height, features.width)
        replay = model.denoise(inversion, record, zero, variants_chunk)[0]
        error = _relative(replay, inversion.clean[0])
        checks.append(
            Check.measured(
                "replay",
                "unmodulated replay reproduces z0 (relative error)",
                error,
                tol.replay,
                detail=f"{len(inversion.timesteps)} steps from t_m = {p.t_modulate}, "
                f"{str(dtype).removeprefix('torch.')}",
            )
        )

        log("injection")
        checks.append(_check_injection(model, inversion, record, clusters, variants_chunk))

        log(f"fast vs reference at K = {len(clusters.centroids)}")
        fast = _variant(model, impl="fast")
        reference = _variant(model, impl="reference")
        fast_maps = _maps(fast, inversion, record, clusters, p.lam, variants_chunk, size)
        reference_maps = _maps(reference, inversion, record, clusters, p.lam, variants_chunk, size)
        scale = reference_maps.abs().max().clamp_min(1e-12)
        map_error = ((fast_maps - reference_maps).abs().max() / scale).item()
        agreement = (fast_maps.argmax(0) == reference_maps.argmax(0)).float().mean().item()
        k_small = len(clusters.centroids)
        checks.append(
            Check.measured(
                "fast_vs_reference",
                "fast == reference: difference maps (max error / max)",
                map_error,
                tol.maps,
                detail=f"K = {k_small}",
            )
        )
        checks.append(
            Check.measured(
                "fast_vs_reference_labels",
                "fast == reference: share of equal labels",
                agreement,
                tol.labels,
                ">=",
                detail=f"K = {k_small}, {size[0]} x {size[1]} px",
            )
        )

        log("lambda = 0")
        lambda_zero = _maps(fast, inversion, record, clusters, 0.0, variants_chunk, size)
        checks.append(
            Check.measured(
                "lambda_zero",
                "lambda = 0 gives zero difference maps (max / max at lambda)",
                (lambda_zero.abs().max() / scale).item(),
                tol.lambda_zero,
                detail=f"lambda = {p.lam} scale {scale.item():.4g}",
            )
        )
        del inversion, record

    log("faiss k-means, GPU vs CPU")
    checks.append(
        check_faiss_gpu(features.queries, p.num_masks, seed, p.kmeans_restarts, p.kmeans_iters, tol.objective)
    )

    timing: dict[str, Any] = {}
    exact: TimedRun | None = None
    if timed:
        log(f"timing one image at K = {p.num_masks}")
        exact = _time_one_image(model, rgb)
        timing = exact.timing
        checks.append(_check_memory(model, exact.peak, timing["measured_masks"]))
    else:
        checks.append(Check.skipped("memory", MEMORY, "no timed run (timed=False)"))
    approximate: dict[str, Any] = {}
    if preset:
        log(f"approximate preset {preset_name} vs the exact path at K = {p.num_masks}")
        approximate = compare_preset(model, rgb, dict(preset), preset_name, exact)
    return SelfCheckReport(environment(model), _settings(model, small_k), checks, timing, approximate)


def compare_preset(
    model: EmerDiff, rgb: torch.Tensor, preset: dict[str, Any], name: str, exact: TimedRun | None = None
) -> dict[str, Any]:
    """The preset's share of pixels labelled as on the exact path and its speed-up, on this image and device."""
    exact = exact or _time_one_image(model, rgb)
    approximate = _time_one_image(_variant(model, **preset), rgb)
    agreement = (approximate.labels == exact.labels).float().mean().item()
    speedup = exact.timing["total_seconds"] / max(approximate.timing["total_seconds"], 1e-12)
    return {
        "name": name,
        "settings": preset,
        "agreement": agreement,
        "agreement_floor": PRESET_AGREEMENT,
        "holds": agreement >= PRESET_AGREEMENT,
        "speedup": speedup,
        "exact_seconds": exact.timing["total_seconds"],
        "preset_seconds": approximate.timing["total_seconds"],
    }


def _check_injection(model: EmerDiff, inversion, record, clusters: Clusters, chunk: int) -> Check:
    what = (
        "recorded Q/K used in every attention layer and step (share of layer x step), and injection changes the result"
    )
    if not model.params.attention_injection:
        return Check.skipped("injection", what, "segmentor.attention_injection=false")
    used: set[tuple[str, int]] = set()  # (layer, step) where an attention call used the recorded Q/K
    foreign: set[tuple[str, int]] = set()  # (layer, step) where it used other Q/K

    def observe(layer: str, t: int, query: torch.Tensor, key: torch.Tensor) -> None:
        recorded = record.query.get((layer, t)), record.key.get((layer, t))
        same = (
            recorded[0] is not None
            and query.shape == recorded[0].shape
            and torch.equal(query, recorded[0])
            and torch.equal(key, recorded[1])
        )
        (used if same else foreign).add((layer, t))

    offsets = variant_offsets(clusters.masks, model.params.lam)
    injected = model.denoise(inversion, record, offsets, chunk, observer=observe)
    expected = {(layer, t) for layer in layer_names(model.unet) for t in inversion.timesteps}
    share = len(used & expected) / len(expected)
    without = _variant(model, attention_injection=False).denoise(inversion, None, offsets, chunk)
    change = _relative(injected, without)
    check = Check.measured(
        "injection",
        what,
        share,
        1.0,
        ">=",
        detail=f"{len(used & expected)} of {len(expected)} (layer, step) pairs "
        f"({len(layer_names(model.unet))} layers x {len(inversion.timesteps)} steps); "
        f"result changed by {change:.3g} (relative) vs no injection",
    )
    if foreign - used:
        check.detail += f"; {len(foreign - used)} pairs used their own Q/K"
    if change <= 0:
        check.status = FAIL
        check.detail += ": injection does not change the result"
    return check


@dataclass
class TimedRun:
    """One timed whole-image run: its stage timings, CUDA peak (None elsewhere) and labels."""

    timing: dict[str, Any]
    peak: int | None
    labels: torch.Tensor


def _time_one_image(model: EmerDiff, rgb: torch.Tensor) -> TimedRun:
    """Segment the image once with stage timings; the CUDA peak of the whole image (None elsewhere)."""
    profiler = StageProfiler(model.device)
    with profiled(model, profiler):
        maps = model.mask_maps(rgb, image_seed(rgb, model.params.seed))
        labels = model.output(maps).labels
    # the profiler resets CUDA's peak at every stage: the image's peak is the largest stage peak
    peak = max(c.peak_mem_bytes for c in profiler.stages.values()) if model.device.type == "cuda" else None
    measured = len(modulated_masks(maps.clusters.masks, model.params.min_mask_fraction))
    default = model.params.num_masks
    seconds = {name: cost.seconds for name, cost in profiler.stages.items()}
    scaled = {name: s * (default / measured if name in SCALED_STAGES else 1.0) for name, s in seconds.items()}
    total = sum(scaled.values())
    timing = {
        "measured_masks": measured,
        "default_masks": default,
        "seconds": seconds,
        "extrapolated_seconds": scaled,
        "total_seconds": sum(seconds.values()),
        "extrapolated_total_seconds": total,
        "images_per_second": 1.0 / total if total > 0 else float("inf"),
        "peak_mem_bytes": peak,
    }
    return TimedRun(timing, peak, labels)


def _check_memory(model: EmerDiff, peak: int | None, masks: int) -> Check:
    what = MEMORY
    if peak is None:
        return Check.skipped("memory", what, f"CUDA only (this run is on {model.device.type})")
    estimate = memory_estimate(model, 2 * masks)
    if estimate is None:
        return Check.skipped("memory", what, "segmentor.memory_budget_gb=0: no plan, no estimate")
    return Check.measured(
        "memory",
        what,
        peak / GIB,
        estimate / GIB,
        detail=f"estimate = weights + injection record + largest batched stage "
        f"(budget {model.chunk_plan().budget_gib:.2f} GiB, "
        f"segmentor.memory_budget_gb={model.params.memory_budget_gb})",
    )


def _settings(model: EmerDiff, small_k: int) -> dict[str, Any]:
    p = model.params
    plan = model.chunk_plan()
    return {
        "resolution": p.resolution,
        "num_masks": p.num_masks,
        "small_k": small_k,
        "impl": p.impl,
        "lam": p.lam,
        "t_modulate": p.t_modulate,
        "num_inference_steps": p.num_inference_steps,
        "memory_budget_gb": p.memory_budget_gb,
        "memory_budget_chosen_gib": round(plan.budget_gib, 3),
        "chunk_plan": {"inversion": plan.inversion, "variants": plan.variants, "decode": plan.decode},
    }
