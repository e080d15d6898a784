"""SPEC step 5: faiss k-means from query features to K low-resolution masks."""

from __future__ import annotations

from dataclasses import dataclass

import faiss
import numpy as np
import torch


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
        raise RuntimeError("segmentor.kmeans_device=gpu but faiss sees no GPU: install faiss-gpu (pip install 'emerdiff[gpu]')")
    if device not in ("cpu", "gpu"):
        raise ValueError(f"segmentor.kmeans_device must be auto, cpu or gpu, got '{device}'")
    return device == "gpu"


def kmeans(points: torch.Tensor, k: int, seed: int, restarts: int, iters: int, gpu: bool = False):
    """Seeded faiss k-means with restarts (best objective kept); returns (assignment [N], centroids [k, C])."""
    x = np.ascontiguousarray(points.detach().float().cpu().numpy())
    k = min(k, len(np.unique(x, axis=0)))
    km = faiss.Kmeans(
        x.shape[1], k, niter=iters, nredo=max(restarts, 1), seed=seed % (2**31 - 1), gpu=gpu,
        verbose=False, min_points_per_centroid=1, max_points_per_centroid=max(len(x), 1),
    )
    km.train(x)
    _, assignment = km.index.search(x, 1)
    return torch.from_numpy(assignment[:, 0].astype(np.int64)), torch.from_numpy(km.centroids.copy())


def cluster_grid(features: torch.Tensor, height: int, width: int, k: int, seed: int,
                 restarts: int = 5, iters: int = 50, gpu: bool = False) -> Clusters:
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
