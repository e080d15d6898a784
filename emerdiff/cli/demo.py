"""Try EmerDiff in the browser: a Gradio page to segment one photo (needs the demo extra: pip install -e ".[demo]").

    python tools/demo.py --cfg configs/tiny.yaml [--host 127.0.0.1] [--port 7860] [key=value ...]
    python tools/demo.py --cfg toy         # the toy world's trained miniature model, with toy-world scenes to click

The model loads once at start-up (any config: real weights on a GPU, the toy world's miniature model, or the
miniature random model); visitors choose K, lambda and an optional vocabulary per request. The page lives in
emerdiff/app/demo/; this command names masks with ovseg's CLIP (unless --no-names). Serving beyond this
machine: --host 0.0.0.0.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from omegaconf import DictConfig

from emerdiff.cli.common.arguments import base_parser, load_cli_config, parse_args
from emerdiff.cli.common.messages import random_model_notice, reported_errors, toy_model_notice
from emerdiff.config import ConfigError

if TYPE_CHECKING:  # Gradio loads only after the arguments are parsed
    from emerdiff.app.demo.page import ModelNotes


def page_notes(cfg: DictConfig) -> ModelNotes:
    """What the page says about the configured model and the samples it offers: random weights (scikit-image's
    photos), the toy world's miniature model (toy-world scenes, the toyworld vocabulary), or real weights."""
    from emerdiff.app.demo.page import ModelNotes

    random_notice, toy_notice = random_model_notice(cfg), toy_model_notice(cfg)
    if random_notice:
        return ModelNotes.random_weights(random_notice)
    return ModelNotes.toy(toy_notice) if toy_notice else ModelNotes()


def main(argv: list[str] | None = None) -> int:
    """Parse the command line, load the model once, serve the page until interrupted."""
    parser = base_parser(__doc__.split("\n")[0])
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)"
    )
    parser.add_argument("--port", type=int, default=None, help="port (default: Gradio's, 7860 or the next free one)")
    parser.add_argument("--no-names", action="store_true", help="no vocabulary field: skip loading CLIP")
    args = parse_args(parser, argv)
    with reported_errors():
        cfg = load_cli_config(args)
        try:
            import gradio  # noqa: F401  (the optional extra)

            from emerdiff.app.demo.page import serve
            from emerdiff.app.demo.segmenter import DemoSegmenter
        except ImportError as exc:
            raise ConfigError(f'the demo needs Gradio ({exc}): pip install -e ".[demo]"') from None
        notes = page_notes(cfg)
        if notes.notice:
            print(notes.notice)
        from emerdiff import EmerDiff

        model = EmerDiff.from_config(cfg)
        workdir = Path(tempfile.mkdtemp(prefix="emerdiff-demo-"))  # downloads, samples, text embeddings
        naming = None
        if not args.no_names:
            from ovseg.any_vocab import AnyVocabulary
            from ovseg.config import ovseg_settings

            naming = AnyVocabulary(ovseg_settings(cfg), workdir, model.device)  # CLIP loads once
        segmenter = DemoSegmenter(model, naming=naming, workdir=workdir)
        print(f"model loaded; results are written under {workdir} (removed when the demo stops)")
        try:
            serve(segmenter, host=args.host, port=args.port, notes=notes)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
