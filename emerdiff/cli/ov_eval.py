"""Open-vocabulary evaluation: MaskCLIP and MaskCLIP + EmerDiff masks on a labelled split, OUTPUT/ov/results.*.

    python tools/ov_eval.py --vocab ade150 --cfg configs/ov/ade150.yaml data.root=/data/ADEChallengeData2016 \\
        --output runs/ade20k

Results go to OUTPUT/ov/ (results.json, results.md), beside what tools/eval.py writes to OUTPUT.
EmerDiff's masks are read from OUTPUT/cache/<image id>.npz, tools/eval.py's cache, when an earlier run
left them there (same model, segmentor and data settings), and written there otherwise; the named
label maps are cached in OUTPUT/ov/cache/<image id>.npz. A rerun loads no model; --relabel names every
image again (another vocabulary or naming setting) on the cached masks; --overwrite segments and labels
every image again. Devices and strategy come from `trainer:`, e.g. trainer.devices=8
trainer.strategy=ddp. mIoU follows mmsegmentation's convention (as MaskCLIP, TCL and GroupViT) unless
eval.miou_convention says otherwise (docs/evaluation.md). Method, vocabularies and the paper's Table 3:
docs/open_vocabulary.md.
"""

from __future__ import annotations

import re
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

from omegaconf import DictConfig

from emerdiff.cli.common.arguments import (
    add_output_arguments,
    apply_output_arguments,
    base_parser,
    load_cli_config,
    output_lock,
    parse_args,
)
from emerdiff.cli.common.evaluation import evaluation_split, mask_prediction_settings, run_evaluation
from emerdiff.cli.common.messages import plural, random_model_notice, reported_errors
from emerdiff.cli.common.naming import naming_settings
from emerdiff.cli.common.trainer import build_segmentor, build_trainer, progress_bar
from emerdiff.config import ConfigError

if TYPE_CHECKING:  # torch, Lightning and open_clip load once the arguments are parsed, so --help answers at once
    from emerdiff.data import DatasetMetadata
    from emerdiff.evaluation import EvaluationData, PredictionCache
    from ovseg import Vocabulary


def main(argv: list[str] | None = None) -> int:
    """Parse the command line and evaluate; user errors exit with status 2 and a message."""
    parser = base_parser(__doc__.split("\n")[0])
    parser.add_argument("--vocab", help="shipped vocabulary name, .txt file or 'cat,dog,grass' (ovseg.vocab)")
    add_output_arguments(parser, "segment and label every image again")
    parser.add_argument(
        "--relabel",
        action="store_true",
        help="name every image again (e.g. with another vocabulary), reusing EmerDiff's cached masks",
    )
    args = parse_args(parser, argv)
    with reported_errors():
        cfg = load_cli_config(args)
        cfg.ovseg.vocab = args.vocab or cfg.ovseg.vocab
        apply_output_arguments(cfg, args)
        return evaluate(cfg, relabel=args.relabel)


def evaluate(cfg: DictConfig, relabel: bool = False) -> int:
    """Score plain MaskCLIP and MaskCLIP + EmerDiff on `data.dataset` with the classes of `ovseg.vocab`; `relabel`
    names every image again on the cached masks."""
    if not cfg.data.dataset or not cfg.data.root or not cfg.output.dir or not cfg.ovseg.vocab:
        raise ConfigError(
            "tell which vocabulary and split, where it is and where results go: "
            "--vocab NAME --cfg configs/ov/DATASET.yaml data.root=PATH --output DIR"
        )
    from emerdiff.evaluation import CACHE_DIR, PredictionCache, SaveResults
    from emerdiff.stopping import StopOnSignal
    from ovseg.evaluation import OV_DIR, PAPER_CONVENTION, OpenVocabEvaluation, OpenVocabPrediction, open_vocab_settings
    from ovseg.labeller import build_labeller, text_cache_folder

    out = Path(cfg.output.dir)
    results_dir = out / OV_DIR
    settings, vocab = naming_settings(cfg)
    metadata, data = evaluation_split(cfg)
    prediction = mask_prediction_settings(cfg)
    masks = PredictionCache(out / CACHE_DIR, prediction, overwrite=cfg.output.overwrite)
    labels = PredictionCache(
        results_dir / "cache",
        open_vocab_settings(prediction, settings, vocab),
        overwrite=cfg.output.overwrite or relabel,
        record=OpenVocabPrediction,
    )
    text_dir = text_cache_folder(settings, results_dir)
    try:
        module = OpenVocabEvaluation(
            partial(build_segmentor, cfg),
            partial(build_labeller, settings, vocab, text_dir),
            masks,
            labels,
            cfg.data.dataset,
            metadata,
            vocab,
            settings,
            convention=cfg.eval.miou_convention or PAPER_CONVENTION,
            max_repeated_failures=cfg.output.max_repeated_failures,
        )
    except ValueError as exc:  # vocabulary and split disagree on the classes
        raise ConfigError(str(exc)) from None
    callbacks = [SaveResults(results_dir), StopOnSignal(), *progress_bar(cfg.trainer)]
    trainer = build_trainer(
        cfg.trainer,
        callbacks=callbacks,
        enable_checkpointing=False,
        use_distributed_sampler=False,
        default_root_dir=str(out),
    )
    with output_lock(out, trainer.is_global_zero):  # OUTPUT, whose masks cache tools/eval.py shares
        check_caches(masks, labels)
        if trainer.is_global_zero:
            announce(cfg, data, masks, labels)
            warn_if_names_differ(vocab, metadata)
        return run_evaluation(trainer, module, data, results_dir)


def check_caches(masks: PredictionCache, labels: PredictionCache) -> None:
    """Refuse caches made with other settings before anything runs, with the cheapest way on: the masks do not depend
    on the vocabulary or the naming, so other labels only need --relabel, which keeps them."""
    stale_masks, stale_labels = masks.other_settings(), labels.other_settings()
    if stale_masks:
        raise ConfigError(
            f"{masks.folder} holds EmerDiff masks made with other settings ({stale_masks}): choose "
            "another --output, or pass --overwrite to segment and name every image again"
        )
    if stale_labels:
        raise ConfigError(
            f"{labels.folder} holds labels named with other settings ({stale_labels}): pass --relabel "
            f"to name the images again on the EmerDiff masks cached in {masks.folder} (no segmentation), "
            "or choose another --output"
        )


def announce(cfg: DictConfig, data: EvaluationData, masks: PredictionCache, labels: PredictionCache) -> None:
    """What the run will do, before it starts."""
    notice = random_model_notice(cfg)
    if notice:
        print(notice)
    if cfg.ovseg.clip_pretrained is None:
        print(
            f"note: ovseg.clip_pretrained=null builds CLIP {cfg.ovseg.clip_model} with random weights: its class "
            "names carry no meaning."
        )
    ids = data.image_ids()
    named, segmented = labels.count(ids), masks.count(ids)
    print(
        f"{plural(len(ids), 'image')} in {cfg.data.dataset}, vocabulary {cfg.ovseg.vocab}: {named} labelled in "
        f"{labels.folder}, {segmented} with EmerDiff masks in {masks.folder}"
    )


def warn_if_names_differ(vocab: Vocabulary, metadata: DatasetMetadata) -> None:
    """Scores compare ids, so a vocabulary listing other names than the dataset's classes is worth a warning."""
    from pytorch_lightning.utilities import rank_zero_warn

    differ = [
        (i, ours, theirs)
        for i, (ours, theirs) in enumerate(zip(vocab.names, metadata.classes, strict=False))
        if _plain(ours) != _plain(theirs)
    ]
    if differ:
        examples = ", ".join(f"{i}: {ours!r} vs {theirs!r}" for i, ours, theirs in differ[:3])
        rank_zero_warn(
            f"{len(differ)} vocabulary names differ from {metadata.name}'s class names at the same id "
            f"({examples}); mIoU compares ids, so check that the vocabulary is in the dataset's id order"
        )


def _plain(name: str) -> str:
    """Lower-case letters and digits only, so 'tv monitor' matches 'tvmonitor'."""
    return re.sub(r"[^a-z0-9]", "", name.lower())


if __name__ == "__main__":
    raise SystemExit(main())
