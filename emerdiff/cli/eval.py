"""Evaluate EmerDiff on a labelled split under every unsupervised protocol: OUTPUT/results.json and results.md.

    python tools/eval.py --cfg configs/eval/ade20k.yaml data.root=/data/ADEChallengeData2016 --output runs/ade20k

Predictions are cached in OUTPUT/cache/<image id>.npz: rerunning re-scores without loading the model
and a killed run resumes (--overwrite predicts every image again). Devices and strategy come from
`trainer:`, e.g. trainer.devices=8 trainer.strategy=ddp. Protocols, datasets, paper numbers:
docs/evaluation.md.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

from omegaconf import DictConfig, OmegaConf

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
from emerdiff.cli.common.trainer import build_segmentor, build_trainer, progress_bar
from emerdiff.config import ConfigError

if TYPE_CHECKING:  # torch and Lightning load once the arguments are parsed, so --help answers at once
    from emerdiff.evaluation import EvaluationData, PredictionCache


def main(argv: list[str] | None = None) -> int:
    """Parse the command line and evaluate; user errors exit with status 2 and a message."""
    parser = base_parser(__doc__.split("\n")[0])
    add_output_arguments(parser, "predict every image again")
    args = parse_args(parser, argv)
    with reported_errors():
        cfg = load_cli_config(args)
        apply_output_arguments(cfg, args)
        return evaluate(cfg)


def evaluate(cfg: DictConfig) -> int:
    """Score `data.dataset` under `eval.protocols`, predicting only images missing from the cache."""
    if not cfg.data.dataset or not cfg.data.root or not cfg.output.dir:
        raise ConfigError(
            "tell which split, where it is and where results go: "
            "--cfg configs/eval/DATASET.yaml data.root=PATH --output DIR"
        )
    from emerdiff.evaluation import CACHE_DIR, CachedEvaluation, PredictionCache, SaveResults, UnsupervisedEvaluator
    from emerdiff.stopping import StopOnSignal

    out = Path(cfg.output.dir)
    prediction = mask_prediction_settings(cfg)
    cache = PredictionCache(out / CACHE_DIR, prediction, overwrite=cfg.output.overwrite)
    metadata, data = evaluation_split(cfg)
    try:
        evaluator = UnsupervisedEvaluator(cfg.data.dataset, metadata, OmegaConf.to_object(cfg.eval), prediction)
    except ValueError as exc:  # a bad eval setting
        raise ConfigError(str(exc)) from None
    module = CachedEvaluation(
        partial(build_segmentor, cfg),
        cache,
        evaluators=[evaluator],
        max_repeated_failures=cfg.output.max_repeated_failures,
    )
    trainer = build_trainer(
        cfg.trainer,
        callbacks=[SaveResults(out), StopOnSignal(), *progress_bar(cfg.trainer)],
        enable_checkpointing=False,
        use_distributed_sampler=False,
        default_root_dir=str(out),
    )
    with output_lock(out, trainer.is_global_zero):  # a second run into the folder waits, then reuses the cache
        if trainer.is_global_zero:
            announce(cfg, data, cache)
        return run_evaluation(trainer, module, data, out)


def announce(cfg: DictConfig, data: EvaluationData, cache: PredictionCache) -> None:
    """What the run will do, before it starts."""
    notice = random_model_notice(cfg)
    if notice:
        print(notice)
    ids = data.image_ids()
    cached = cache.count(ids)
    print(
        f"{plural(len(ids), 'image')} in {cfg.data.dataset}: {cached} cached in {cache.folder}, "
        f"{len(ids) - cached} to predict"
    )


if __name__ == "__main__":
    raise SystemExit(main())
