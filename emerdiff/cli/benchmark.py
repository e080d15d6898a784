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

    python tools/benchmark.py --cfg eval/toyworld --cfg toy --approximations all --output docs/benchmarks/approximations

--approximations measures approximate modes against the exact path on the labelled split of data.*
(emerdiff/approximations.py): FLOPs, UNet calls, decodes, CPU speed-up, label agreement, mIoU and
Boundary IoU per mode, written as approximations.md, approximations.png and approximations.json.
"""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

from emerdiff.cli.common.arguments import base_parser, load_cli_config, parse_args
from emerdiff.cli.common.messages import reported_errors
from emerdiff.config import IMPLS, ConfigError, EvalConfig, section
from emerdiff.files import version_record

# Dense fp16/bf16 tensor-core peak of named GPUs, TFLOP/s (vendor data sheets, no sparsity).
GPU_PEAK_TFLOPS = {
    "H100-SXM": 989.0,
    "A100": 312.0,
    "L40S": 362.0,
    "RTX4090": 165.0,
    "A10": 125.0,
    "L4": 121.0,
    "V100": 125.0,
    "RTX3090": 71.0,
    "T4": 65.0,
}


def main(argv: list[str] | None = None) -> int:
    """Parse the command line, benchmark, print the table and write --output/benchmark.json."""
    parser = base_parser(__doc__.split("\n")[0])
    parser.add_argument("--impl", default="fast,reference", help="comma-separated: fast, reference")
    parser.add_argument("--image", help="image to segment (default: scikit-image's astronaut photo)")
    parser.add_argument("--repeats", type=int, default=1, help="alternate runs per impl; the fastest stage times count")
    parser.add_argument("--no-warmup", action="store_true", help="skip the untimed UNet/VAE warm-up pass")
    parser.add_argument("--cost-only", action="store_true", help="cost model on the meta device only, no run")
    parser.add_argument("--gpu", default="A100", choices=sorted(GPU_PEAK_TFLOPS), help="GPU of the time projection")
    parser.add_argument("--utilization", type=float, default=0.4, help="share of the GPU's peak assumed sustained")
    parser.add_argument(
        "--approximations",
        metavar="MODES",
        help="compare approximate modes with the exact path on the split of data.*: 'all', or "
        "comma-separated modes such as exact,latent,one_step,steps3,decode256,one_step+latent",
    )
    parser.add_argument("--output", help="folder for benchmark.json (approximations.md/.png/.json)")
    args = parse_args(parser, argv)
    arguments = argv if argv is not None else sys.argv[1:]
    command = "python tools/benchmark.py " + " ".join(shlex.quote(a) for a in arguments)
    with reported_errors():
        cfg = load_cli_config(args)
        if args.approximations:
            return approximations(cfg, args.approximations, args.output, command)
        impls = [i.strip() for i in args.impl.split(",") if i.strip()]
        unknown = [i for i in impls if i not in IMPLS]
        if unknown or not impls:
            raise ConfigError(f"--impl takes fast and/or reference, got {args.impl!r}")
        from emerdiff.benchmark import gib_text, memory_estimate, report, run, table  # torch loads after the checks

        results, models = run(cfg, impls, args.image, max(args.repeats, 1), args.cost_only, not args.no_warmup)
    measured = not args.cost_only
    memory = {r.impl: memory_estimate(models[r.impl], r) for r in results}
    print(f"# {command}")
    print(table(results, measured))
    record = report(cfg, results, memory, measured, args.gpu, GPU_PEAK_TFLOPS[args.gpu], args.utilization, command)
    for impl, seconds in record["projection"]["seconds"].items():
        print(
            f"projected {impl}: {seconds:.3g} s/image on {args.gpu} at {args.utilization:.0%} of "
            f"{GPU_PEAK_TFLOPS[args.gpu]:.0f} TFLOP/s"
        )
    for impl, mem in memory.items():
        print(
            f"memory estimate {impl}: {gib_text(mem['total'])} GiB = weights {gib_text(mem['weights'])} + record "
            f"{gib_text(mem['record'])} + largest stage {gib_text(mem['largest_stage_peak'])} (meta-device tensors; "
            f"largest batches: inversion {mem['batch_inversion']}, variants {mem['batch_variants']}, "
            f"decode {mem['batch_decode']})"
        )
    if args.output:
        out = Path(args.output)
        out.mkdir(parents=True, exist_ok=True)
        (out / "benchmark.json").write_text(json.dumps(version_record("benchmark") | record, indent=2))
        print(f"wrote {out / 'benchmark.json'}")
    return 0


def approximations(cfg, modes: str, output: str | None, command: str) -> int:
    """--approximations: every mode on the split, side by side; the table printed, the files written to `output`."""
    if not cfg.data.dataset:
        raise ConfigError("--approximations measures on a labelled split: set data.dataset (e.g. --cfg eval/toyworld)")
    if not output:
        raise ConfigError("tell where the table and figure go: --output DIR")
    from emerdiff.approximations import default_modes, parse_mode

    names = (
        default_modes(cfg.segmentor.resolution)
        if modes == "all"
        else [m.strip() for m in modes.split(",") if m.strip()]
    )
    for name in names:
        parse_mode(name)
    from emerdiff.cli.common.evaluation import evaluation_split

    metadata, data = evaluation_split(cfg)
    from emerdiff.approximations import figure, markdown, mode_models, record, run_sweep
    from emerdiff.benchmark import warm_up
    from emerdiff.evaluation.module import IndexedDataset
    from emerdiff.segmentor import EmerDiff

    base = EmerDiff.from_config(cfg)
    models = mode_models(base, names)
    warm_up(base)
    images = IndexedDataset(data.split, data.shorter_side, getattr(data.split, "interpolation", "bicubic"))
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)

    def write(sweep) -> None:
        (out / "approximations.md").write_text(markdown(sweep, command))
        (out / "approximations.json").write_text(json.dumps(record(sweep, command), indent=2))
        figure(
            sweep,
            out / "approximations.png",
            f"{base.components.name}: {sweep.num_images} images of "
            f"{sweep.dataset} (quality against cost; star = exact path)",
        )

    sweep = run_sweep(
        models,
        images,
        metadata,
        section(cfg.eval, EvalConfig),
        cfg.data.dataset,
        log=lambda message: print(message, flush=True),
        each_image=write,
    )
    write(sweep)
    print(markdown(sweep, command))
    print(f"wrote {out / 'approximations.md'}, {out / 'approximations.png'}, {out / 'approximations.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
