"""Open-vocabulary naming of EmerDiff masks with dense CLIP embeddings (MaskCLIP, TCL).

Names are imported on first use (PEP 562), so `import ovseg.config` or `ovseg.vocab` stays light:
open_clip is loaded only by what needs a CLIP model.
"""

from emerdiff.lazy import lazy_exports

_EXPORTS = {
    "TINY_MODEL": "clip_model",
    "LoadedClip": "clip_model",
    "load_clip": "clip_model",
    "register_model_configs": "clip_model",
    "DenseEncoder": "dense_encoder",
    "MaskCLIPEncoder": "dense_encoder",
    "UNLABELLED": "naming",
    "MaskLabels": "naming",
    "label_masks": "naming",
    "maskclip_labels": "naming",
    "IMAGENET_TEMPLATES": "text",
    "MASKCLIP_TEMPLATES": "text",
    "cached_text_embeddings": "text",
    "text_embeddings": "text",
    "SHIPPED_VOCABS": "vocab",
    "Vocabulary": "vocab",
    "load_vocab": "vocab",
    "read_vocabulary": "vocab",
}

__all__ = sorted(_EXPORTS)

__getattr__ = lazy_exports(__name__, _EXPORTS)
