"""Train the toy world's miniature models on the CPU: VAE, UNet (a diffusers folder) and the tiny CLIP.

    python tools/train_toy.py --output runs/toy        # about 77 min on an idle 2-core CPU (docs/toyworld.md)

Stages run in order; one that finished (its time is in OUTPUT/training.json) is skipped when the command runs
again, except the unet stage continued with --unet-from:
vae (OUTPUT/vae/); decoder (the VAE's decoder alone trains on, so the encoder, the latent space and a UNet
trained in it stay; it replaces OUTPUT/vae/ and the VAE of OUTPUT/sd/ and OUTPUT/control/ where they exist;
--decoder-steps 0 leaves it out); unet (OUTPUT/sd/, the pipeline `model.pretrained=OUTPUT/sd` loads;
rewritten every --save-every steps, so a stopped run is usable); control (OUTPUT/control/: the same folder with a random
UNet, for comparisons); clip (OUTPUT/clip.safetensors, open_clip `toyworld-clip`). Losses go to
OUTPUT/logs/<stage>/metrics.csv, stage times to OUTPUT/training.json.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from emerdiff.cli.common.arguments import command_parser
from emerdiff.cli.common.messages import reported_errors

if TYPE_CHECKING:  # torch and the models load only after the arguments are parsed
    import pytorch_lightning as pl
    from diffusers import AutoencoderKL
    from torch.utils.data import DataLoader

    from emerdiff.toy_training import SceneBank

STAGES = ("vae", "decoder", "unet", "control", "clip")


def main(argv: list[str] | None = None) -> int:
    """Parse the command line and run the stages not yet done."""
    parser = command_parser(__doc__.split("\n")[0])
    parser.add_argument("--output", type=Path, required=True, help="folder for the models, logs and scene cache")
    parser.add_argument("--scenes", type=int, default=8000, help="training scenes (seeds 0..N-1)")
    parser.add_argument("--vae-steps", type=int, default=400, help="VAE steps, batch 16 of 64 px crops")
    parser.add_argument(
        "--decoder-steps",
        type=int,
        default=1000,
        help="steps of the decoder stage (VAE decoder alone, batch 16 of 64 px crops); 0: no decoder stage",
    )
    parser.add_argument("--unet-steps", type=int, default=8000, help="UNet steps, batch 32")
    parser.add_argument("--clip-steps", type=int, default=2000, help="CLIP steps, batch 64")
    parser.add_argument(
        "--clip-schedule",
        choices=("constant", "cosine"),
        default="cosine",
        help="CLIP learning rate after the warm-up: a cosine decay to zero (the shipped CLIP's), or constant",
    )
    parser.add_argument(
        "--unet-from",
        type=Path,
        default=None,
        help="pipeline folder whose UNet starts the unet stage (continue a stopped or shorter run)",
    )
    parser.add_argument(
        "--unet-restarts",
        nargs="*",
        type=int,
        default=[],
        metavar="STEP",
        help="UNet steps at which training restarts warm from the moving average (fresh optimizer and warm-up)",
    )
    parser.add_argument("--save-every", type=int, default=500, help="UNet steps between saved pipeline folders")
    parser.add_argument("--seed", type=int, default=0, help="seed of everything random in the training")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads; default: the usable cores (on a CPU shared with other work, 1 can be much faster)",
    )
    parser.add_argument(
        "--stages",
        nargs="+",
        choices=STAGES,
        help="stages to run; default: all (without decoder when --decoder-steps is 0)",
    )
    args = parser.parse_args(argv)
    if args.stages is None:
        args.stages = [stage for stage in STAGES if stage != "decoder" or args.decoder_steps]
    elif "decoder" in args.stages and not args.decoder_steps:
        parser.error("--stages decoder needs --decoder-steps N above 0 (the decoder stage's length)")
    if any(not 0 < step < args.unet_steps for step in args.unet_restarts):
        parser.error(f"--unet-restarts steps must lie between 0 and --unet-steps ({args.unet_steps}), both excluded")
    with reported_errors():
        return train(args)


def train(args: argparse.Namespace) -> int:
    """Run each chosen stage that has not written its output yet, timing it."""
    import torch

    from emerdiff.models import cpu_threads
    from emerdiff.toy_training import SceneBank

    threads = cpu_threads(args.threads)
    if threads:
        torch.set_num_threads(threads)
    out = args.output
    out.mkdir(parents=True, exist_ok=True)
    scenes = SceneBank.load_or_draw(args.scenes, out / f"scenes_{args.scenes}.npz")
    log_path = out / "training.json"
    times: dict[str, float] = json.loads(log_path.read_text()) if log_path.is_file() else {}
    stages: dict[str, Callable[[], None]] = {
        "vae": lambda: train_vae(args, scenes),
        "decoder": lambda: tune_decoder(args, scenes),
        "unet": lambda: train_unet(args, scenes),
        "control": lambda: save_control(args),
        "clip": lambda: train_clip(args, scenes),
    }
    outputs = {
        "vae": out / "vae",
        "decoder": out / "vae",
        "unet": out / "sd",
        "control": out / "control",
        "clip": out / "clip.safetensors",
    }
    for stage in args.stages:
        continuing = stage == "unet" and args.unet_from is not None  # a continuation runs though the stage is done
        if f"{stage}_minutes" in times and not continuing:
            print(f"{stage}: done before ({outputs[stage]}), skipped")
            continue
        start = time.monotonic()
        stages[stage]()
        times[f"{stage}_minutes"] = round((time.monotonic() - start) / 60, 2)
        log_path.write_text(json.dumps(times, indent=2))
        print(f"{stage}: {times[f'{stage}_minutes']} min -> {outputs[stage]}")
    return 0


def trainer(args: argparse.Namespace, stage: str, steps: int, callbacks: list) -> pl.Trainer:
    """A seeded CPU Trainer of `steps` steps logging its losses to OUTPUT/logs/STAGE/metrics.csv."""
    import pytorch_lightning as pl
    from pytorch_lightning.loggers import CSVLogger

    pl.seed_everything(args.seed, verbose=False)
    return pl.Trainer(
        max_steps=steps,
        accelerator="cpu",
        devices=1,
        logger=CSVLogger(args.output, "logs", stage),
        log_every_n_steps=10,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        callbacks=callbacks,
        default_root_dir=str(args.output),
    )


def train_vae(args: argparse.Namespace, scenes: SceneBank) -> None:
    """Stage vae: AutoencoderKL on crops, then its scaling factor (1 / std of the scenes' latents), saved."""
    from emerdiff.toy_training import VAETraining, encode_scenes

    module = VAETraining()
    trainer(args, "vae", args.vae_steps, []).fit(module, crop_loader(scenes))
    mean, std = encode_scenes(module.vae, scenes.images[:1000])
    samples = mean + std * __import__("torch").randn_like(std)
    module.vae.register_to_config(scaling_factor=float(1.0 / samples.std()))
    print(
        f"vae: latent channel std {[round(float(s), 3) for s in samples.std(dim=(0, 2, 3))]}, "
        f"scaling factor {module.vae.config.scaling_factor:.4f}"
    )
    module.vae.save_pretrained(args.output / "vae")


def tune_decoder(args: argparse.Namespace, scenes: SceneBank) -> None:
    """Stage decoder: OUTPUT/vae's decoder alone trains on (the encoder, so the latent space and a UNet trained in it,
    stay); the result replaces OUTPUT/vae and, in fp16, the VAE of the pipeline folders already written."""
    from diffusers import AutoencoderKL

    from emerdiff.toy_training import VAETraining, half_copy

    vae = AutoencoderKL.from_pretrained(args.output / "vae").float().train()
    module = VAETraining(lr=5e-4, warmup_steps=50, vae=vae, decoder_only=True)
    trainer(args, "decoder", args.decoder_steps, []).fit(module, crop_loader(scenes))
    module.vae.save_pretrained(args.output / "vae")
    for folder in ("sd", "control"):
        if (args.output / folder / "vae").is_dir():
            half_copy(module.vae).save_pretrained(args.output / folder / "vae")


def crop_loader(scenes: SceneBank) -> DataLoader:
    """Batches of 16 random 64 px crops of the scenes: the VAE's training data."""
    from torch.utils.data import DataLoader

    from emerdiff.toy_training import VAE_CROP, RandomCrops

    return DataLoader(RandomCrops(scenes.images, VAE_CROP), batch_size=16, shuffle=True, drop_last=True)


def train_unet(args: argparse.Namespace, scenes: SceneBank) -> None:
    """Stage unet: the UNet on the encoded scenes; OUTPUT/sd/ is rewritten every --save-every steps."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from torch.utils.data import DataLoader
    from transformers import CLIPTextModel

    from emerdiff.models import build_random_sd, freeze
    from emerdiff.toy_training import ARCH, LatentScenes, SavePipeline, UNetTraining, encode_scenes, tokenize

    vae = AutoencoderKL.from_pretrained(args.output / "vae")
    mean, std = encode_scenes(vae, scenes.images)
    start, encoder = (None, None)
    if args.unet_from:  # the continued run's UNet and the frozen text encoder it learned the captions through
        start = UNet2DConditionModel.from_pretrained(args.unet_from / "unet")
        encoder = CLIPTextModel.from_pretrained(args.unet_from / "text_encoder")
    module = UNetTraining(
        vae.config.scaling_factor,
        seed=args.seed,
        restarts=tuple(args.unet_restarts),
        init_unet=start,
        init_text_encoder=encoder,
    )
    parts = build_random_sd(ARCH, seed=args.seed)
    parts.vae, parts.text_encoder = freeze_vae(vae), module.text_encoder
    ids = tokenize(parts.tokenizer, scenes.captions)
    loader = DataLoader(LatentScenes(mean, std, ids), batch_size=32, shuffle=True, drop_last=True)
    save = SavePipeline(freeze(parts), args.output / "sd", args.save_every)
    trainer(args, "unet", args.unet_steps, [save]).fit(module, loader)


def freeze_vae(vae: AutoencoderKL) -> AutoencoderKL:
    """The trained VAE in eval mode without gradients."""
    return vae.eval().requires_grad_(False)


def save_control(args: argparse.Namespace) -> None:
    """Stage control: OUTPUT/sd/ with its UNet replaced by the same architecture's random initial weights."""
    from emerdiff.config import ModelConfig
    from emerdiff.models import build_random_sd, load_sd
    from emerdiff.toy_training import ARCH, save_pipeline

    trained = load_sd(ModelConfig(pretrained=str(args.output / "sd"), dtype="float32", device="cpu"))
    trained.unet = build_random_sd(ARCH, seed=args.seed).unet
    save_pipeline(trained, args.output / "control")


def train_clip(args: argparse.Namespace, scenes: SceneBank) -> None:
    """Stage clip: the tiny open_clip model, contrastive on scene crops and the crops' captions."""
    from ovseg.training import train_toy_clip

    train_toy_clip(
        scenes,
        args.output / "clip.safetensors",
        lambda steps, callbacks: trainer(args, "clip", steps, callbacks),
        args.clip_steps,
        cosine=args.clip_schedule == "cosine",
    )


if __name__ == "__main__":
    raise SystemExit(main())
