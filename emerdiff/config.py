"""Typed configuration: the dataclasses below are the schema, the defaults and the rules.

`configs/base.yaml` is the commented copy of these defaults (a test keeps the two equal). YAML
files and ``key=value`` overrides are merged onto the schema in strict mode, so a misspelt key is
an error that names it; every choice and bound a field declares (`setting`) is checked when the
config is loaded, before anything is built. Whether a key can change results is stated once, next
to its field (``run_only=True``: where or how fast results are computed, never what they are).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar, cast

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from .choices import CROPS, INTERPOLATIONS, MIOU_CONVENTIONS, PROTOCOLS

IMPLS = ("fast", "reference")  # segmentor.impl
PLACEMENTS = ("output", "value")  # segmentor.offset_placement
ASPECTS = ("keep", "square")  # segmentor.aspect
DTYPES = ("auto", "float32", "float16", "bfloat16")  # model.dtype: auto, or the name of a torch dtype
KMEANS_DEVICES = ("auto", "cpu", "gpu")  # segmentor.kmeans_device
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")  # segmentor.timestep_spacing: diffusers' names
DIFFERENCE_SPACES = ("pixel", "latent")  # segmentor.difference_space
MATCH_CRITERIA = ("iou", "overlap")  # eval.match_criterion
SHIPPED_CONFIGS = Path(__file__).resolve().parent / "configs"  # the repository's configs/, installed with the package


def setting(
    default: Any = dataclasses.MISSING,
    *,
    factory: Any = dataclasses.MISSING,
    choices: Iterable[Any] | None = None,
    numbers: bool = False,
    minimum: float | None = None,
    maximum: float | None = None,
    multiple_of: int | None = None,
    run_only: bool = False,
    before: Any = dataclasses.MISSING,
) -> Any:
    """A config field with its rules: valid `choices` (each item, for a list; with `numbers`, any number is valid
    too), a `minimum` and `maximum`, a `multiple_of` (0 allowed), whether it is `run_only` (cannot change results,
    so caches and results folders stay valid), and for a key added later the value that behaviour had `before` it
    existed (that value is left out of the result settings, so caches and folders made before the key stay valid)."""
    rules = {
        "choices": tuple(choices) if choices is not None else None,
        "numbers": numbers,
        "minimum": minimum,
        "maximum": maximum,
        "multiple_of": multiple_of,
        "run_only": run_only,
        "before": before,
    }
    if factory is not dataclasses.MISSING:
        return field(default_factory=factory, metadata=rules)
    return field(default=default, metadata=rules)


@dataclass
class ModelConfig:
    """Where the Stable Diffusion weights come from and where they run."""

    pretrained: str = "stable-diffusion-v1-5/stable-diffusion-v1-5"
    dtype: str = setting("auto", choices=DTYPES)  # auto = float16 on CUDA, float32 on CPU
    device: str = setting("auto", run_only=True)  # auto = cuda if available else cpu
    revision: str | None = None
    variant: str | None = None  # e.g. fp16 for the hub's half-precision files
    config: str | None = None  # diffusers config (hub id or folder) for single-file checkpoints
    vae: str | None = setting(None, before=None)  # VAE (hub id / folder) replacing the checkpoint's (SDXL fp16 fix)
    local_files_only: bool = setting(False, run_only=True)
    random_init: bool = False  # build `arch` with random weights (benchmarks, no download)
    arch: str = "sd15"  # architecture for random_init: tiny, tiny_sdxl, sd15, sd21_base, sdxl
    init_seed: int = 0  # seed of the random weights of tiny / random_init models
    cpu_threads: int | None = setting(None, minimum=1, run_only=True)  # torch CPU threads; None = OMP_NUM_THREADS,
    #   else the usable cores shared among this machine's processes of the run


@dataclass
class SegmentorConfig:
    """Every knob of the EmerDiff pipeline (steps 1-11)."""

    resolution: int = setting(512, minimum=64, multiple_of=64)  # SD's working resolution: the shorter side (step 1)
    aspect: str = setting("keep", choices=ASPECTS, before="square")  # keep: shorter side at resolution; square: R x R
    max_pixels: int | None = setting(None, minimum=4096, before=None)  # aspect=keep: cap on h x w; null = 2 R^2
    num_masks: int = setting(25, minimum=1)  # K, an upper bound: empty clusters are dropped (step 5)
    lam: float = 10.0  # lambda, modulation strength (step 8)
    t_feature: int = setting(1, minimum=0)  # timestep of the k-means feature pass (step 4)
    feature_noise_draws: int = setting(1, minimum=1)  # queries averaged over this many noise draws (step 4)
    feature_layer: str = "up_blocks.1.attentions.0.transformer_blocks.0.attn2"
    t_modulate: int = 281  # t_m, first modulated step; must lie on the scheduler grid (step 6)
    num_inference_steps: int = setting(50, minimum=1)  # scheduler grid over 1000 training steps (step 6)
    timestep_spacing: str | None = setting(None, choices=TIMESTEP_SPACINGS, before=None)  # grid spacing; null =
    #   the scheduler config's (SD: leading); trailing = the Turbo models' few-step grid (999, 749, 499, 249)
    num_modulated_steps: int = setting(1, minimum=1)  # steps from t_m on that receive the offset (step 8)
    modulated_layer: str = "up_blocks.1.attentions.2.transformer_blocks.0.attn2"
    offset_placement: str = setting("output", choices=PLACEMENTS)  # output: to_out(PV) + cM; value: to_out(PV + cM)
    attention_injection: bool = True  # reuse the unmodulated run's Q/K everywhere (step 8)
    gaussian_sigma: float = setting(1.0, minimum=0)  # pixels at the working resolution; 0 disables (step 10)
    interpolation: str = setting("bicubic", choices=INTERPOLATIONS)  # input image's resize filter: bicubic or bilinear
    kmeans_restarts: int = setting(5, minimum=1)  # faiss nredo: best objective kept (step 5)
    kmeans_iters: int = setting(50, minimum=1)
    kmeans_device: str = setting("auto", choices=KMEANS_DEVICES)  # auto = faiss GPU index when faiss sees a GPU
    chunk_size: int = setting(0, minimum=0, run_only=True)  # (mask, sign) variants per UNet batch; 0 = all at once
    memory_budget_gb: int | float | str = setting(
        "auto", choices=("auto",), numbers=True, minimum=0, run_only=True
    )  # GiB of activations; auto = free memory - margin
    impl: str = setting("fast", choices=IMPLS)  # fast (shared prefix and attention) or reference (one variant per pass)
    channels_last: bool = setting(False, run_only=True)  # UNet/VAE convolutions in channels_last (same results)
    compile: bool = setting(False, run_only=True)  # torch.compile UNet/VAE ResNets and feed-forwards (same results)
    compile_backend: str = setting("inductor", run_only=True)  # torch.compile backend (torch._dynamo.list_backends)
    compile_mode: str | None = setting(None, run_only=True)  # torch.compile mode (max-autotune, ...); null = torch's
    denoise_steps: int = setting(0, minimum=0)  # trade-off: steps from t_m on, evenly spaced; 0 = every grid step
    min_mask_fraction: float = setting(0.0, minimum=0)  # trade-off: masks below this grid share are not modulated
    decode_resolution: int = setting(0, minimum=0, multiple_of=8)  # trade-off: decoded shorter side; 0 = resolution
    difference_space: str = setting("pixel", choices=DIFFERENCE_SPACES, before="pixel")  # approximation: latent =
    #   distance of the final latents (4 channels), upsampled and smoothed, no VAE decode of the variants (step 9)
    one_step_estimate: bool = setting(False, before=False)  # approximation: z0 predicted from the modulated step's
    #   noise estimate (DDIM's x0 formula), one UNet call per variant instead of denoising every step (step 8)
    keep_diff_maps: bool = False  # return the K difference maps at the input size
    seed: int = 0  # mixed with the image content into the per-image seed


@dataclass
class DataConfig:
    """Which images are read and how (prediction inputs and evaluation datasets)."""

    input: str | None = None  # prediction input: image file, folder (recursive), glob, or .txt list of paths
    dataset: str | None = None  # registered evaluation split, e.g. voc2012_val, or folder (emerdiff.data.registry)
    root: str | None = None  # dataset root in its standard layout
    size: int | None = None  # evaluation: resize the shorter side and centre-crop; null = full image
    image_list: str | None = None  # evaluation: text file of image ids restricting a COCO-Stuff split
    reduce_zero_label: bool = False  # folder dataset: label 0 = ignore, 1..C = the classes (mmsegmentation's option)
    num_workers: int = setting(2, minimum=0)  # DataLoader workers


@dataclass
class OutputConfig:
    """Where and how results are written."""

    dir: str | None = None
    overwrite: bool = False  # redo images whose outputs already exist
    overlay: bool = True  # write NAME_overlay.jpg (mask colours and boundaries over the photo)
    figure: bool = False  # write NAME_figure.png: photo | k-means masks | bilinear | EmerDiff
    overlay_alpha: float = setting(0.5, minimum=0.0, maximum=1.0)  # opacity of the mask colours in overlays and figures
    jpeg_quality: int = setting(90, minimum=1)
    max_repeated_failures: int = setting(5, minimum=0, run_only=True)  # stop when this many images in a row fail
    #   with the same error (a broken setup, not a bad image); 0 = never  # quality of NAME_overlay.jpg


@dataclass
class EvalConfig:
    """Unsupervised evaluation protocols (docs/evaluation.md)."""

    protocols: list[str] = setting(
        factory=lambda: ["hungarian", "dataset", "concept_image", "concept_dataset"], choices=PROTOCOLS
    )  # also "majority": per-image many-to-one matching
    match_criterion: str = setting("iou", choices=MATCH_CRITERIA)  # per-image Hungarian: summed IoU, or pixel "overlap"
    dataset_clusters: int | None = setting(None, minimum=1)  # dataset-level k-means clusters; null = classes
    kmeans_seed: int = 0  # dataset-level faiss k-means
    kmeans_restarts: int = setting(5, minimum=1)
    kmeans_iters: int = setting(50, minimum=1)
    kmeans_l2_normalize: bool = False  # spherical k-means on L2-normalised mask embeddings
    # the classes mIoU averages; null = each protocol's paper (docs/evaluation.md)
    miou_convention: str | None = setting(None, choices=MIOU_CONVENTIONS)
    # center: the data.size x data.size central square; none: the whole image, shorter side data.size
    crop: str = setting("center", choices=CROPS, before="center")
    paper_miou: dict[str, dict[str, float]] = setting(factory=dict, run_only=True)  # protocol -> method -> paper's mIoU
    paper_note: str | None = setting(None, run_only=True)  # context printed under the results table


@dataclass
class EmerDiffConfig:
    """The whole configuration tree; `trainer` goes to Lightning's Trainer unchanged."""

    model: ModelConfig = field(default_factory=ModelConfig)
    segmentor: SegmentorConfig = field(default_factory=SegmentorConfig)
    data: DataConfig = field(default_factory=DataConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    ovseg: dict[str, Any] = field(default_factory=dict)  # the ovseg package's settings, checked by ovseg.config
    trainer: dict[str, Any] = field(
        default_factory=lambda: {"accelerator": "auto", "devices": 1, "precision": "32-true"}
    )


class UserError(Exception):
    """A mistake of the user's (a setting, a path, an input, missing weights): the tools print its message as one
    `error:` line and exit with status 2, without a traceback."""


class ConfigError(UserError, ValueError):
    """A configuration file or override that does not fit the schema."""


class WeightsNotFoundError(UserError, FileNotFoundError):
    """Model weights (Stable Diffusion, CLIP) could not be found or loaded; the message says how to provide them.

    Defined here, with the other user errors, so that ovseg raises it without importing diffusers."""


PathLike = str | Path


SectionT = TypeVar("SectionT")


def section(node: Any, cls: type[SectionT]) -> SectionT:
    """A loaded config's section as the dataclass `cls` its schema builds (one given directly passes through)."""
    return cast(SectionT, node if dataclasses.is_dataclass(node) else OmegaConf.to_object(node))


def plain(node: Any, resolve: bool = False) -> dict[str, Any]:
    """A config mapping as plain Python values (omegaconf types `to_container`'s result as any container)."""
    return cast(dict[str, Any], OmegaConf.to_container(node, resolve=resolve))


def is_random_model(model: Any) -> bool:
    """The one rule for "this model has random weights" (the miniature `tiny`, or `model.random_init`)."""
    get = model.get if isinstance(model, Mapping) else lambda key: getattr(model, key)
    return get("pretrained") == "tiny" or bool(get("random_init"))


def result_settings(settings: Any) -> dict[str, Any]:
    """The fields of one config section (a dataclass) that can change results: run-only fields left out, and so
    are later keys at the value behaviour had before them (`setting(before=...)`)."""
    out = {}
    for f in dataclasses.fields(settings):
        if not f.metadata.get("run_only"):
            out.update(recorded_setting(type(settings), f.name, getattr(settings, f.name)))
    return out


def recorded_setting(section: type, name: str, value: Any) -> dict[str, Any]:
    """``{name: value}`` as a result setting of config section `section`, or nothing when `name` is a key added
    later and `value` is the behaviour it had before (`setting(before=...)`): caches made before it stay valid."""
    before = next(f for f in dataclasses.fields(section) if f.name == name).metadata.get("before", dataclasses.MISSING)
    if before is not dataclasses.MISSING and value == before:
        return {}
    is_record = dataclasses.is_dataclass(value) and not isinstance(value, type)
    return {name: dataclasses.asdict(value) if is_record else value}


def fingerprint(settings: Mapping[str, Any]) -> str:
    """The canonical text of the settings a cached result depends on: equal settings, equal text."""
    return json.dumps(settings, sort_keys=True)


def settings_diff(old: str, new: str) -> str:
    """``section.key: before -> now`` for every setting that differs between two `fingerprint` texts."""
    before, after = json.loads(old), json.loads(new)
    changes = [
        f"{section}.{key}: {before.get(section, {}).get(key)!r} -> {value!r}"
        for section, values in after.items()
        for key, value in values.items()
        if before.get(section, {}).get(key) != value
    ]
    return "; ".join(changes) or "unknown difference"


def _valid_keys(node: DictConfig, prefix: str) -> list[str]:
    keys = []
    for key, value in node.items_ex(resolve=False):
        full = f"{prefix}{key!s}"
        keys.append(full)
        if isinstance(value, DictConfig) and OmegaConf.is_struct(value):
            keys.extend(_valid_keys(value, full + "."))
    return keys


def _unknown_key_error(schema_node: DictConfig, exc: ConfigKeyError, source: str, prefix: str = "") -> ConfigError:
    full_key = prefix + (exc.full_key or str(exc.key))
    candidates = [prefix + key for key in _valid_keys(schema_node, "")]
    close = difflib.get_close_matches(full_key, candidates, n=3)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    parent = full_key.rsplit(".", 1)[0] if "." in full_key else ""
    siblings = [c for c in candidates if c.rsplit(".", 1)[0] == parent and "." in c] if parent else []
    listing = f" Valid keys under '{parent}': {', '.join(siblings)}." if siblings else ""
    return ConfigError(f"unknown config key '{full_key}' in {source}.{hint}{listing}")


def schema() -> DictConfig:
    """The default configuration in strict mode (unknown keys raise)."""
    return strict(EmerDiffConfig)


def strict(cls: type) -> DictConfig:
    """The defaults of dataclass `cls` in strict mode; its ``Dict``-typed fields take any key."""
    cfg = OmegaConf.structured(cls)
    OmegaConf.set_struct(cfg, True)
    _open_dict_fields(cfg)  # any Trainer argument (the tools check the names against Trainer), paper tables
    return cfg


def _open_dict_fields(node: DictConfig) -> None:
    """Let ``Dict``-typed fields (trainer, paper numbers, extension sections) take any key; dataclasses stay strict."""
    for key in node:
        child = node[key]
        if isinstance(child, DictConfig):
            if OmegaConf.get_type(child) is dict:
                OmegaConf.set_struct(child, False)
            else:
                _open_dict_fields(child)


def check_rules(node: Any, prefix: str = "") -> None:
    """Raise a ConfigError naming the first key whose value breaks its field's rules (`setting`).

    `node` is a config (section) or a dataclass instance of one.
    """
    if dataclasses.is_dataclass(node) and not isinstance(node, DictConfig):
        node = OmegaConf.structured(node)
    cls = OmegaConf.get_type(node)
    if not dataclasses.is_dataclass(cls):
        return
    for f in dataclasses.fields(cls):
        key, value = f"{prefix}{f.name}", node[f.name]
        if isinstance(value, DictConfig):
            check_rules(value, key + ".")
            continue
        rules = f.metadata
        if value is None or not rules:
            continue
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if rules.get("choices") is not None and not (number and rules.get("numbers")):
            items = list(value) if isinstance(value, ListConfig) else [value]
            bad = [item for item in items if item not in rules["choices"]]
            if bad or (isinstance(value, ListConfig) and not items):
                got = ", ".join(map(str, bad)) if bad else "an empty list"
                numbers = " or a number" if rules.get("numbers") else ""
                raise ConfigError(
                    f"{key}: {got} is not valid; choose from {', '.join(map(str, rules['choices']))}{numbers}"
                )
        if rules.get("minimum") is not None and number and value < rules["minimum"]:
            raise ConfigError(f"{key} must be at least {rules['minimum']}, got {value}")
        if rules.get("maximum") is not None and number and value > rules["maximum"]:
            raise ConfigError(f"{key} must be at most {rules['maximum']}, got {value}")
        if rules.get("multiple_of") and value % rules["multiple_of"]:
            raise ConfigError(f"{key} must be a multiple of {rules['multiple_of']}, got {value}")


def load_config(*paths: PathLike | Sequence[PathLike], overrides: Sequence[str] = ()) -> DictConfig:
    """Merge YAML files (later ones win) and then ``key=value`` overrides onto the defaults, then check the rules.

    >>> cfg = load_config("configs/tiny.yaml", overrides=["segmentor.num_masks=8"])
    """
    flat: list[PathLike] = []
    for item in paths:
        flat.extend([item] if isinstance(item, (str, Path)) else list(item))
    cfg = schema()
    for path in flat:
        cfg = merge(cfg, read_yaml(path), f"'{path}'")
    if overrides:
        bad = [o for o in overrides if "=" not in o]
        if bad:
            raise ConfigError(f"overrides must look like key=value, got {bad}")
        cfg = merge(cfg, OmegaConf.from_dotlist(list(overrides)), "the overrides")
    check_rules(cfg)
    return cfg


def shipped_configs() -> list[str]:
    """Short names of the configs installed with the package: tiny, emerdiff_sd15, eval/voc, ov/ade150, ..."""
    return sorted(p.relative_to(SHIPPED_CONFIGS).with_suffix("").as_posix() for p in SHIPPED_CONFIGS.rglob("*.yaml"))


def config_path(name: PathLike) -> Path:
    """A config file by path, else by a shipped config's short name (`tiny`, `eval/voc`, `configs/tiny.yaml`).

    A file on disk wins; the short names make `--cfg tiny` work from any folder after a plain `pip install`.
    """
    path = Path(name)
    if path.is_file():
        return path
    short = path.as_posix().removeprefix("configs/").removesuffix(".yaml")
    shipped = SHIPPED_CONFIGS / f"{short}.yaml"
    if not path.is_absolute() and shipped.is_file():
        return shipped
    raise FileNotFoundError(
        f"config file '{name}' does not exist (looked in {path.resolve()}) and is not a shipped "
        f"config; shipped: {', '.join(shipped_configs())}"
    )


def read_yaml(path: PathLike) -> DictConfig:
    """One config file, by path or shipped short name; a missing or unparsable file is an error that names it."""
    path = config_path(path)
    try:
        loaded = OmegaConf.load(path)
    except Exception as exc:  # yaml's scanner/parser errors carry the line and column
        raise ConfigError(f"config file '{path}' is not valid YAML: {exc}") from None
    if not isinstance(loaded, DictConfig):
        raise ConfigError(f"config file '{path}' holds a list: a config is a mapping of sections (model:, ...)")
    return loaded


def preset_settings(name: PathLike) -> dict[str, Any]:
    """The segmentor settings of a preset config (`fast`, or a YAML file), checked against the schema."""
    preset = read_yaml(name)
    unknown = set(preset) - {"segmentor"}
    if unknown:
        raise ConfigError(
            f"preset '{name}' may only hold a segmentor section, it also has {', '.join(sorted(unknown))}"
        )
    checked = merge(schema(), preset, f"'{name}'")
    check_rules(checked)
    return plain(preset.get("segmentor", {}))


def merge(cfg: DictConfig, other: Any, source: str, prefix: str = "") -> DictConfig:
    """`other` merged onto `cfg`; an unknown key or a wrongly typed value is a ConfigError naming `source`."""
    try:
        merged = OmegaConf.merge(cfg, other)
    except ConfigKeyError as exc:
        raise _unknown_key_error(cfg, exc, source, prefix) from None
    except OmegaConfBaseException as exc:
        raise ConfigError(f"invalid value in {source}: {exc}") from None
    if not isinstance(merged, DictConfig):  # merged onto a mapping, the result is one
        raise ConfigError(f"{source} is not a mapping of settings")
    return merged
