"""Fast and reference paths side by side: time, FLOPs, UNet/VAE calls and peak memory per stage (tools/benchmark.py).

Each implementation segments the same image in one process, alternately when repeated, so their ratios share
the machine's conditions; FLOPs and the memory estimate come from the cost model on meta-device copies
(emerdiff/profiling.py), so they need no weights and no run.
"""

from __future__ import annotations

import platform
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from emerdiff.config import ConfigError, ModelConfig, SegmentorConfig, is_random_model, section
from emerdiff.image import ImageInput
from emerdiff.memory import GIB, measure_memory
from emerdiff.models import SDComponents, build_random_sd, cast_components, load_sd, resolve_device, resolve_dtype
from emerdiff.profiling import STAGES, StageCost, StageProfiler, image_cost, profiled, total
from emerdiff.segmentor import EmerDiff, modulated_masks


@dataclass
class ImplResult:
    """One implementation's figures: measured stages (None with --cost-only) and the meta-device cost model."""

    impl: str
    num_masks: int
    model: dict[str, StageCost]
    measured: dict[str, StageCost] | None = None

    def figures(self) -> dict[str, StageCost]:
        """Per stage: measured seconds, calls and memory where run, FLOPs from the cost model."""
        out = {}
        for stage in STAGES:
            cost = replace(self.measured[stage]) if self.measured else replace(self.model[stage], seconds=0.0)
            cost.flops = self.model[stage].flops
            if not self.measured:
                cost.peak_mem_bytes = self.model[stage].peak_mem_bytes
            out[stage] = cost
        return out


def default_image() -> np.ndarray:
    """scikit-image's astronaut photo (512 x 512 RGB): a real image without a download."""
    from skimage import data

    return data.astronaut()


def build_components(cfg: DictConfig, cost_only: bool) -> SDComponents:
    """The configured SD parts; with --cost-only, random-weight architectures are built on the meta device."""
    model = section(cfg.model, ModelConfig)
    if not cost_only:
        return load_sd(model)
    if not is_random_model(model):
        raise ConfigError(
            "--cost-only builds random weights on the meta device: set model.random_init=true "
            "(and model.arch) or use --cfg configs/tiny.yaml"
        )
    components = build_random_sd("tiny" if model.pretrained == "tiny" else model.arch, device="meta")
    dtype = resolve_dtype(model.dtype, resolve_device("cuda" if model.dtype == "auto" else model.device))
    return cast_components(components, dtype)


@dataclass
class Measured:
    """Stage costs of one implementation's run and the number of masks it modulated."""

    stages: dict[str, StageCost]
    num_masks: int


def measure(models: dict[str, EmerDiff], image: ImageInput, repeats: int) -> dict[str, Measured]:
    """Segment `image` with every model, alternately `repeats` times; each stage keeps its fastest run."""
    best: dict[str, Measured] = {}
    for _ in range(repeats):
        for impl, model in models.items():
            profiler = StageProfiler(model.device)
            with profiled(model, profiler):
                out = model.segment(image)
            num_masks = len(modulated_masks(out.lowres_masks, model.params.min_mask_fraction))
            kept = best.setdefault(impl, Measured(profiler.stages, num_masks))
            for name, cost in profiler.stages.items():
                if cost.seconds < kept.stages[name].seconds:
                    kept.stages[name] = cost
    return best


def warm_up(model: EmerDiff) -> None:
    """One UNet pass and one VAE decode at batch 1, so one-time kernel set-up is not charged to the first impl."""
    side = model.params.resolution // 8
    latent = torch.zeros(1, model.unet.config.in_channels, side, side, device=model.device, dtype=model.unet.dtype)
    with torch.no_grad():
        model.unet(latent, torch.tensor([1], device=model.device), **model.conditioning().unet_kwargs(latent))
        model.vae.decode(latent)


def run(
    cfg: DictConfig, impls: Sequence[str], image: str | None, repeats: int, cost_only: bool, warmup: bool
) -> tuple[list[ImplResult], dict[str, EmerDiff]]:
    """Measure (unless `cost_only`) and cost-model every implementation on one set of SD components."""
    components = build_components(cfg, cost_only)
    params = section(cfg.segmentor, SegmentorConfig)
    models = {impl: EmerDiff(components, replace(params, impl=impl)) for impl in impls}
    measured: dict[str, Measured] = {}
    if not cost_only:
        if warmup:
            warm_up(next(iter(models.values())))
        measured = measure(models, image or default_image(), repeats)
    results = []
    for impl, model in models.items():
        run_ = measured.get(impl)
        num_masks = run_.num_masks if run_ else params.num_masks
        results.append(ImplResult(impl, num_masks, image_cost(model, num_masks), run_.stages if run_ else None))
    return results, models


def weight_bytes(model: EmerDiff) -> int:
    """Bytes of the UNet, VAE and text-encoder weights."""
    return sum(p.numel() * p.element_size() for m in model.components.modules for p in m.parameters())


def largest_batch(chunk: int, count: int) -> int:
    """The largest batch a stage of `count` items runs in chunks of `chunk` (0 = all)."""
    return count if chunk <= 0 else min(chunk, count)


def memory_estimate(model: EmerDiff, result: ImplResult) -> dict[str, int]:
    """Device memory of one image from the cost model: weights + the injection record + the largest stage peak."""
    plan, steps, variants = model.chunk_plan(), len(model.grid.tail(model.params.t_modulate)), 2 * result.num_masks
    record = (plan.profile or measure_memory(model)).record  # 0 without injection
    stage_peak = max(cost.peak_mem_bytes for cost in result.model.values())
    weights = weight_bytes(model)
    return {
        "weights": weights,
        "record": record,
        "largest_stage_peak": stage_peak,
        "total": weights + record + stage_peak,
        "batch_inversion": largest_batch(plan.inversion, steps),
        "batch_variants": model.modulation_settings(plan.variants).batch_size(variants),
        "batch_decode": largest_batch(plan.decode, variants),
    }


def ratio_text(a: float, b: float) -> str:
    return f"{a / b:.3f}" if b else "-"


def gib_text(n: int) -> str:
    return f"{n / GIB:.2f}"


def table(results: list[ImplResult], measured: bool) -> str:
    """Markdown table, one row per stage plus the total; each figure per implementation, then fast/reference."""
    figures = {r.impl: r.figures() for r in results}
    for figs in figures.values():
        figs["total"] = total(figs)
    impls = [r.impl for r in results]
    both = {"fast", "reference"} <= set(impls)
    # (name, shown figure, the number fast/ref divides or None)
    columns: list[tuple[str, Callable[[StageCost], str], Callable[[StageCost], float] | None]] = [
        ("GFLOP", lambda c: f"{c.flops / 1e9:,.2f}", lambda c: c.flops)
    ]
    if measured:
        columns.append(("s", lambda c: f"{c.seconds:,.2f}", lambda c: c.seconds))
    columns += [
        ("UNet calls (samples)", lambda c: f"{c.unet_calls} ({c.unet_samples})", None),
        ("VAE calls (samples)", lambda c: f"{c.vae_calls} ({c.vae_samples})", None),
        ("peak GiB", lambda c: gib_text(c.peak_mem_bytes), None),
    ]
    head = ["stage"]
    for name, _, ratio in columns:
        head += [f"{name} {impl}" for impl in impls] + (["fast/ref"] if both and ratio is not None else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for stage in list(STAGES) + ["total"]:
        row = [f"**{stage}**" if stage == "total" else stage]
        for _, show, ratio in columns:
            row += [show(figures[impl][stage]) for impl in impls]
            if both and ratio is not None:
                row.append(ratio_text(ratio(figures["fast"][stage]), ratio(figures["reference"][stage])))
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def projection(results: list[ImplResult], peak_tflops: float, utilization: float) -> dict[str, float]:
    """Seconds per image on a GPU of `peak_tflops` (dense fp16) if it sustained `utilization` of it on these FLOPs."""
    sustained = peak_tflops * 1e12 * utilization
    return {r.impl: total(r.model).flops / sustained for r in results}


def report(
    cfg: DictConfig,
    results: list[ImplResult],
    models_memory: dict[str, dict[str, int]],
    measured: bool,
    gpu: str,
    peak_tflops: float,
    utilization: float,
    command: str,
) -> dict[str, Any]:
    """The JSON record: command, settings, per-implementation totals and stages, ratios, projections."""
    impls: dict[str, dict[str, Any]] = {}
    for r in results:
        figs = r.figures()
        tot = total(figs)
        impls[r.impl] = {
            "flops": tot.flops,
            "seconds": tot.seconds if measured else None,
            "unet_calls": tot.unet_calls,
            "unet_samples": tot.unet_samples,
            "vae_calls": tot.vae_calls,
            "peak_mem_bytes": tot.peak_mem_bytes,
            "num_masks": r.num_masks,
            "stages": {s: c.as_dict() for s, c in figs.items()},
            "cost_model": {s: c.as_dict() for s, c in r.model.items()},
            "memory_estimate_bytes": models_memory[r.impl],
        }
    out = {
        "command": command,
        "measured": measured,
        "device": str(resolve_device(cfg.model.device)),
        "machine": {"platform": platform.platform(), "torch": torch.__version__, "threads": torch.get_num_threads()},
        "model": OmegaConf.to_container(cfg.model),
        "segmentor": OmegaConf.to_container(cfg.segmentor),
        "impls": impls,
        "projection": {
            "gpu": gpu,
            "utilization": utilization,
            "seconds": projection(results, peak_tflops, utilization),
        },
    }
    if {"fast", "reference"} <= impls.keys():
        fast, ref = impls["fast"], impls["reference"]
        out["ratios"] = {
            "flops": fast["flops"] / ref["flops"],
            "modulated_flops": fast["stages"]["modulated"]["flops"] / ref["stages"]["modulated"]["flops"],
            "seconds": fast["seconds"] / ref["seconds"] if measured else None,
            "modulated_seconds": (
                fast["stages"]["modulated"]["seconds"] / ref["stages"]["modulated"]["seconds"] if measured else None
            ),
        }
    return out
