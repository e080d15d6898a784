"""Try EmerDiff in the browser: a Gradio page to segment one photo (needs the demo extra: pip install -e ".[demo]").

    python tools/demo.py --cfg configs/tiny.yaml [--host 127.0.0.1] [--port 7860] [key=value ...]

The model loads once at start-up (any config: real weights on a GPU, or the miniature random model);
visitors choose K, lambda and an optional vocabulary per request. The page lives in emerdiff/demo.py;
this tool plugs ovseg's CLIP naming into it (unless --no-names). Serving beyond this machine: --host 0.0.0.0.
"""

from __future__ import annotations

import functools
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, List, Optional

from omegaconf import DictConfig

from emerdiff.cli.common import (base_parser, load_cli_config, parse_args,
                                random_model_notice, reported_errors)
from emerdiff.config import ConfigError

if TYPE_CHECKING:  # torch and Gradio load once the arguments are parsed, so --help answers at once
    from emerdiff.segmentor import SegmentationOutput

VOCAB_CACHE = 8  # vocabularies whose text embeddings stay in memory


def main(argv: Optional[List[str]] = None) -> int:
    """Parse the command line, load the model once, serve the page until interrupted."""
    parser = base_parser(__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=None, help="port (default: Gradio's, 7860 or the next free one)")
    parser.add_argument("--no-names", action="store_true", help="no vocabulary field: skip loading CLIP")
    args = parse_args(parser, argv)
    with reported_errors():
        cfg = load_cli_config(args)
        try:
            from emerdiff.demo import DemoSegmenter, serve
            import gradio  # noqa: F401  (the optional extra)
        except ImportError as exc:
            raise ConfigError(f"the demo needs Gradio ({exc}): pip install -e \".[demo]\"") from None
        notice = random_model_notice(cfg)
        if notice:
            print(notice)
        from emerdiff import EmerDiff

        model = EmerDiff.from_config(cfg)
        workdir = Path(tempfile.mkdtemp(prefix="emerdiff-demo-"))  # downloads, samples, text embeddings
        namer = None if args.no_names else clip_namer(cfg, model.device, workdir)
        segmenter = DemoSegmenter(model, namer=namer, workdir=workdir)
        print(f"model loaded; results are written under {workdir} (removed when the demo stops)")
        try:
            serve(segmenter, host=args.host, port=args.port, notice=notice)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


def clip_namer(cfg: DictConfig, device, workdir: Path):
    """ovseg's CLIP loaded once; per vocabulary a labeller on it (text embeddings cached on disk and in memory).

    The vocabulary a visitor types is a shipped name or a comma-separated list, never a file path (a web
    page must not read the server's files).
    """
    import numpy as np

    from emerdiff.demo import MaskClasses
    from ovseg import SHIPPED_VOCABS, read_vocabulary
    from ovseg.config import ovseg_settings
    from ovseg.pipeline import VocabularyLabellers, text_cache_folder

    settings = ovseg_settings(cfg)
    labellers = VocabularyLabellers(settings, text_cache_folder(settings, workdir), device)  # CLIP loads once

    @functools.lru_cache(maxsize=VOCAB_CACHE)
    def labeller(spec: str):
        vocab = read_vocabulary(spec) if spec in SHIPPED_VOCABS else read_vocabulary(spec.split(","))
        return labellers.labeller(vocab), vocab

    def name(photo: np.ndarray, output: SegmentationOutput, vocabulary: str) -> MaskClasses:
        model, vocab = labeller(",".join(part.strip() for part in vocabulary.split(",")))
        named = model(photo, output.labels, output.num_masks)
        return MaskClasses(vocab.names, named.class_ids.numpy(), named.scores.float().numpy())

    return name


if __name__ == "__main__":
    raise SystemExit(main())
