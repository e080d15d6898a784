"""Open-vocabulary naming of EmerDiff masks with dense CLIP (MaskCLIP) embeddings."""

from .dense_encoder import TINY_MODEL, DenseEncoder, LoadedClip, MaskCLIPEncoder, load_clip, register_model_configs
from .labeller import UNLABELLED, MaskLabels, label_masks, maskclip_labels
from .text import IMAGENET_TEMPLATES, MASKCLIP_TEMPLATES, cached_text_embeddings, text_embeddings
from .vocab import SHIPPED_VOCABS, Vocabulary, load_vocab, read_vocabulary

__all__ = [
    "IMAGENET_TEMPLATES",
    "MASKCLIP_TEMPLATES",
    "SHIPPED_VOCABS",
    "TINY_MODEL",
    "UNLABELLED",
    "DenseEncoder",
    "LoadedClip",
    "MaskCLIPEncoder",
    "MaskLabels",
    "Vocabulary",
    "cached_text_embeddings",
    "label_masks",
    "load_clip",
    "load_vocab",
    "maskclip_labels",
    "read_vocabulary",
    "register_model_configs",
    "text_embeddings",
]
