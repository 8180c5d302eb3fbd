"""The confusion matrix a classification run draws at its end."""

import torch

from vitlab.eval.figures import confusion_matrix, save_confusion_matrix


def test_confusion_matrix_counts_true_rows_against_predicted_columns():
    labels = torch.tensor([0, 0, 1, 2, 2, 2])
    logits = torch.nn.functional.one_hot(torch.tensor([0, 1, 1, 2, 2, 0]), 3).float()
    assert confusion_matrix(logits, labels).tolist() == [[1, 1, 0], [0, 1, 0], [1, 0, 2]]


def test_the_png_is_drawn_for_few_and_for_many_classes(tmp_path):
    for classes in (3, 100):
        logits, labels = torch.randn(500, classes), torch.randint(0, classes, (500,))
        path = save_confusion_matrix(tmp_path / f"cm{classes}.png", logits, labels, [f"c{i}" for i in range(classes)])
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
