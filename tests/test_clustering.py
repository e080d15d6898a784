"""Step 5: faiss k-means of the feature grid into at most K masks."""

import torch

from emerdiff.clustering import cluster_grid


def blobs() -> torch.Tensor:
    """A 4 x 6 grid of 8-d features: three well-separated groups of columns (0-1, 2-3, 4-5)."""
    generator = torch.Generator().manual_seed(0)
    centres = torch.eye(8)[:3] * 10
    column_group = torch.tensor([0, 0, 1, 1, 2, 2])
    features = centres[column_group].expand(4, 6, 8) + 0.01 * torch.randn(4, 6, 8, generator=generator)
    return features.reshape(24, 8)


def test_separated_groups_become_masks_with_their_mean_feature():
    features = blobs()
    clusters = cluster_grid(features, 4, 6, k=3, seed=0)
    assert clusters.labels.shape == (4, 6) and clusters.masks.shape == (3, 4, 6)
    for mask, embedding in zip(clusters.masks, clusters.embeddings):
        torch.testing.assert_close(embedding, features[mask.flatten()].mean(0))
        columns = mask.any(0).nonzero().flatten().tolist()
        assert columns in ([0, 1], [2, 3], [4, 5])  # a mask is exactly one group of columns, all rows
        assert mask[:, columns].all()


def test_the_same_seed_gives_the_same_masks_and_empty_clusters_are_dropped():
    features = blobs()
    assert torch.equal(cluster_grid(features, 4, 6, 3, seed=7).labels, cluster_grid(features, 4, 6, 3, seed=7).labels)
    few = cluster_grid(features[:, :1].repeat(1, 8) * 0, 4, 6, k=5, seed=0)  # identical features: one cluster
    assert len(few.centroids) == 1 and few.labels.eq(0).all()
