"""Step 5: faiss k-means from query features to K low-resolution masks."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

try:
    import faiss
except ImportError:  # neither extra installed: say which one to pick
    raise ImportError(
        "faiss is not installed: pip install 'emerdiff[cpu]' (faiss-cpu, any machine) or "
        "'emerdiff[gpu]' (faiss-gpu-cu12, CUDA 12 on Linux x86-64); from a checkout: "
        "pip install -e '.[cpu]' or '.[gpu]'"
    ) from None


@dataclass
class Clusters:
    """K non-empty clusters of a token grid; K may be below the requested number."""

    labels: torch.Tensor  # [h, w] int64 in 0..K-1
    centroids: torch.Tensor  # [K, C] float32
    embeddings: torch.Tensor  # [K, C] mean feature of each mask

    @property
    def masks(self) -> torch.Tensor:
        """[K, h, w] bool, one binary mask per cluster."""
        return self.labels[None] == torch.arange(len(self.centroids))[:, None, None]


def use_faiss_gpu(device: str) -> bool:
    """``auto`` uses faiss' GPU k-means when the installed faiss sees a GPU."""
    gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    if device == "auto":
        return gpus > 0
    if device == "gpu" and gpus == 0:
        raise RuntimeError(
            "segmentor.kmeans_device=gpu but faiss sees no GPU: install faiss-gpu (pip install 'emerdiff[gpu]')"
        )
    return device == "gpu"


def _flat_index(dim: int, gpu: bool) -> faiss.Index:
    """Exact L2 index; on the GPU it lives on this process's CUDA device (one per DDP rank)."""
    if not gpu:
        return faiss.IndexFlatL2(dim)
    import torch.cuda

    config = faiss.GpuIndexFlatConfig()
    config.device = torch.cuda.current_device() if torch.cuda.is_available() else 0
    return faiss.GpuIndexFlatL2(faiss.StandardGpuResources(), dim, config)


def kmeans(
    points: torch.Tensor | np.ndarray,
    k: int,
    seed: int,
    restarts: int,
    iters: int,
    gpu: bool = False,
    spherical: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded faiss k-means, best of `restarts` runs, every point used; returns (assignment [N], centroids [k, C]).

    k is lowered to the number of distinct points when there are fewer.
    """
    x = np.ascontiguousarray(torch.as_tensor(points).detach().float().cpu().numpy())
    k = min(k, len(np.unique(x, axis=0)))
    clustering = faiss.Clustering(x.shape[1], k)
    clustering.niter, clustering.nredo, clustering.seed = iters, max(restarts, 1), seed % (2**31 - 1)
    clustering.spherical, clustering.verbose = spherical, False
    clustering.min_points_per_centroid, clustering.max_points_per_centroid = 1, max(-(-len(x) // k), 1)
    index = _flat_index(x.shape[1], gpu)
    clustering.train(x, index)
    centroids = faiss.vector_to_array(clustering.centroids).reshape(k, x.shape[1])
    index.reset()
    index.add(centroids)
    _, assignment = index.search(x, 1)
    return torch.from_numpy(assignment[:, 0].astype(np.int64)), torch.from_numpy(centroids.copy())


# (token features [h*w, C], h, w, k, seed, restarts, iters, gpu) -> masks: `cluster_grid`, or a cost model's stand-in
KMeans = Callable[[torch.Tensor, int, int, int, int, int, int, bool], Clusters]


def cluster_grid(
    features: torch.Tensor,
    height: int,
    width: int,
    k: int,
    seed: int,
    restarts: int = 5,
    iters: int = 50,
    gpu: bool = False,
) -> Clusters:
    """k-means over [h*w, C] token features; empty clusters are dropped and ids made contiguous."""
    assignment, centroids = kmeans(features, k, seed, restarts, iters, gpu)
    used = assignment.unique()  # sorted, so surviving clusters keep their relative order
    remap = torch.full((len(centroids),), -1, dtype=torch.long)
    remap[used] = torch.arange(len(used))
    labels = remap[assignment]
    feats = features.detach().float().cpu()
    sums = torch.zeros(len(used), feats.shape[1]).index_add_(0, labels, feats)
    counts = torch.bincount(labels, minlength=len(used)).clamp_min(1)
    return Clusters(labels.view(height, width), centroids[used], sums / counts[:, None])
