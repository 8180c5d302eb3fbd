"""Position-embedding similarity and principal components of the patch-embedding filters, against direct computation."""

import torch
import torch.nn.functional as F

from vitlab import create_model
from vitlab.inspection import patch_embedding_components, position_embedding_similarity


def test_position_similarity_is_the_cosine_of_each_pair_of_patch_embeddings():
    model = create_model("vit-ti/8", img_size=32, num_classes=3, depth=1, embed_dim=32, num_heads=2)
    sim = position_embedding_similarity(model)
    assert sim.shape == (4, 4, 4, 4)
    table = model.pos_embed[0, 1:].detach()  # the class token's slot is left out
    torch.testing.assert_close(sim[1, 2, 3, 0], F.cosine_similarity(table[1 * 4 + 2], table[3 * 4 + 0], dim=0))
    torch.testing.assert_close(sim.flatten(0, 1).flatten(1).diagonal(), torch.ones(16))


def test_sincos_embeddings_are_most_similar_to_their_row_and_column_neighbours():
    options = dict(img_size=32, num_classes=3, depth=1, embed_dim=64, num_heads=2, pos_embed="sincos", pool="gap")
    model = create_model("vit-ti/4", **options)
    sim = position_embedding_similarity(model)[3, 3]
    assert sim[3, 4] > sim[4, 4] and sim[2, 3] > sim[2, 2]  # same row/column beats the diagonal neighbour


def test_components_are_the_covariance_eigenvectors_of_the_filters():
    model = create_model("vit-ti/4", img_size=16, num_classes=3, depth=1, embed_dim=64, num_heads=2)
    components, explained = patch_embedding_components(model, count=5)
    assert components.shape == (5, 3, 4, 4)
    filters = model.patch_embed.proj.weight.detach().flatten(1)
    eigenvalues, eigenvectors = torch.linalg.eigh(torch.cov(filters.T))
    top = eigenvectors.flip(-1)[:, :5].T
    torch.testing.assert_close(components.flatten(1).abs(), top.abs(), atol=1e-4, rtol=1e-3)  # sign is arbitrary
    torch.testing.assert_close(explained, (eigenvalues.flip(-1) / eigenvalues.sum())[:5], atol=1e-5, rtol=1e-4)
