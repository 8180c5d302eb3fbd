"""Classification metrics: acc@5 only where it can be below 100 %."""

import torch

from vitlab.eval.classification import classification_metrics, metrics_line


def test_acc_at_5_is_reported_only_with_more_than_5_classes() -> None:
    gen = torch.Generator().manual_seed(0)
    for classes, has_acc5 in ((3, False), (5, False), (6, True)):
        metrics = classification_metrics(torch.randn(40, classes, generator=gen), torch.arange(40) % classes)
        assert ("acc5" in metrics) == has_acc5 and ("acc@5" in metrics_line(metrics)) == has_acc5
        assert metrics_line(metrics).startswith(f"acc@1 {100 * metrics['acc1']:.2f} %")
