"""Classification metrics (top-1, top-5, macro AUROC, loss) through torchmetrics."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchmetrics.functional.classification import multiclass_accuracy, multiclass_auroc


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """acc@1, acc@5 (acc@k for k = classes when fewer than 5), macro one-vs-rest AUROC, mean loss."""
    logits, labels = logits.float().cpu(), labels.cpu()
    num_classes = logits.shape[1]
    kwargs = dict(num_classes=num_classes, average="micro")
    return {
        "acc1": multiclass_accuracy(logits, labels, top_k=1, **kwargs).item(),
        "acc5": multiclass_accuracy(logits, labels, top_k=min(5, num_classes), **kwargs).item(),
        "auroc": multiclass_auroc(logits.softmax(-1), labels, num_classes=num_classes, average="macro").item(),
        "loss": F.cross_entropy(logits, labels).item(),
    }
