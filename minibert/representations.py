"""What the sentence vectors ([CLS], or mean-pooled) look like: alignment and uniformity (Wang &
Isola 2020, §4.1), k-nearest-neighbour accuracy, and a 2-D PCA picture.

Embeddings are L2-normalised first, as both measures are defined on the unit sphere. Here a
positive pair is two sentences of the same scenario: alignment says how close those sit
(lower is tighter), uniformity how evenly all sentences spread (lower is more uniform).
"""

import torch
import torch.nn.functional as F


@torch.no_grad()
def embed(model, encoded, batch_size=256):
    """The sentence vectors the head reads, of an encoded split, (N, H), in its order."""
    model.eval()
    out = torch.empty(len(encoded), model.encoder.config.hidden_size)
    for index in torch.argsort(encoded.lengths).split(batch_size):
        input_ids, attention_mask, _ = encoded.batch(index)
        out[index] = model.embed(input_ids, attention_mask).float()
    return out


def alignment(z, labels, alpha=2):
    """E over same-label pairs of ||z_i - z_j||^alpha."""
    z = F.normalize(z, dim=-1)
    same = (labels[:, None] == labels[None, :]) & ~torch.eye(len(z), dtype=torch.bool)
    return (torch.cdist(z, z)[same] ** alpha).mean().item()


def uniformity(z, t=2):
    """log E over all pairs of exp(-t ||z_i - z_j||²)."""
    z = F.normalize(z, dim=-1)
    return torch.pdist(z).pow(2).mul(-t).exp().mean().log().item()


def knn_accuracy(train_z, train_labels, test_z, test_labels, k=10):
    """Majority vote of the k most cosine-similar training sentences."""
    sims = F.normalize(test_z, dim=-1) @ F.normalize(train_z, dim=-1).T  # (N_test, N_train)
    neighbours = train_labels[sims.topk(k, dim=1).indices]  # (N_test, k)
    votes = F.one_hot(neighbours, int(train_labels.max()) + 1).sum(1)
    return (votes.argmax(1) == test_labels).float().mean().item()


def pca_2d(z):
    z = z - z.mean(0)
    _, _, v = torch.linalg.svd(z, full_matrices=False)
    return z @ v[:2].T  # (N, 2)


def plot(points, labels, names, path, title):
    """Save a scatter plot; returns False (and draws nothing) when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(8, 7))
    cmap = plt.get_cmap("tab20")
    for i, name in enumerate(names):
        at = labels == i
        ax.scatter(points[at, 0], points[at, 1], s=4, color=cmap(i % 20), label=name)
    ax.set_title(title)
    ax.legend(markerscale=3, fontsize=7, ncol=2, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
