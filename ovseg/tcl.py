"""TCL's text-grounded dense embeddings (Cha, Mun, Roh, CVPR 2023) as an ovseg dense encoder.

TCL ("Learning to Generate Text-grounded Mask for Open-world Semantic Segmentation from Only
Image-Text Pairs") keeps OpenAI's CLIP ViT-B/16 frozen and trains a *masker* on top of it. This is
our implementation of its inference path, written from the architecture of the public code
(kakaobrain/tcl: ``models/tcl/{tcl,masker,encoders,decoders,modules,pamr}.py``, ``configs/tcl.yml``,
``segmentation/configs/_base_/datasets/*.py``) so that the released checkpoint loads into it with
its own key names (``masker.*``; reading it: ``ovseg/tcl_weights.py``):

1. **Frozen CLIP.** The image goes through CLIP's patch embedding and its blocks up to block
   ``freeze - 1`` (TCL's ``ie_freeze: 11``: the output of block 10 of 12, 0-based).
2. **Masker backbone.** Trainable copies of the remaining blocks (block 11 only, key
   ``resblocks.11``) continue from there; the last one attends to itself only (TCL's
   ``ie_ignore_last_attn``: an attention mask with 0 on the diagonal and -inf elsewhere, i.e.
   MaskCLIP's value path ``out_proj(v)``), keeping its residual and MLP. The class token is dropped;
   there is no ``ln_post`` here (TCL moves it into the projection of step 4).
3. **Grounding decoder** (``GDecoder``: 2 layers, 3x3 kernels, GELU, LayerNorm, ``double``): twice,
   a nearest x2 upsampling then ``x += tanh(g1) * conv(gelu(ln(x)))`` and
   ``x += tanh(g2) * conv(gelu(ln(x)))`` (pre-activation, zero-padded 3x3 convs, LayerNorm over
   channels, scalar tanh gates). Output: CLIP's width at 4x the patch grid.
4. **Projection** (``image_proj``): LayerNorm over channels then ``@ proj`` into the joint space
   (initialised from CLIP's ``ln_post`` / ``proj`` and trained).
5. **Grounding.** With ``s`` the cosine between the L2-normalised embedding of a location and a
   class text embedding, TCL's mask is ``sigmoid(w * s + b)`` (``sim2mask``, learned ``w``, ``b``).

The dense embedding of this encoder is step 4's output, L2-normalised: one embedding per 4 x 4
pixels (``stride = patch / 4``), in the space of CLIP's text tower. Because ``w > 0``, the class of
largest mask at a location is the class of largest cosine, so per-pixel classification of these
embeddings (the labeller's baseline) is TCL without its evaluation-time refinements; TCL's mask
threshold ``t`` for background equals the cosine threshold ``(logit(t) - b) / w``
(``TCLEncoder.cosine_threshold``).

TCL's full evaluation (its Table 2) adds two refinements, implemented in ``TCLEncoder.grounding_masks``:
PAMR (``pamr``: 10 iterations, dilations 1, 2, 4, 8, 12, 24, on the image at mask resolution) and the
"KP branch" (``kp_weight = 0.3``): ``mask = kp_w * sigmoid(10 * (s_clip - 0.25)) + (1 - kp_w) * mask``,
``s_clip`` the cosine of the frozen CLIP's MaskCLIP embedding (all blocks, the last one self-only,
``ln_post``, ``proj``) upsampled bilinearly to the mask grid; then masks are upsampled bilinearly to the
image and, for datasets with a background class, a constant background score (0.4 with PAMR, 0.5
without) is put first. TCL normalises images with ImageNet's mean and std (not CLIP's), resizes the
shorter side to 448 and slides 448 x 448 windows every 224 pixels, averaging the windows' scores;
images whose sides are not multiples of the patch are zero-padded, centred, and the output cropped.
"""

from __future__ import annotations

import copy
import math
from collections import OrderedDict
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from open_clip.transformer import ResidualAttentionBlock, VisionTransformer
from torch import Tensor, nn

from .dense_encoder import ClipDenseEncoder, value_path
from .refine import kp_branch, pamr_refine

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # TCL normalises with ImageNet statistics (us.DEFAULT_MEAN / STD)
IMAGENET_STD = (0.229, 0.224, 0.225)
TCL_WINDOW = 448  # TCL's slide inference: 448 x 448 crops every 224 pixels, shorter side resized to 448
UPSAMPLING = 4  # the grounding decoder's two x2 upsamplings: one embedding per patch / 4 pixels
# TCL's "custom" prompt set (datasets/templates.py): 7 ImageNet templates plus two plural forms.
TCL_TEMPLATES: tuple[str, ...] = (
    "itap of a {}.",
    "a bad photo of a {}.",
    "a origami {}.",
    "a photo of the large {}.",
    "a {} in a video game.",
    "art of the {}.",
    "a photo of the small {}.",
    "a photo of many {}.",
    "a photo of {}s.",
)
SIM2MASK_INIT = (10.0, -2.5)  # configs/tcl.yml sim2mask init_w, init_b (used for random miniature weights)


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of a [B, C, H, W] map (parameters ``weight``, ``bias`` of size C)."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class TanhGate(nn.Module):
    """Multiplies its input by ``tanh(gate)`` (a learned scalar; TCL starts it at 0)."""

    def __init__(self, init: float = 0.0) -> None:
        super().__init__()
        self.gate = nn.Parameter(torch.tensor(float(init)))

    def forward(self, x: Tensor) -> Tensor:
        return torch.tanh(self.gate) * x


class GatedConv(nn.Module):
    """Pre-activation unit: LayerNorm2d, GELU, zero-padded 3x3 conv, tanh gate (keys norm, conv, gate)."""

    def __init__(self, channels: int, kernel_size: int = 3) -> None:
        super().__init__()
        self.norm = LayerNorm2d(channels)
        self.act = nn.GELU()
        self.conv = nn.Conv2d(channels, channels, kernel_size, padding=kernel_size // 2)
        self.gate = TanhGate()

    def forward(self, x: Tensor) -> Tensor:
        return self.gate(self.conv(self.act(self.norm(x))))


class UpResidualBlock(nn.Module):
    """Nearest x2 upsampling, then two gated residual conv units (keys conv, conv2)."""

    def __init__(self, channels: int, kernel_size: int = 3) -> None:
        super().__init__()
        self.conv = GatedConv(channels, kernel_size)
        self.conv2 = GatedConv(channels, kernel_size)

    def forward(self, x: Tensor) -> Tensor:
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        x = x + self.conv(x)
        return x + self.conv2(x)


class GroundingDecoder(nn.Module):
    """TCL's GDecoder: ``layers`` upsampling residual blocks at constant width (key net.<i>)."""

    def __init__(self, channels: int, layers: int = 2, kernel_size: int = 3) -> None:
        super().__init__()
        self.net = nn.Sequential(*[UpResidualBlock(channels, kernel_size) for _ in range(layers)])

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class ChannelProjection(nn.Module):
    """LayerNorm over channels, then a [width, D] projection of each location (keys ln, proj)."""

    def __init__(self, ln: nn.LayerNorm, proj: Tensor) -> None:
        super().__init__()
        self.ln = ln
        self.proj = nn.Parameter(proj.detach().clone())

    def forward(self, x: Tensor) -> Tensor:
        x = self.ln(x.permute(0, 2, 3, 1)) @ self.proj  # [B, H, W, D]
        return x.permute(0, 3, 1, 2)


class IndexedBlocks(nn.Module):
    """CLIP blocks under their index in CLIP (resblocks.<i>), the key layout of open_clip's transformer."""

    def __init__(self, blocks: Mapping[int, ResidualAttentionBlock]) -> None:
        super().__init__()
        self.resblocks = nn.Sequential(OrderedDict((str(i), block) for i, block in blocks.items()))


class MaskerBackbone(nn.Module):
    """The masker's trainable copies of CLIP's last blocks, named by their index in CLIP (resblocks.<i>)."""

    def __init__(self, blocks: Mapping[int, ResidualAttentionBlock]) -> None:
        super().__init__()
        self.transformer = IndexedBlocks(blocks)

    def forward(self, x: Tensor) -> Tensor:
        """[B, 1 + hw, width] tokens -> same, the last block attending to itself only."""
        *blocks, last = self.transformer.resblocks
        for block in blocks:
            x = block(x)
        return value_path(last, x)


class MaskerImageEncoder(nn.Module):
    """Masker backbone, then (decoder, image_proj) as one Sequential named ``decoder`` (TCL's layout)."""

    def __init__(self, backbone: MaskerBackbone, decoder: GroundingDecoder, image_proj: ChannelProjection) -> None:
        super().__init__()
        self.backbone = backbone
        self.decoder = nn.Sequential(OrderedDict([("decoder", decoder), ("image_proj", image_proj)]))

    def forward(self, tokens: Tensor, grid: tuple[int, int]) -> Tensor:
        """Frozen-CLIP tokens [B, 1 + h*w, width] -> [B, D, 4h, 4w] un-normalised grounded embeddings."""
        x = self.backbone(tokens)[:, 1:]
        x = x.transpose(1, 2).reshape(len(x), -1, *grid)
        return self.decoder(x)


class Sim2Mask(nn.Module):
    """``sigmoid(w * s + b)`` of a cosine ``s`` (learned scalars ``w``, ``b``)."""

    def __init__(self, w: float = SIM2MASK_INIT[0], b: float = SIM2MASK_INIT[1]) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor(float(w)))
        self.b = nn.Parameter(torch.tensor(float(b)))

    def forward(self, similarity: Tensor) -> Tensor:
        return torch.sigmoid(similarity * self.w + self.b)


class TCLMasker(nn.Module):
    """TCL's trained part: state-dict keys equal the released checkpoint's ``masker.*`` keys minus ``masker.``."""

    def __init__(self, visual: VisionTransformer, freeze: int, decoder_layers: int = 2, kernel_size: int = 3) -> None:
        super().__init__()
        num_blocks = len(visual.transformer.resblocks)
        if not 1 <= freeze < num_blocks:
            raise ValueError(f"freeze must be in [1, {num_blocks - 1}] for a {num_blocks}-block CLIP, got {freeze}")
        blocks = {i: copy.deepcopy(visual.transformer.resblocks[i]) for i in range(freeze, num_blocks)}
        width = visual.conv1.out_channels
        image_proj = ChannelProjection(copy.deepcopy(visual.ln_post), visual.proj)
        self.freeze = freeze
        self.image_encoder = MaskerImageEncoder(
            MaskerBackbone(blocks), GroundingDecoder(width, decoder_layers, kernel_size), image_proj
        )
        self.sim2mask = Sim2Mask()


class TCLEncoder(ClipDenseEncoder):
    """TCL's grounded dense embeddings (DenseEncoder protocol) and its grounding masks.

    ``forward``: [B, 3, H, W] images normalised with ``mean`` / ``std`` (ImageNet's, as TCL), H and W
    multiples of ``stride`` (patch / 4) -> [B, D, H / stride, W / stride] L2-normalised embeddings,
    windows of ``window`` every ``window_stride`` pixels (TCL: 448 and 224) averaged where they overlap.
    A window whose sides are not multiples of the patch is zero-padded (centred) and cropped back.
    """

    def __init__(
        self,
        visual: VisionTransformer,
        masker: TCLMasker,
        window: int | tuple[int, int] = TCL_WINDOW,
        window_stride: int | tuple[int, int] | None = None,
        windows_per_pass: int = 8,
    ) -> None:
        super().__init__(visual, UPSAMPLING, window, window_stride, IMAGENET_MEAN, IMAGENET_STD, windows_per_pass)
        self.masker = masker

    # ---- the dense encoder -------------------------------------------------------------------------
    def dense_window(self, images: Tensor) -> Tensor:
        """[N,3,h,w] (multiples of the stride) -> un-normalised [N,D,h/stride,w/stride] TCL embeddings."""
        return self.encode_window(images)[0]

    def encode_window(self, images: Tensor, with_clip: bool = False) -> tuple[Tensor, Tensor | None]:
        """TCL's embeddings of whole windows, and with ``with_clip`` the frozen CLIP's MaskCLIP embeddings
        [N,D,h'/patch,w'/patch] of the padded window (the KP branch's input)."""
        height, width = images.shape[-2:]
        pad = centred_padding(height, width, self.patch)
        images = F.pad(images.to(self.visual.conv1.weight.dtype), pad)  # zeros in normalised space, as TCL
        grid = (images.shape[-2] // self.patch, images.shape[-1] // self.patch)
        tokens = self.clip_tokens(images)
        blocks = self.visual.transformer.resblocks
        for block in blocks[: self.masker.freeze]:
            tokens = block(tokens)
        dense = self.masker.image_encoder(tokens, grid)
        left, top, s = pad[0] // self.stride, pad[2] // self.stride, self.stride
        dense = dense[..., top : top + height // s, left : left + width // s]
        if not with_clip:
            return dense, None
        for block in blocks[self.masker.freeze : -1]:
            tokens = block(tokens)
        clip = self.visual.ln_post(value_path(blocks[-1], tokens)[:, 1:]) @ self.visual.proj
        return dense, clip.transpose(1, 2).reshape(len(images), -1, *grid)

    # ---- TCL's masks -------------------------------------------------------------------------------
    def gate(self, similarity: Tensor) -> Tensor:
        """TCL's mask ``sigmoid(w * s + b)`` of cosines ``s``."""
        return self.masker.sim2mask(similarity)

    def cosine_threshold(self, mask_threshold: float) -> float:
        """The cosine ``s`` at which TCL's mask equals ``mask_threshold`` (TCL's bg_thresh as a cosine)."""
        w, b = float(self.masker.sim2mask.w.detach()), float(self.masker.sim2mask.b.detach())
        if w <= 0:
            raise ValueError(f"TCL's sim2mask weight must be positive to order masks like cosines, got {w}")
        return (math.log(mask_threshold / (1 - mask_threshold)) - b) / w

    @torch.no_grad()
    def grounding_masks(self, images: Tensor, text: Tensor, pamr: bool = False, kp_weight: float = 0.0) -> Tensor:
        """TCL's soft masks [B, C, H, W] in [0, 1] for class embeddings ``text`` [C, D], at the image size.

        Per window: masks on the 1/4 grid, PAMR if ``pamr``, the KP mix if ``kp_weight``, bilinear
        upsampling to the window; windows' masks are averaged where they overlap (mmseg's slide mode).
        """
        self.check_images(images)
        text = F.normalize(text.to(images.device, torch.float32), dim=-1)

        def window_masks(crops: Tensor) -> Tensor:
            dense, clip = self.encode_window(crops, with_clip=kp_weight > 0)
            masks = self.gate(torch.einsum("bdhw,cd->bchw", F.normalize(dense.float(), dim=1), text))
            if pamr:
                guide = F.interpolate(crops.float(), size=masks.shape[-2:], mode="bilinear", align_corners=True)
                masks = pamr_refine(guide, masks)
            if clip is not None:  # computed when kp_weight > 0
                s_clip = torch.einsum("bdhw,cd->bchw", F.normalize(clip.float(), dim=1), text)
                kp = F.interpolate(kp_branch(s_clip), scale_factor=UPSAMPLING, mode="bilinear")
                masks = kp_weight * _crop_to_window(kp, crops, self) + (1 - kp_weight) * masks
            return F.interpolate(masks, size=crops.shape[-2:], mode="bilinear")

        return self.slide(images, window_masks, 1)


@torch.no_grad()
def tcl_labels(
    encoder: TCLEncoder,
    images: Tensor,
    text: Tensor,
    *,
    background_id: int | None = None,
    background_score: float | None = None,
    pamr: bool = False,
    kp_weight: float = 0.0,
    size: tuple[int, int] | None = None,
) -> Tensor:
    """TCL's own per-pixel decision [B, H, W]: the class of largest grounding mask (``grounding_masks``).

    As in TCL's evaluation of datasets with a background class, ``background_score`` (TCL: 0.4 with
    PAMR, 0.5 without) replaces the mask of class ``background_id``: a pixel is background when no
    other class's mask reaches it. Ties go to the lowest class id. TCL's Table 2 setting is
    ``pamr=True, kp_weight=0.3, background_score=0.4``; without PAMR, ``kp_weight=0.3, background_score=0.5``.
    With ``size``, the masks are first resized bilinearly to it (mmseg resizes scores to the label size).
    """
    masks = encoder.grounding_masks(images, text, pamr=pamr, kp_weight=kp_weight)
    if size is not None and tuple(size) != tuple(masks.shape[-2:]):
        masks = F.interpolate(masks, size=tuple(size), mode="bilinear")
    if background_score is not None:
        if background_id is None:
            raise ValueError("background_score needs the vocabulary's background class id")
        masks[:, background_id] = background_score
    return masks.argmax(dim=1)


def tcl_background_score(pamr: bool) -> float:
    """TCL's constant background score: 0.4 with PAMR (configs/eval.yml), 0.5 without (configs/default.yml)."""
    return 0.4 if pamr else 0.5


def centred_padding(height: int, width: int, multiple: int) -> tuple[int, int, int, int]:
    """(left, right, top, bottom) zero padding up to multiples of ``multiple``, rounded so that the
    left / top pads are multiples of ``multiple / 4`` (cells stay aligned) and about centred as in TCL."""
    cell = max(1, multiple // UPSAMPLING)

    def split(size: int) -> tuple[int, int]:
        total = -size % multiple
        first = total // 2 // cell * cell
        return first, total - first

    left, right = split(width)
    top, bottom = split(height)
    return left, right, top, bottom


def _crop_to_window(kp: Tensor, crops: Tensor, encoder: TCLEncoder) -> Tensor:
    """The KP map (on the padded window's 1/4 grid) cropped to the window's own cells."""
    height, width = crops.shape[-2:]
    left, _, top, _ = centred_padding(height, width, encoder.patch)
    s = encoder.stride
    return kp[..., top // s : top // s + height // s, left // s : left // s + width // s]
