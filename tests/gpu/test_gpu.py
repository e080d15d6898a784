"""Checks that need a CUDA GPU: half precision, faiss on the GPU, memory, fused attention kernels.

Run them on a GPU machine (they skip, naming why, everywhere else):

    python -m pytest -m gpu -q -rs tests/gpu                 # all; real-weight tests skip without the weights
    python -m pytest -m "gpu and not slow" -q -rs tests/gpu  # the miniature model only: seconds, no download
    EMERDIFF_PRETRAINED=/path/or/hub-id python -m pytest -m gpu -q -rs tests/gpu

(`-m` on the command line replaces setup.cfg's default `-m "not slow and not gpu"`.)
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from omegaconf import OmegaConf

from emerdiff import EmerDiff, load_config
from emerdiff.clustering import kmeans
from emerdiff.models import build_random_sd, cast_components
from emerdiff.selfcheck import kmeans_objective, memory_estimate, run_selfcheck, tolerance, weight_bytes


def _no_gpu_reason() -> str:
    if torch.version.cuda is None:
        return f"no GPU found: this torch {torch.__version__} is a CPU-only build"
    return f"no GPU found: torch.cuda.is_available() is False (torch {torch.__version__}, CUDA {torch.version.cuda})"


pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason=_no_gpu_reason())]
TINY = "configs/tiny.yaml"


def tiny_on_gpu(dtype: torch.dtype = torch.float16, **segmentor) -> EmerDiff:
    """The miniature SD on CUDA in `dtype`, with the tiny config and `segmentor` overrides."""
    components = build_random_sd("tiny", seed=0)
    for module in (components.unet, components.vae, components.text_encoder):
        module.to("cuda")
    cast_components(components, dtype)
    cfg = load_config(TINY, overrides=[f"segmentor.{k}={v}" for k, v in segmentor.items()])
    return EmerDiff(components, OmegaConf.to_object(cfg.segmentor))


@pytest.fixture(scope="module")
def photo():
    from skimage import data

    return data.astronaut()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_fast_path_equals_reference_path_on_the_gpu_within_the_dtype_tolerance(photo, dtype):
    tol = tolerance(dtype, torch.device("cuda"))  # float32 on CUDA: TF32 convolutions
    fast = tiny_on_gpu(dtype, keep_diff_maps="true", num_masks=4)
    reference = EmerDiff(fast.components, replace(fast.params, impl="reference"))
    a, b = fast.segment(photo), reference.segment(photo)
    scale = b.diff_maps.abs().max()
    assert ((a.diff_maps - b.diff_maps).abs().max() / scale).item() < tol.maps
    assert (a.labels == b.labels).float().mean().item() >= tol.labels


def test_selfcheck_passes_on_the_miniature_model_in_half_precision_on_the_gpu(photo):
    report = run_selfcheck(tiny_on_gpu(torch.float16, memory_budget_gb=1), photo)
    assert report.passed, report.to_markdown()
    assert report.check("memory").status == "pass"  # measured on CUDA, not skipped
    assert report.environment["gpu"]


def test_faiss_gpu_kmeans_reaches_the_cpu_objective():
    import faiss

    if not hasattr(faiss, "get_num_gpus") or faiss.get_num_gpus() == 0:
        pytest.skip("the installed faiss has no GPU support: pip install -e '.[gpu]' (faiss-gpu-cu12)")
    points = torch.randn(1024, 64, generator=torch.Generator().manual_seed(0))
    points[:512] += 4.0  # two real groups and structure inside them
    cpu = kmeans_objective(points, *kmeans(points, 25, seed=1, restarts=5, iters=50, gpu=False))
    gpu = kmeans_objective(points, *kmeans(points, 25, seed=1, restarts=5, iters=50, gpu=True))
    assert abs(gpu - cpu) / cpu < 1e-3


def test_measured_peak_memory_stays_within_the_planners_estimate(photo):
    model = tiny_on_gpu(torch.float16, resolution=512, memory_budget_gb=0.25, num_masks=8)
    plan = model.chunk_plan()
    assert plan.profile is not None and plan.variants < 16  # the budget really splits the variants into chunks
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    out = model.segment(photo)
    peak = torch.cuda.max_memory_allocated()
    estimate = memory_estimate(model, 2 * out.num_masks)
    assert weight_bytes(model) < peak <= estimate, f"peak {peak / 2**20:.1f} MiB, estimate {estimate / 2**20:.1f} MiB"


def test_attention_runs_on_cuda_fused_sdpa_kernels(photo):
    """With the math fallback disabled every attention call must still find a fused kernel."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    model = tiny_on_gpu(torch.float16, num_masks=3)
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]):
        out = model.segment(photo)  # raises "No available kernel" if any call needs the math path
    assert out.num_masks >= 1


# --- real weights (also marked slow): skipped unless they are on this machine -------------------------------


@pytest.mark.slow
def test_selfcheck_passes_with_real_weights_in_half_precision(real_sd15, photo):
    report = run_selfcheck(real_sd15, photo)
    assert report.passed, report.to_markdown()


@pytest.mark.slow
def test_real_weights_use_fused_attention_kernels(real_sd15, photo):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]):
        out = real_sd15.segment(photo)
    assert out.num_masks >= 1
