"""The toy world's training pieces (emerdiff/toy_training.py, ovseg/training.py): what holds for any weights."""

import numpy as np
import pytest
import torch

from emerdiff.data.toyworld import CLASSES
from emerdiff.toy_training import FOCUS, FOCUS_BELOW, SceneBank, focused_timesteps, to_pixels, warmup


def test_timesteps_fall_below_the_focus_bound_as_often_as_stated_and_cover_the_whole_schedule():
    torch.manual_seed(0)
    t = focused_timesteps(200_000, 1000, torch.device("cpu"))
    expected = FOCUS + (1 - FOCUS) * FOCUS_BELOW / 1000  # focused draws plus uniform draws that land low
    assert (t < FOCUS_BELOW).float().mean().item() == pytest.approx(expected, abs=0.005)
    assert t.min() == 0 and t.max() == 999


def test_pixels_are_sd_range_channels_first():
    image = np.array([[[0, 255, 51]]], np.uint8)
    assert to_pixels(image).flatten().tolist() == pytest.approx([-1.0, 1.0, -0.6])


def test_the_learning_rate_warms_up_linearly_then_stays():
    factor = warmup(4)
    assert [factor(s) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]


def test_the_learning_rate_warms_up_again_from_each_restart_step():
    factor = warmup(2, restarts=(3, 6))
    assert [factor(s) for s in range(9)] == [0.5, 1.0, 1.0, 0.5, 1.0, 1.0, 0.5, 1.0, 1.0]


def test_a_restart_happens_at_each_restart_step_and_continues_from_the_moving_average_with_fresh_moments():
    """What a run continued with --unet-from does, inside one run: the UNet takes the averaged weights, AdamW's
    moments and the average start afresh (the first update after it copies the UNet)."""
    import pytorch_lightning as pl
    from torch.utils.data import DataLoader

    from emerdiff.models import build_random_sd
    from emerdiff.toy_training import LatentScenes, UNetTraining, tokenize

    module = UNetTraining(0.5, seed=0, restarts=(2, 4))
    ids = tokenize(build_random_sd("toyworld", seed=0).tokenizer, ["a photo of sky."] * 4)
    latents = LatentScenes(torch.randn(4, 4, 16, 16), torch.full((4, 4, 16, 16), 0.1), ids)
    seen = []

    class Watch(pl.Callback):
        def on_train_batch_end(self, trainer, module, *args):
            state = trainer.optimizers[0].state
            seen.append((trainer.global_step, min(int(s["step"]) for s in state.values()), int(module.ema.n_averaged)))

    pl.seed_everything(0)
    trainer = pl.Trainer(max_steps=6, accelerator="cpu", logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False, callbacks=[Watch()])
    trainer.fit(module, DataLoader(latents, batch_size=2))
    # after each batch: (steps done, AdamW's own step count, updates in the average before this batch's own)
    assert seen == [(1, 1, 0), (2, 2, 1), (3, 1, 0), (4, 2, 1), (5, 1, 0), (6, 2, 1)]

    average = module.ema.module.state_dict()
    module.restart()
    assert all(torch.equal(mine, average[name]) for name, mine in module.unet.state_dict().items())
    assert not trainer.optimizers[0].state and int(module.ema.n_averaged) == 0


def test_the_clip_learning_rate_warms_up_then_stays_or_decays_along_a_cosine_to_zero_at_the_last_step():
    from ovseg.training import learning_rate_factor

    constant, cosine = learning_rate_factor(2), learning_rate_factor(2, cosine_steps=6)
    assert [constant(s) for s in range(7)] == [0.5, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]
    assert [cosine(s) for s in range(7)] == pytest.approx([0.5, 1.0, 1.0, 0.5 + 0.5**1.5, 0.5, 0.5 - 0.5**1.5, 0.0])


def test_the_scene_bank_is_drawn_once_then_read_back(tmp_path):
    cache = tmp_path / "scenes.npz"
    drawn = SceneBank.load_or_draw(3, cache)
    read = SceneBank.load_or_draw(3, cache)
    assert np.array_equal(drawn.images, read.images) and read.captions == drawn.captions
    assert SceneBank.load_or_draw(2, cache).images.shape[0] == 2  # another count draws again


def test_a_crop_caption_names_the_classes_covering_enough_of_it_largest_first():
    from ovseg.training import crop_caption

    label = np.full((10, 10), CLASSES.index("grass"), np.uint8)
    label[:4] = CLASSES.index("sky")  # 40%
    label[9, :9] = CLASSES.index("ball")  # 9%: below the 15% bound
    assert crop_caption(label, "a photo of a {}.") == "a photo of a grass and sky."


def test_a_continued_unet_stage_starts_from_the_saved_unet_in_float32_and_its_moving_average_too():
    from emerdiff.toy_training import UNetTraining

    saved = UNetTraining(0.5, seed=3).unet.half()  # the shipped folders are fp16
    module = UNetTraining(0.5, seed=0, init_unet=saved)
    for (name, mine), theirs, averaged in zip(module.unet.state_dict().items(), saved.state_dict().values(),
                                              module.ema.module.state_dict().values(), strict=True):
        assert mine.dtype == torch.float32 and torch.equal(mine, theirs.float()), name
        assert torch.equal(averaged, mine), name



def test_a_continued_unet_stage_keeps_the_text_encoder_it_was_trained_with_whatever_the_seed():
    """A continuation with another --seed once rebuilt the frozen random text encoder from that seed, so the
    captions and the empty prompt the UNet had learned changed under it half-way through training."""
    from emerdiff.toy_training import UNetTraining

    first = UNetTraining(0.5, seed=3)
    saved = first.text_encoder.half()  # the shipped folders are fp16
    module = UNetTraining(0.5, seed=0, init_unet=first.unet, init_text_encoder=saved)
    fresh = UNetTraining(0.5, seed=0).text_encoder
    for (name, mine), theirs in zip(module.text_encoder.state_dict().items(), saved.state_dict().values(), strict=True):
        assert mine.dtype == torch.float32 and torch.equal(mine, theirs.float()), name
    assert not all(torch.equal(a, b) for a, b in zip(module.text_encoder.state_dict().values(),
                                                    fresh.state_dict().values()))  # the seed's own differs

def test_a_finished_unet_stage_is_skipped_on_a_rerun_but_runs_again_when_continued_with_unet_from(tmp_path, monkeypatch):
    import json

    from emerdiff.cli import train_toy
    from emerdiff.toy_training import SceneBank

    ran = []
    monkeypatch.setattr(SceneBank, "load_or_draw", classmethod(lambda cls, count, cache: None))
    monkeypatch.setattr(train_toy, "train_unet", lambda args, scenes: ran.append(args.unet_from))
    (tmp_path / "training.json").write_text(json.dumps({"unet_minutes": 40.0}))
    assert train_toy.main(["--output", str(tmp_path), "--stages", "unet"]) == 0
    assert ran == []
    assert train_toy.main(["--output", str(tmp_path), "--stages", "unet", "--unet-from", str(tmp_path / "old")]) == 0
    assert ran == [tmp_path / "old"]


def test_the_decoder_stage_trains_the_decoder_alone_and_replaces_the_vae_of_the_written_pipeline(tmp_path):
    """The encoder, so the latent space a UNet was trained in, stays bit for bit; the decoder learns; the pipeline
    folder gets the new decoder in fp16."""
    from diffusers import AutoencoderKL

    from emerdiff.cli import train_toy
    from emerdiff.toy_training import VAETraining, half_copy

    VAETraining().vae.save_pretrained(tmp_path / "vae")
    half_copy(VAETraining().vae).save_pretrained(tmp_path / "sd" / "vae")
    before = AutoencoderKL.from_pretrained(tmp_path / "vae").state_dict()
    assert train_toy.main(["--output", str(tmp_path), "--scenes", "16", "--threads", "1"]
                          + ["--stages", "decoder", "--decoder-steps", "2"]) == 0
    after = AutoencoderKL.from_pretrained(tmp_path / "vae").state_dict()
    pipeline = AutoencoderKL.from_pretrained(tmp_path / "sd" / "vae").state_dict()
    fixed = [k for k in before if k.startswith(("encoder.", "quant_conv."))]
    learned = [k for k in before if k.startswith(("decoder.", "post_quant_conv."))]
    assert fixed and learned and len(fixed) + len(learned) == len(before)
    assert all(torch.equal(before[k], after[k]) for k in fixed)
    assert not all(torch.equal(before[k], after[k]) for k in learned)
    assert all(torch.equal(pipeline[k], after[k].half()) for k in before)


def test_the_decoder_stage_runs_by_default_is_left_out_by_zero_decoder_steps_and_cannot_be_asked_for_with_zero(
        tmp_path, monkeypatch, capsys):
    from emerdiff.cli import train_toy
    from emerdiff.toy_training import SceneBank

    ran = []
    monkeypatch.setattr(SceneBank, "load_or_draw", classmethod(lambda cls, count, cache: None))
    for stage in train_toy.STAGES:
        monkeypatch.setattr(train_toy, {"vae": "train_vae", "decoder": "tune_decoder", "unet": "train_unet",
                                        "control": "save_control", "clip": "train_clip"}[stage],
                            lambda *args, stage=stage: ran.append(stage))
    assert train_toy.main(["--output", str(tmp_path / "a")]) == 0
    assert ran == ["vae", "decoder", "unet", "control", "clip"]  # the shipped recipe
    ran.clear()
    assert train_toy.main(["--output", str(tmp_path / "b"), "--decoder-steps", "0"]) == 0
    assert ran == ["vae", "unet", "control", "clip"]
    with pytest.raises(SystemExit) as stop:
        train_toy.main(["--output", str(tmp_path / "c"), "--stages", "decoder", "--decoder-steps", "0"])
    assert stop.value.code == 2 and "--stages decoder needs --decoder-steps N above 0" in capsys.readouterr().err


def test_unet_restarts_outside_the_unet_run_are_refused(tmp_path, capsys):
    from emerdiff.cli import train_toy

    for steps in (["0"], ["100", "8000"]):
        with pytest.raises(SystemExit) as stop:
            train_toy.main(["--output", str(tmp_path), "--stages", "unet", "--unet-restarts", *steps])
        assert stop.value.code == 2
        assert "--unet-restarts steps must lie between 0 and --unet-steps (8000)" in capsys.readouterr().err
