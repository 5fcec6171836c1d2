"""Weighted k-nearest-neighbour classification on frozen features (DINO's `knn_classifier`).

Features are L2-normalized, so the dot product is the cosine similarity. Each test sample takes its
k most similar training samples; each neighbour votes for its class with weight exp(sim / T).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.no_grad()
def knn_predict(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor,
                k: int = 20, temperature: float = 0.07, num_classes: int | None = None,
                chunk: int = 1024) -> torch.Tensor:
    """train_feats [N, D], train_labels [N] int64, test_feats [M, D] -> predicted labels [M] int64.

    k is capped at N. Ties between classes go to the lower class index (argmax's choice).
    """
    if train_feats.dim() != 2 or test_feats.dim() != 2 or train_feats.shape[1] != test_feats.shape[1]:
        raise ValueError(f"features must be [N, D] and [M, D], got {tuple(train_feats.shape)} and "
                         f"{tuple(test_feats.shape)}")
    if train_labels.shape != (train_feats.shape[0],):
        raise ValueError(f"train_labels must be [{train_feats.shape[0]}], got {tuple(train_labels.shape)}")
    if k < 1 or temperature <= 0:
        raise ValueError(f"k must be >= 1 and temperature > 0, got k={k}, temperature={temperature}")
    C = int(num_classes if num_classes is not None else train_labels.max().item() + 1)
    k = min(k, train_feats.shape[0])
    train = F.normalize(train_feats.float(), dim=1)
    test = F.normalize(test_feats.float(), dim=1)
    preds = []
    for i in range(0, test.shape[0], chunk):
        sim = test[i:i + chunk] @ train.T                       # [m, N] cosine similarities
        top_sim, top_idx = sim.topk(k, dim=1)                   # [m, k]
        weights = (top_sim / temperature).exp()
        votes = torch.zeros(sim.shape[0], C, dtype=weights.dtype, device=weights.device)
        votes.scatter_add_(1, train_labels[top_idx], weights)   # sum weights per class
        preds.append(votes.argmax(dim=1))
    return torch.cat(preds)


def knn_accuracy(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor,
                 test_labels: torch.Tensor, k: int = 20, temperature: float = 0.07,
                 num_classes: int | None = None) -> float:
    """Top-1 accuracy in [0, 1] of `knn_predict` on the test set."""
    pred = knn_predict(train_feats, train_labels, test_feats, k, temperature, num_classes)
    return (pred == test_labels).float().mean().item()
