"""Benchmark EmerDiff's fast and reference paths: time, FLOPs, UNet/VAE calls and peak memory per stage.

    python tools/benchmark.py --cfg configs/tiny.yaml --impl fast,reference --output bench/
    python tools/benchmark.py model.random_init=true model.arch=sd15 segmentor.resolution=256 \\
        segmentor.num_masks=4 --output bench/   # SD-1.5-sized random weights on this machine
    python tools/benchmark.py model.random_init=true model.arch=sd15 model.dtype=float16 --cost-only

Each implementation segments the same image (a photo from scikit-image unless --image) in
one process, so the fast/reference ratios share the machine's conditions; --repeats runs
the implementations alternately and keeps each stage's fastest time. FLOPs are counted with
torch.utils.flop_counter.FlopCounterMode on meta-device copies of the model with the run's
shapes (the same count as in the run, without its overhead); --cost-only skips the run and
reports that cost model alone (any size, no weights, no data). Results: docs/benchmarks.md.
"""

from __future__ import annotations

import json
import platform
import shlex
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from _common import base_parser, load_cli_config, parse_args, reported_errors  # first: finds the checkout
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from emerdiff import ConfigError, EmerDiff
from emerdiff.config import IMPLS, is_random_model
from emerdiff.image import ImageInput
from emerdiff.memory import GIB, measure_memory
from emerdiff.models import SDComponents, build_random_sd, cast_components, load_sd, resolve_device, resolve_dtype
from emerdiff.profiling import STAGES, StageCost, StageProfiler, image_cost, profiled, total
from emerdiff.segmentor import modulated_masks

# Dense fp16/bf16 tensor-core peak of named GPUs, TFLOP/s (vendor data sheets, no sparsity).
GPU_PEAK_TFLOPS = {"H100-SXM": 989.0, "A100": 312.0, "L40S": 362.0, "RTX4090": 165.0, "A10": 125.0,
                   "L4": 121.0, "V100": 125.0, "RTX3090": 71.0, "T4": 65.0}


@dataclass
class ImplResult:
    """One implementation's figures: measured stages (None with --cost-only) and the meta-device cost model."""

    impl: str
    num_masks: int
    model: Dict[str, StageCost]
    measured: Optional[Dict[str, StageCost]] = None

    def figures(self) -> Dict[str, StageCost]:
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
    model = OmegaConf.to_object(cfg.model)
    if not cost_only:
        return load_sd(model)
    if not is_random_model(model):
        raise ConfigError("--cost-only builds random weights on the meta device: set model.random_init=true "
                          "(and model.arch) or use --cfg configs/tiny.yaml")
    components = build_random_sd("tiny" if model.pretrained == "tiny" else model.arch, device="meta")
    dtype = resolve_dtype(model.dtype, resolve_device("cuda" if model.dtype == "auto" else model.device))
    return cast_components(components, dtype)


@dataclass
class Measured:
    """Stage costs of one implementation's run and the number of masks it modulated."""

    stages: Dict[str, StageCost]
    num_masks: int


def measure(models: Dict[str, EmerDiff], image: ImageInput, repeats: int) -> Dict[str, Measured]:
    """Segment `image` with every model, alternately `repeats` times; each stage keeps its fastest run."""
    best: Dict[str, Measured] = {}
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
        model.unet(latent, torch.tensor([1], device=model.device), model.prompt)
        model.vae.decode(latent)


def run(cfg: DictConfig, impls: Sequence[str], image: Optional[str], repeats: int, cost_only: bool,
        warmup: bool) -> Tuple[List[ImplResult], Dict[str, EmerDiff]]:
    """Measure (unless `cost_only`) and cost-model every implementation on one set of SD components."""
    components = build_components(cfg, cost_only)
    params = OmegaConf.to_object(cfg.segmentor)
    models = {impl: EmerDiff(components, replace(params, impl=impl)) for impl in impls}
    measured: Dict[str, Measured] = {}
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
    modules = (model.unet, model.vae, model.text_encoder)
    return sum(p.numel() * p.element_size() for m in modules for p in m.parameters())


def _largest_batch(chunk: int, count: int) -> int:
    """The largest batch a stage of `count` items runs in chunks of `chunk` (0 = all)."""
    return count if chunk <= 0 else min(chunk, count)


def memory_estimate(model: EmerDiff, result: ImplResult) -> Dict[str, int]:
    """Device memory of one image from the cost model: weights + the injection record + the largest stage peak."""
    plan, steps, variants = model.chunk_plan(), len(model.grid.tail(model.params.t_modulate)), 2 * result.num_masks
    record = (plan.profile or measure_memory(model)).record  # 0 without injection
    stage_peak = max(cost.peak_mem_bytes for cost in result.model.values())
    weights = weight_bytes(model)
    return {"weights": weights, "record": record, "largest_stage_peak": stage_peak,
            "total": weights + record + stage_peak, "batch_inversion": _largest_batch(plan.inversion, steps),
            "batch_variants": model.modulation_settings(plan.variants).batch_size(variants),
            "batch_decode": _largest_batch(plan.decode, variants)}


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.3f}" if b else "-"


def _gib(n: int) -> str:
    return f"{n / GIB:.2f}"


def table(results: List[ImplResult], measured: bool) -> str:
    """Markdown table, one row per stage plus the total; each figure per implementation, then fast/reference."""
    figures = {r.impl: r.figures() for r in results}
    for figs in figures.values():
        figs["total"] = total(figs)
    impls = [r.impl for r in results]
    both = {"fast", "reference"} <= set(impls)
    columns = [("GFLOP", lambda c: f"{c.flops / 1e9:,.2f}", lambda c: c.flops)]
    if measured:
        columns.append(("s", lambda c: f"{c.seconds:,.2f}", lambda c: c.seconds))
    columns += [("UNet calls (samples)", lambda c: f"{c.unet_calls} ({c.unet_samples})", None),
                ("VAE calls (samples)", lambda c: f"{c.vae_calls} ({c.vae_samples})", None),
                ("peak GiB", lambda c: _gib(c.peak_mem_bytes), None)]
    head = ["stage"]
    for name, _, ratio in columns:
        head += [f"{name} {impl}" for impl in impls] + (["fast/ref"] if both and ratio else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for stage in list(STAGES) + ["total"]:
        row = [f"**{stage}**" if stage == "total" else stage]
        for _, show, ratio in columns:
            row += [show(figures[impl][stage]) for impl in impls]
            if both and ratio:
                row.append(_ratio(ratio(figures["fast"][stage]), ratio(figures["reference"][stage])))
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def projection(results: List[ImplResult], gpu: str, utilization: float) -> Dict[str, float]:
    """Seconds per image on `gpu` if it sustained `utilization` of its dense fp16 peak on these FLOPs."""
    peak = GPU_PEAK_TFLOPS[gpu] * 1e12 * utilization
    return {r.impl: total(r.model).flops / peak for r in results}


def report(cfg: DictConfig, results: List[ImplResult], models_memory: Dict[str, Dict[str, int]], measured: bool,
           gpu: str, utilization: float, command: str) -> Dict[str, object]:
    """The JSON record: command, settings, per-implementation totals and stages, ratios, projections."""
    impls = {}
    for r in results:
        figs = r.figures()
        tot = total(figs)
        impls[r.impl] = {
            "flops": tot.flops, "seconds": tot.seconds if measured else None, "unet_calls": tot.unet_calls,
            "unet_samples": tot.unet_samples, "vae_calls": tot.vae_calls, "peak_mem_bytes": tot.peak_mem_bytes,
            "num_masks": r.num_masks, "stages": {s: c.as_dict() for s, c in figs.items()},
            "cost_model": {s: c.as_dict() for s, c in r.model.items()},
            "memory_estimate_bytes": models_memory[r.impl],
        }
    out = {"command": command, "measured": measured, "device": str(resolve_device(cfg.model.device)),
           "machine": {"platform": platform.platform(), "torch": torch.__version__, "threads": torch.get_num_threads()},
           "model": OmegaConf.to_container(cfg.model), "segmentor": OmegaConf.to_container(cfg.segmentor),
           "impls": impls,
           "projection": {"gpu": gpu, "utilization": utilization, "seconds": projection(results, gpu, utilization)}}
    if {"fast", "reference"} <= impls.keys():
        fast, ref = impls["fast"], impls["reference"]
        out["ratios"] = {
            "flops": fast["flops"] / ref["flops"],
            "modulated_flops": fast["stages"]["modulated"]["flops"] / ref["stages"]["modulated"]["flops"],
            "seconds": fast["seconds"] / ref["seconds"] if measured else None,
            "modulated_seconds": (fast["stages"]["modulated"]["seconds"] / ref["stages"]["modulated"]["seconds"]
                                  if measured else None),
        }
    return out


def main(argv: Optional[List[str]] = None) -> int:
    """Parse the command line, benchmark, print the table and write --output/benchmark.json."""
    parser = base_parser(__doc__.split("\n")[0])
    parser.add_argument("--impl", default="fast,reference", help="comma-separated: fast, reference")
    parser.add_argument("--image", help="image to segment (default: scikit-image's astronaut photo)")
    parser.add_argument("--repeats", type=int, default=1, help="alternate runs per impl; the fastest stage times count")
    parser.add_argument("--no-warmup", action="store_true", help="skip the untimed UNet/VAE warm-up pass")
    parser.add_argument("--cost-only", action="store_true", help="cost model on the meta device only, no run")
    parser.add_argument("--gpu", default="A100", choices=sorted(GPU_PEAK_TFLOPS), help="GPU of the time projection")
    parser.add_argument("--utilization", type=float, default=0.4, help="share of the GPU's peak assumed sustained")
    parser.add_argument("--output", help="folder for benchmark.json")
    args = parse_args(parser, argv)
    command = "python tools/benchmark.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    with reported_errors():
        cfg = load_cli_config(args)
        impls = [i.strip() for i in args.impl.split(",") if i.strip()]
        unknown = [i for i in impls if i not in IMPLS]
        if unknown or not impls:
            raise ConfigError(f"--impl takes fast and/or reference, got {args.impl!r}")
        results, models = run(cfg, impls, args.image, max(args.repeats, 1), args.cost_only, not args.no_warmup)
    measured = not args.cost_only
    memory = {r.impl: memory_estimate(models[r.impl], r) for r in results}
    print(f"# {command}")
    print(table(results, measured))
    record = report(cfg, results, memory, measured, args.gpu, args.utilization, command)
    for impl, seconds in record["projection"]["seconds"].items():
        print(f"projected {impl}: {seconds:.3g} s/image on {args.gpu} at {args.utilization:.0%} of "
              f"{GPU_PEAK_TFLOPS[args.gpu]:.0f} TFLOP/s")
    for impl, mem in memory.items():
        print(f"memory estimate {impl}: {_gib(mem['total'])} GiB = weights {_gib(mem['weights'])} + record "
              f"{_gib(mem['record'])} + largest stage {_gib(mem['largest_stage_peak'])} (meta-device tensors; "
              f"largest batches: inversion {mem['batch_inversion']}, variants {mem['batch_variants']}, "
              f"decode {mem['batch_decode']})")
    if args.output:
        out = Path(args.output)
        out.mkdir(parents=True, exist_ok=True)
        (out / "benchmark.json").write_text(json.dumps(record, indent=2))
        print(f"wrote {out / 'benchmark.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
