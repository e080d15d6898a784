"""Typed configuration: the dataclasses below are the schema and the defaults.

`configs/base.yaml` is the commented copy of these defaults (a test keeps the two
equal). YAML files and ``key=value`` overrides are merged onto the schema in
strict mode, so a misspelt key is an error that names it.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException


@dataclass
class ModelConfig:
    """Where the Stable Diffusion weights come from and where they run."""

    pretrained: str = "stable-diffusion-v1-5/stable-diffusion-v1-5"
    dtype: str = "auto"  # auto = float16 on CUDA, float32 on CPU
    device: str = "auto"  # auto = cuda if available else cpu
    revision: Optional[str] = None
    variant: Optional[str] = None  # e.g. fp16 for the hub's half-precision files
    config: Optional[str] = None  # diffusers config (hub id or folder) for single-file checkpoints
    local_files_only: bool = False
    random_init: bool = False  # build `arch` with random weights (benchmarks, no download)
    arch: str = "sd15"  # architecture for random_init: tiny, sd15, sd21_base
    init_seed: int = 0  # seed of the random weights of tiny / random_init models


@dataclass
class SegmentorConfig:
    """Every knob of the EmerDiff pipeline (SPEC steps 1-11)."""

    resolution: int = 512  # square working resolution of SD (step 1)
    num_masks: int = 25  # K, an upper bound: empty clusters are dropped (step 5)
    lam: float = 10.0  # lambda, modulation strength (step 8)
    t_feature: int = 1  # timestep of the k-means feature pass (step 4)
    feature_noise_draws: int = 1  # queries averaged over this many noise draws (step 4)
    feature_layer: str = "up_blocks.1.attentions.0.transformer_blocks.0.attn2"
    t_modulate: int = 281  # t_m, first modulated step; must lie on the scheduler grid (step 6)
    num_inference_steps: int = 50  # scheduler grid over 1000 training steps (step 6)
    num_modulated_steps: int = 1  # steps from t_m on that receive the offset (step 8)
    modulated_layer: str = "up_blocks.1.attentions.2.transformer_blocks.0.attn2"
    offset_placement: str = "output"  # output: to_out(PV) + cM; value: to_out(PV + cM)
    attention_injection: bool = True  # reuse the unmodulated run's Q/K everywhere (step 8)
    gaussian_sigma: float = 1.0  # pixels at the working resolution; 0 disables (step 10)
    interpolation: str = "bicubic"  # resize filter of the input image: bicubic or bilinear
    kmeans_restarts: int = 5  # faiss nredo: best objective kept (step 5)
    kmeans_iters: int = 50
    kmeans_device: str = "auto"  # auto = faiss GPU index when faiss sees a GPU
    chunk_size: int = 0  # (mask, sign) variants per UNet batch; 0 = all at once
    memory_budget_gb: float = 16.0  # GiB of activations per image beyond the weights; chunks are sized to fit
    impl: str = "fast"  # fast (shared prefix, shared attention) or reference (one variant at a time)
    channels_last: bool = False  # UNet/VAE convolutions in channels_last memory format (same results)
    compile: bool = False  # torch.compile the UNet/VAE ResNet blocks and feed-forward layers (same results)
    compile_backend: str = "inductor"  # torch.compile backend (torch._dynamo.list_backends)
    compile_mode: Optional[str] = None  # torch.compile mode, e.g. max-autotune; null = torch's default
    denoise_steps: int = 0  # trade-off: steps from t_m to the end, evenly spaced; 0 = every grid step
    min_mask_fraction: float = 0.0  # trade-off: masks below this share of the grid are not modulated
    decode_resolution: int = 0  # trade-off: decode the variants at this square size; 0 = resolution
    keep_diff_maps: bool = False  # return the K difference maps at the input size
    seed: int = 0  # mixed with the image content into the per-image seed


@dataclass
class DataConfig:
    """Which images are read and how (prediction inputs and evaluation datasets)."""

    input: Optional[str] = None  # prediction input: image file, folder (recursive), glob, or .txt list of paths
    dataset: Optional[str] = None  # registered evaluation split, e.g. voc2012_val (emerdiff.data.registry)
    root: Optional[str] = None  # dataset root in its standard layout
    size: Optional[int] = None  # evaluation: resize the shorter side and centre-crop; null = full image
    image_list: Optional[str] = None  # evaluation: text file of image ids restricting a COCO-Stuff split
    num_workers: int = 2  # DataLoader workers


@dataclass
class OutputConfig:
    """Where and how results are written."""

    dir: Optional[str] = None
    overwrite: bool = False  # redo images whose outputs already exist
    overlay: bool = True  # write NAME_overlay.jpg (mask colours and boundaries over the photo)
    figure: bool = False  # write NAME_figure.png: photo | k-means masks | bilinear | EmerDiff
    overlay_alpha: float = 0.5  # opacity of the mask colours in overlays and figures
    jpeg_quality: int = 90  # quality of NAME_overlay.jpg


@dataclass
class EvalConfig:
    """Unsupervised evaluation protocols (SPEC "Evaluation protocols", docs/evaluation.md)."""

    protocols: List[str] = field(
        default_factory=lambda: ["hungarian", "dataset", "concept_image", "concept_dataset"]
    )  # also "majority": per-image many-to-one matching
    match_criterion: str = "iou"  # per-image Hungarian maximises summed IoU, or pixel overlap ("overlap")
    dataset_clusters: Optional[int] = None  # k-means clusters of the dataset-level protocol; null = classes
    kmeans_seed: int = 0  # dataset-level faiss k-means
    kmeans_restarts: int = 5
    kmeans_iters: int = 50
    kmeans_l2_normalize: bool = False  # spherical k-means on L2-normalised mask embeddings
    paper_miou: Dict[str, Dict[str, float]] = field(default_factory=dict)  # protocol -> method -> paper's mIoU
    paper_note: Optional[str] = None  # context printed under the results table


@dataclass
class OVSegConfig:
    """Open-vocabulary naming of EmerDiff masks with dense CLIP (SPEC "Open-vocabulary extension", ovseg)."""

    vocab: Optional[str] = None  # shipped name (coco, ade150, ...), a .txt file, or "cat,dog,grass"
    clip_model: str = "ViT-B-16"  # open_clip architecture; ovseg-tiny = tiny test model
    clip_pretrained: Optional[str] = "openai"  # open_clip tag or checkpoint file; null = random weights
    clip_init_seed: int = 0  # seed of the random weights when clip_pretrained is null
    clip_cache_dir: Optional[str] = None  # where open_clip looks for weights; null = its default cache
    encoder: str = "maskclip"  # dense encoder (ovseg.pipeline.ENCODERS)
    window: Optional[int] = None  # sliding-window size in pixels; null = the model's input size
    window_stride: Optional[int] = None  # window step in pixels; null = half a window
    keep_residual: bool = True  # MaskCLIP's last block keeps residual + MLP; false = bare value path
    templates: str = "maskclip"  # prompt templates: maskclip (85) or imagenet (80)
    background_threshold: Optional[float] = None  # masks below this cosine become background; null = off
    text_cache_dir: Optional[str] = None  # class text embeddings cache; null = OUTPUT/ov/text_embeddings
    paper_miou: Dict[str, float] = field(default_factory=dict)  # method (maskclip, emerdiff) -> paper's mIoU
    paper_reference: Dict[str, float] = field(default_factory=dict)  # paper rows we do not run -> mIoU
    paper_note: Optional[str] = None  # context printed under the results table


@dataclass
class EmerDiffConfig:
    """The whole configuration tree; `trainer` goes to Lightning's Trainer unchanged."""

    model: ModelConfig = field(default_factory=ModelConfig)
    segmentor: SegmentorConfig = field(default_factory=SegmentorConfig)
    data: DataConfig = field(default_factory=DataConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    ovseg: OVSegConfig = field(default_factory=OVSegConfig)
    trainer: Dict[str, Any] = field(
        default_factory=lambda: {"accelerator": "auto", "devices": 1, "precision": "32-true"}
    )


# Settings that decide where or how fast results are computed, or what is printed beside them, never the
# results: finished outputs (tools/predict.py) and caches (tools/eval.py, tools/ov_eval.py) stay valid.
RUN_ONLY_KEYS = frozenset({
    "model.device", "model.local_files_only",
    "segmentor.chunk_size", "segmentor.memory_budget_gb", "segmentor.channels_last",
    "segmentor.compile", "segmentor.compile_backend", "segmentor.compile_mode",
    "ovseg.clip_cache_dir", "ovseg.text_cache_dir", "ovseg.paper_miou", "ovseg.paper_reference", "ovseg.paper_note",
})


def result_settings(section: str, values: Mapping[str, Any]) -> Dict[str, Any]:
    """The settings of one config section that can change results (`RUN_ONLY_KEYS` left out)."""
    return {k: v for k, v in values.items() if f"{section}.{k}" not in RUN_ONLY_KEYS}


class ConfigError(ValueError):
    """A configuration file or override that does not fit the schema."""


PathLike = Union[str, Path]


def _valid_keys(node: DictConfig, prefix: str) -> List[str]:
    keys = []
    for key, value in node.items_ex(resolve=False):
        full = f"{prefix}{key}"
        keys.append(full)
        if isinstance(value, DictConfig) and OmegaConf.is_struct(value):
            keys.extend(_valid_keys(value, full + "."))
    return keys


def _unknown_key_error(schema: DictConfig, exc: ConfigKeyError, source: str) -> ConfigError:
    full_key = exc.full_key or str(exc.key)
    candidates = _valid_keys(schema, "")
    close = difflib.get_close_matches(full_key, candidates, n=3)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    parent = full_key.rsplit(".", 1)[0] if "." in full_key else ""
    siblings = [c for c in candidates if c.rsplit(".", 1)[0] == parent and "." in c] if parent else []
    listing = f" Valid keys under '{parent}': {', '.join(siblings)}." if siblings else ""
    return ConfigError(f"unknown config key '{full_key}' in {source}.{hint}{listing}")


def schema() -> DictConfig:
    """The default configuration in strict mode (unknown keys raise)."""
    cfg = OmegaConf.structured(EmerDiffConfig)
    OmegaConf.set_struct(cfg, True)
    _open_dict_fields(cfg)  # any Trainer argument (the tools check the names against Trainer), paper tables
    return cfg


def _open_dict_fields(node: DictConfig) -> None:
    """Let ``Dict``-typed fields (trainer, paper numbers) take any key; dataclass sections stay strict."""
    for key in node:
        child = node[key]
        if isinstance(child, DictConfig):
            if OmegaConf.get_type(child) is dict:
                OmegaConf.set_struct(child, False)
            else:
                _open_dict_fields(child)


def load_config(*paths: Union[PathLike, Sequence[PathLike]], overrides: Sequence[str] = ()) -> DictConfig:
    """Merge YAML files (later ones win) and then ``key=value`` overrides onto the defaults.

    >>> cfg = load_config("configs/tiny.yaml", overrides=["segmentor.num_masks=8"])
    """
    flat: List[PathLike] = []
    for item in paths:
        flat.extend([item] if isinstance(item, (str, Path)) else list(item))
    cfg = schema()
    for path in flat:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file '{path}' does not exist (looked in {path.resolve()})")
        cfg = _merge(cfg, OmegaConf.load(path), f"'{path}'")
    if overrides:
        bad = [o for o in overrides if "=" not in o]
        if bad:
            raise ConfigError(f"overrides must look like key=value, got {bad}")
        cfg = _merge(cfg, OmegaConf.from_dotlist(list(overrides)), "the command-line overrides")
    return cfg


def _merge(cfg: DictConfig, other: Any, source: str) -> DictConfig:
    try:
        return OmegaConf.merge(cfg, other)
    except ConfigKeyError as exc:
        raise _unknown_key_error(cfg, exc, source) from None
    except OmegaConfBaseException as exc:
        raise ConfigError(f"invalid value in {source}: {exc}") from None


def to_dataclass(node: DictConfig, cls: type) -> Any:
    """Turn one config section into its dataclass (the library boundary)."""
    if isinstance(node, cls):
        return node
    return cls(**OmegaConf.to_container(node, resolve=True))
