"""TCL's text-grounded dense embeddings (Cha, Mun, Roh, CVPR 2023) as an ovseg dense encoder.

TCL ("Learning to Generate Text-grounded Mask for Open-world Semantic Segmentation from Only
Image-Text Pairs") keeps OpenAI's CLIP ViT-B/16 frozen and trains a *masker* on top of it. This is
our implementation of its inference path, written from the architecture of the public code
(kakaobrain/tcl: ``models/tcl/{tcl,masker,encoders,decoders,modules,pamr}.py``, ``configs/tcl.yml``,
``segmentation/configs/_base_/datasets/*.py``) so that the released checkpoint loads into it with
its own key names (``masker.*``, see ``masker_state_dict_shapes``):

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
import os
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from open_clip.transformer import ResidualAttentionBlock, VisionTransformer
from torch import Tensor, nn

TCL_CHECKPOINT_URL = "https://github.com/kakaobrain/tcl/releases/download/v1.0.0/tcl.pth"
TCL_REPOSITORY = "https://github.com/kakaobrain/tcl"
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # TCL normalises with ImageNet statistics (us.DEFAULT_MEAN / STD)
IMAGENET_STD = (0.229, 0.224, 0.225)
TCL_WINDOW = 448  # TCL's slide inference: 448 x 448 crops every 224 pixels, shorter side resized to 448
TCL_WINDOW_STRIDE = 224
TCL_FREEZE = 11  # configs/tcl.yml ie_freeze: the masker owns the blocks from index 11 (of 12) on
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
KP_OFFSET, KP_SCALE = 0.25, 10.0  # TCL's kp_branch: sigmoid((s_clip - 0.25) * 10)
PAMR_ITERATIONS = 10
PAMR_DILATIONS = (1, 2, 4, 8, 12, 24)
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


class MaskerBackbone(nn.Module):
    """The masker's trainable copies of CLIP's last blocks, named by their index in CLIP (resblocks.<i>)."""

    def __init__(self, blocks: Mapping[int, ResidualAttentionBlock]) -> None:
        super().__init__()
        self.transformer = nn.Module()
        self.transformer.resblocks = nn.Sequential(OrderedDict((str(i), block) for i, block in blocks.items()))

    def forward(self, x: Tensor) -> Tensor:
        """[B, 1 + hw, width] tokens -> same, the last block attending to itself only."""
        *blocks, last = self.transformer.resblocks
        for block in blocks:
            x = block(x)
        return self_attention_block(last, x)


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


class TCLEncoder(nn.Module):
    """TCL's grounded dense embeddings (DenseEncoder protocol) and its grounding masks.

    ``forward``: [B, 3, H, W] images normalised with ``mean`` / ``std`` (ImageNet's, as TCL), H and W
    multiples of ``stride`` (patch / 4) -> [B, D, H / stride, W / stride] L2-normalised embeddings.
    Images larger than ``window`` are covered by windows every ``window_stride`` pixels (TCL: 448 and
    224); each window's normalised embeddings are averaged where windows overlap, then renormalised.
    A window whose sides are not multiples of the patch is zero-padded (centred) and cropped back.
    """

    def __init__(
        self,
        visual: VisionTransformer,
        masker: TCLMasker,
        window: int | tuple[int, int] = TCL_WINDOW,
        window_stride: int | tuple[int, int] = TCL_WINDOW_STRIDE,
        windows_per_pass: int = 8,
    ) -> None:
        super().__init__()
        _check_visual(visual)
        self.visual = visual  # frozen CLIP
        self.masker = masker
        self.patch = visual.patch_size[0]
        self.stride = self.patch // UPSAMPLING
        self.embed_dim = visual.output_dim
        self.mean, self.std = IMAGENET_MEAN, IMAGENET_STD
        self.window = _pair(window)
        self.window_stride = _pair(window_stride)
        self.windows_per_pass = windows_per_pass
        for size in (*self.window, *self.window_stride):
            if size <= 0 or size % self.stride:
                raise ValueError(f"window and window_stride must be positive multiples of the stride {self.stride}")

    # ---- the dense encoder -------------------------------------------------------------------------
    def forward(self, images: Tensor) -> Tensor:
        """[B,3,H,W] normalised images -> [B,D,H/stride,W/stride] L2-normalised grounded embeddings."""
        self._check_images(images)
        fused = self._slide(images, lambda crops: F.normalize(self.encode_window(crops)[0], dim=1), self.stride)
        return F.normalize(fused, dim=1)

    def encode_window(self, images: Tensor, with_clip: bool = False) -> tuple[Tensor, Tensor | None]:
        """[N,3,h,w] (multiples of the stride) -> un-normalised [N,D,h/stride,w/stride] TCL embeddings, and
        with ``with_clip`` the frozen CLIP's MaskCLIP embeddings [N,D,h'/patch,w'/patch] of the padded window."""
        height, width = images.shape[-2:]
        pad = centred_padding(height, width, self.patch)
        images = F.pad(images.to(self.visual.conv1.weight.dtype), pad)  # zeros in normalised space, as TCL
        grid = (images.shape[-2] // self.patch, images.shape[-1] // self.patch)
        tokens = self._clip_tokens(images)
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
        clip = self.visual.ln_post(self_attention_block(blocks[-1], tokens)[:, 1:]) @ self.visual.proj
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
        self._check_images(images)
        text = F.normalize(text.to(images.device, torch.float32), dim=-1)

        def window_masks(crops: Tensor) -> Tensor:
            dense, clip = self.encode_window(crops, with_clip=kp_weight > 0)
            cosine = torch.einsum("bdhw,cd->bchw", F.normalize(dense.float(), dim=1), text)
            masks = self.gate(cosine)
            if pamr:
                guide = F.interpolate(crops.float(), size=masks.shape[-2:], mode="bilinear", align_corners=True)
                masks = pamr_refine(guide, masks)
            if kp_weight > 0:
                s_clip = torch.einsum("bdhw,cd->bchw", F.normalize(clip.float(), dim=1), text)
                kp = torch.sigmoid((s_clip - KP_OFFSET) * KP_SCALE)
                kp = _crop_to_window(F.interpolate(kp, scale_factor=UPSAMPLING, mode="bilinear"), crops, self)
                masks = kp_weight * kp + (1 - kp_weight) * masks
            return F.interpolate(masks, size=crops.shape[-2:], mode="bilinear")

        return self._slide(images, window_masks, 1)

    # ---- helpers -----------------------------------------------------------------------------------
    def _check_images(self, images: Tensor) -> None:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images of shape [B, 3, H, W], got {tuple(images.shape)}")
        if images.shape[-2] % self.stride or images.shape[-1] % self.stride:
            raise ValueError(f"image size {tuple(images.shape[-2:])} must be a multiple of the stride {self.stride}")

    def _clip_tokens(self, images: Tensor) -> Tensor:
        """Class token + patch tokens with bicubically resized positional embeddings, after ln_pre."""
        visual = self.visual
        x = visual.conv1(images)
        grid = tuple(x.shape[-2:])
        x = x.flatten(2).transpose(1, 2)
        pos = visual.positional_embedding
        if grid != tuple(visual.grid_size):
            patch_pos = pos[1:].reshape(1, *visual.grid_size, -1).permute(0, 3, 1, 2)
            patch_pos = F.interpolate(patch_pos, size=grid, mode="bicubic", align_corners=False)
            pos = torch.cat([pos[:1], patch_pos.flatten(2)[0].T], dim=0)
        cls = visual.class_embedding.to(x.dtype).expand(len(x), 1, -1)
        return visual.ln_pre(torch.cat([cls, x], dim=1) + pos.to(x.dtype))

    def _slide(self, images: Tensor, encode, cell: int) -> Tensor:
        """Average ``encode(windows)`` (maps with one value per ``cell`` pixels) over overlapping windows."""
        batch, _, height, width = images.shape
        win_h, win_w = min(self.window[0], height), min(self.window[1], width)
        origins = [
            (top, left)
            for top in _window_starts(height, win_h, self.window_stride[0])
            for left in _window_starts(width, win_w, self.window_stride[1])
        ]
        total = count = None
        for start in range(0, len(origins), self.windows_per_pass):
            chunk = origins[start : start + self.windows_per_pass]
            crops = torch.cat([images[..., t : t + win_h, l : l + win_w] for t, l in chunk])
            for (top, left), out in zip(chunk, encode(crops).split(batch), strict=True):
                if total is None:
                    total = out.new_zeros(batch, out.shape[1], height // cell, width // cell)
                    count = out.new_zeros(1, 1, height // cell, width // cell)
                cells = (..., slice(top // cell, (top + win_h) // cell), slice(left // cell, (left + win_w) // cell))
                total[cells] += out
                count[cells] += 1
        return total / count


@torch.no_grad()
def tcl_labels(encoder: TCLEncoder, images: Tensor, text: Tensor, *, background_id: int | None = None,
               background_score: float | None = None, pamr: bool = False, kp_weight: float = 0.0,
               size: tuple[int, int] | None = None) -> Tensor:
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


def self_attention_block(block: ResidualAttentionBlock, x: Tensor) -> Tensor:
    """A CLIP block whose attention is restricted to each token itself (TCL's ignore_last_attn).

    With an attention mask of 0 on the diagonal and -inf elsewhere the softmax puts all weight on
    the token itself, so attention reduces to ``out_proj(v_proj(ln_1(x)))``; residual and MLP stay.
    """
    attn = block.attn
    width = x.shape[-1]
    value = F.linear(block.ln_1(x), attn.in_proj_weight[2 * width :], attn.in_proj_bias[2 * width :])
    x = x + block.ls_1(attn.out_proj(value))
    return x + block.ls_2(block.mlp(block.ln_2(x)))


def pamr_refine(image: Tensor, masks: Tensor, iterations: int = PAMR_ITERATIONS,
                dilations: Sequence[int] = PAMR_DILATIONS) -> Tensor:
    """Pixel-adaptive mask refinement (Araslanov & Roth, CVPR 2020), as TCL applies it.

    ``image`` [B, K, H, W] and ``masks`` [B, C, H, W] at the same size. For every pixel and each of
    the 8 neighbours at each dilation (replicate padding), the affinity is
    ``-|x - x_n| / (1e-8 + 0.1 * sigma)`` per channel, ``sigma`` the standard deviation of the pixel's
    3 x 3 neighbourhoods (centre included) over all dilations; affinities are averaged over channels
    and softmax-normalised over the neighbours. Each iteration replaces every mask value by the
    affinity-weighted mean of its neighbours' values.
    """
    neighbours = _neighbour_values(image, dilations, centre=False)  # [B, K, 8n, H, W]
    sigma = _neighbour_values(image, dilations, centre=True).std(dim=2, keepdim=True)
    affinity = (-(neighbours - image[:, :, None]).abs() / (1e-8 + 0.1 * sigma)).mean(dim=1, keepdim=True)
    affinity = affinity.softmax(dim=2)  # [B, 1, 8n, H, W]
    for _ in range(iterations):
        masks = (_neighbour_values(masks, dilations, centre=False) * affinity).sum(dim=2)
    return masks


def _neighbour_values(x: Tensor, dilations: Sequence[int], centre: bool) -> Tensor:
    """[B, C, P, H, W]: for every pixel, the values at its 3 x 3 offsets (times each dilation), replicate-padded."""
    height, width = x.shape[-2:]
    offsets = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if centre or (dy, dx) != (0, 0)]
    values = []
    for d in dilations:
        padded = F.pad(x, [d] * 4, mode="replicate")
        values += [padded[..., d + dy * d : d + dy * d + height, d + dx * d : d + dx * d + width] for dy, dx in offsets]
    return torch.stack(values, dim=2)


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


def _window_starts(size: int, window: int, stride: int) -> list[int]:
    """Window offsets every ``stride`` pixels, plus a last window flush with the far edge (mmseg's slide)."""
    starts = list(range(0, size - window + 1, stride))
    if starts[-1] != size - window:
        starts.append(size - window)
    return starts


def _pair(value: int | Sequence[int]) -> tuple[int, int]:
    return (int(value), int(value)) if isinstance(value, int) else (int(value[0]), int(value[1]))


def _check_visual(visual: nn.Module) -> None:
    if not isinstance(visual, VisionTransformer) or visual.attn_pool is not None or visual.pool_type != "tok":
        raise TypeError("TCL needs an open_clip class-token VisionTransformer (OpenAI CLIP ViT-B/16)")
    if visual.patch_size[0] != visual.patch_size[1] or visual.patch_size[0] % UPSAMPLING:
        raise TypeError(f"TCL needs square patches divisible by {UPSAMPLING}, got {visual.patch_size}")
    if not visual.transformer.batch_first:
        raise TypeError("TCL needs a batch-first open_clip transformer")


# ---- checkpoint ----------------------------------------------------------------------------------


def masker_state_dict_shapes(width: int, embed_dim: int, num_blocks: int, freeze: int = TCL_FREEZE,
                             decoder_layers: int = 2, kernel_size: int = 3) -> dict[str, tuple[int, ...]]:
    """Key -> shape of the released TCL checkpoint's trained part (``model`` entry, ``masker.*`` keys),
    for a CLIP of ``width`` / ``embed_dim`` / ``num_blocks`` (ViT-B/16: 768 / 512 / 12, freeze 11)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for i in range(freeze, num_blocks):
        block = f"masker.image_encoder.backbone.transformer.resblocks.{i}."
        shapes.update({
            block + "ln_1.weight": (width,), block + "ln_1.bias": (width,),
            block + "attn.in_proj_weight": (3 * width, width), block + "attn.in_proj_bias": (3 * width,),
            block + "attn.out_proj.weight": (width, width), block + "attn.out_proj.bias": (width,),
            block + "ln_2.weight": (width,), block + "ln_2.bias": (width,),
            block + "mlp.c_fc.weight": (4 * width, width), block + "mlp.c_fc.bias": (4 * width,),
            block + "mlp.c_proj.weight": (width, 4 * width), block + "mlp.c_proj.bias": (width,),
        })
    for layer in range(decoder_layers):
        for unit in ("conv", "conv2"):
            prefix = f"masker.image_encoder.decoder.decoder.net.{layer}.{unit}."
            shapes.update({
                prefix + "norm.weight": (width,), prefix + "norm.bias": (width,),
                prefix + "conv.weight": (width, width, kernel_size, kernel_size), prefix + "conv.bias": (width,),
                prefix + "gate.gate": (),
            })
    proj = "masker.image_encoder.decoder.image_proj."
    shapes.update({proj + "ln.weight": (width,), proj + "ln.bias": (width,), proj + "proj": (width, embed_dim)})
    shapes.update({"masker.sim2mask.w": (), "masker.sim2mask.b": ()})
    return shapes


def read_tcl_checkpoint(path: str | os.PathLike) -> dict[str, Tensor]:
    """The ``masker.*`` tensors of a TCL checkpoint (``{"model": state_dict, ...}`` as TCL saves, or a bare state dict).

    Frozen CLIP copies (``clip_image_encoder.*``, ``clip_text_encoder.*``), which TCL's own loader
    allows to be absent, are dropped: the frozen CLIP comes from open_clip; so are PAMR's fixed shift
    kernels (``pamr.*``, present if a checkpoint was saved after an evaluation with PAMR). Any other
    key is an error.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(missing_checkpoint_help(f"ovseg.tcl_checkpoint={str(path)!r} is not a file."))
    try:
        stored = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # pickled non-tensor objects (e.g. the training config) are refused
        raise RuntimeError(
            f"Could not read {path} with torch.load(weights_only=True) ({error.__class__.__name__}). If it is the "
            "TCL release, it may hold pickled training objects; extract its weights once on a trusted machine: "
            f"python -c \"import torch; c = torch.load('{path}', map_location='cpu', weights_only=False); "
            f"torch.save({{'model': c['model']}}, '{path.with_suffix('.weights.pth')}')\" and pass that file."
        ) from error
    state = stored.get("model", stored) if isinstance(stored, dict) else None
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"{path} holds no TCL state dict (expected {{'model': {{'masker.…': tensor, …}}}})")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    known = ("masker.", "clip_image_encoder.", "clip_text_encoder.", "pamr.")
    other = sorted(k for k in state if not k.startswith(known))
    if other:
        raise ValueError(f"{path} has keys that are not TCL's (masker.*, clip_*_encoder.*, pamr.*): {other[:5]}")
    masker = {k.removeprefix("masker."): v for k, v in state.items() if k.startswith("masker.")}
    if not masker:
        raise ValueError(f"{path} has no masker.* weights: not a TCL checkpoint")
    return masker


def checkpoint_freeze(masker_state: Mapping[str, Tensor]) -> int:
    """TCL's ie_freeze read off a masker state dict: the first CLIP block index the masker holds."""
    prefix = "image_encoder.backbone.transformer.resblocks."
    indices = {int(k[len(prefix) :].split(".")[0]) for k in masker_state if k.startswith(prefix)}
    if not indices:
        raise ValueError("the TCL checkpoint has no masker backbone blocks (masker.image_encoder.backbone.…)")
    return min(indices)


def load_tcl_masker(visual: VisionTransformer, masker_state: Mapping[str, Tensor]) -> TCLMasker:
    """A TCLMasker for ``visual`` with ``masker_state`` loaded strictly (missing / unexpected / misshapen keys fail)."""
    masker = TCLMasker(visual, checkpoint_freeze(masker_state))
    expected = {k: tuple(v.shape) for k, v in masker.state_dict().items()}
    wrong = [f"{k}: {tuple(v.shape)} vs {expected[k]}" for k, v in masker_state.items()
             if k in expected and tuple(v.shape) != expected[k]]
    if wrong:
        raise ValueError(f"TCL checkpoint shapes do not fit this CLIP ({visual.output_dim}-d, "
                         f"width {visual.conv1.out_channels}): {wrong[:4]}")
    dtype = visual.conv1.weight.dtype
    masker.load_state_dict({k: v.to(dtype) for k, v in masker_state.items()}, strict=True)
    return masker.to(visual.conv1.weight.device)


def random_tcl_masker(visual: VisionTransformer, freeze: int | None = None, seed: int = 0) -> TCLMasker:
    """A masker with random weights for the miniature TCL (tests, offline tools): TCL's initialisation
    (copies of CLIP's last blocks, ln_post and proj; sim2mask w=10, b=-2.5), except that the decoder's
    gates, zero at TCL's start (decoder = upsampling only), are random so the decoder takes part."""
    freeze = len(visual.transformer.resblocks) - 1 if freeze is None else freeze
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        masker = TCLMasker(visual, freeze)
        for module in masker.modules():
            if isinstance(module, TanhGate):
                nn.init.uniform_(module.gate, 0.3, 1.0)
    return masker.to(visual.conv1.weight.device, visual.conv1.weight.dtype)


def missing_checkpoint_help(reason: str) -> str:
    """Where TCL's weights come from."""
    return (
        f"{reason} TCL needs its released checkpoint (the trained masker): download "
        f"{TCL_CHECKPOINT_URL} (the official release of {TCL_REPOSITORY}, README 'Evaluation') and pass "
        "ovseg.tcl_checkpoint=/path/to/tcl.pth, with the OpenAI CLIP ViT-B/16 weights for the frozen encoder "
        "(ovseg.clip_model=ViT-B-16 ovseg.clip_pretrained=openai). The miniature random TCL (tests) needs "
        "random CLIP weights too: ovseg.clip_pretrained=null (configs/tiny.yaml)."
    )


def tcl_encoder(clip, settings) -> TCLEncoder:
    """ENCODER_BUILDERS entry: the frozen CLIP image tower of ``clip`` + TCL's masker from ``settings.tcl_checkpoint``.

    Without a checkpoint, the random CLIP of ``ovseg.clip_pretrained: null`` gets a random masker
    (seed ``ovseg.clip_init_seed``); real CLIP weights without a checkpoint are an error saying where
    to get it. ``ovseg.window`` / ``window_stride`` default to TCL's 448 / 224.
    """
    if not settings.keep_residual:
        raise ValueError("ovseg.keep_residual=false is MaskCLIP's variant; TCL's masker was trained with the residual "
                         "and MLP of its last block kept (leave ovseg.keep_residual: true with ovseg.encoder=tcl)")
    path = settings.tcl_checkpoint
    visual = clip.model.visual
    if path:
        masker = load_tcl_masker(visual, read_tcl_checkpoint(path))
    elif clip.pretrained is None:
        masker = random_tcl_masker(visual, seed=settings.clip_init_seed)
    else:
        raise FileNotFoundError(missing_checkpoint_help("ovseg.encoder=tcl needs ovseg.tcl_checkpoint."))
    if settings.window is None:
        window, stride = TCL_WINDOW, settings.window_stride or TCL_WINDOW_STRIDE
    else:
        cell = visual.patch_size[0] // UPSAMPLING
        window, stride = settings.window, settings.window_stride or max(cell, settings.window // 2 // cell * cell)
    return TCLEncoder(visual, masker, window, stride).eval()
