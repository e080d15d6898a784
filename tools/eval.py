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
from typing import List, Optional

from _common import (add_output_arguments, apply_output_arguments, base_parser,  # first: finds the checkout
                     build_segmentor, build_trainer, load_cli_config,
                     parse_args, random_model_notice, reported_errors)
from omegaconf import DictConfig, OmegaConf

from emerdiff import ConfigError
from emerdiff.data import dataset_metadata
from emerdiff.evaluation import (CACHE_DIR, EvaluationData, EvaluationModule, PredictionCache, ResultsWriter,
                                 prediction_settings, run_and_report)
from emerdiff.stopping import StopOnSignal


def main(argv: Optional[List[str]] = None) -> int:
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
        raise ConfigError("tell which split, where it is and where results go: "
                          "--cfg configs/eval/DATASET.yaml data.root=PATH --output DIR")
    out = Path(cfg.output.dir)
    cache = PredictionCache(out / CACHE_DIR, prediction_settings(
        OmegaConf.to_object(cfg.model), OmegaConf.to_object(cfg.segmentor), cfg.data.dataset, cfg.data.size,
        cfg.eval.crop),
        overwrite=cfg.output.overwrite)
    try:
        data = EvaluationData(cfg.data.dataset, cfg.data.root, cfg.data.size, cfg.data.image_list,
                              cfg.data.num_workers, crop=cfg.eval.crop)
        module = EvaluationModule(partial(build_segmentor, cfg), cache, cfg.data.dataset,
                                  dataset_metadata(cfg.data.dataset), OmegaConf.to_object(cfg.eval),
                                  max_repeated_failures=cfg.output.max_repeated_failures)
    except ValueError as exc:  # unknown split, image list on a split without one
        raise ConfigError(str(exc)) from None
    trainer = build_trainer(cfg.trainer, callbacks=[ResultsWriter(out), StopOnSignal()], logger=False,
                            enable_checkpointing=False,
                            use_distributed_sampler=False, default_root_dir=str(out))
    if trainer.is_global_zero:
        announce(cfg, data, cache)
    return run_and_report(trainer, module, data, out)


def announce(cfg: DictConfig, data: EvaluationData, cache: PredictionCache) -> None:
    """What the run will do, before it starts."""
    notice = random_model_notice(cfg)
    if notice:
        print(notice)
    ids = data.image_ids()
    cached = cache.count(ids)
    print(f"{len(ids)} images in {cfg.data.dataset}: {cached} cached in {cache.folder}, {len(ids) - cached} to predict")


if __name__ == "__main__":
    raise SystemExit(main())
