import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from zsq_plugins import evaluate


class FixedLogits(nn.Module):
    """Predicts class ``x[:, 0]`` (inputs carry the answer), with a chosen confidence."""

    def __init__(self, num_classes: int = 3, scale: float = 5.0, shift: int = 0) -> None:
        super().__init__()
        self.num_classes, self.scale, self.shift = num_classes, scale, shift

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        classes = (x[:, 0].long() + self.shift) % self.num_classes
        return self.scale * nn.functional.one_hot(classes, self.num_classes).float()


def test_top1_counts_correct_predictions():
    inputs = torch.tensor([[0.0], [1.0], [2.0], [1.0]])
    labels = torch.tensor([0, 1, 0, 1])
    result = evaluate(FixedLogits(), TensorDataset(inputs, labels), progress=False, batch_size=3)
    assert result.num_samples == 4
    assert result.top1 == pytest.approx(75.0)
    assert result.agreement is None and result.kl is None


def test_agreement_and_kl_against_reference():
    inputs = torch.tensor([[0.0], [1.0], [2.0], [1.0]])
    same = evaluate(FixedLogits(), inputs, reference=FixedLogits(), progress=False)
    assert same.top1 is None
    assert same.agreement == 100.0 and same.kl == pytest.approx(0.0, abs=1e-7)

    shifted = evaluate(FixedLogits(shift=1), inputs, reference=FixedLogits(), progress=False)
    assert shifted.agreement == 0.0

    softer = evaluate(FixedLogits(scale=1.0), inputs, reference=FixedLogits(), progress=False)
    p = torch.softmax(torch.tensor([5.0, 0, 0]), 0)
    q = torch.softmax(torch.tensor([1.0, 0, 0]), 0)
    assert softer.agreement == 100.0
    assert softer.kl == pytest.approx((p * (p / q).log()).sum().item(), rel=1e-5)


def test_accepts_loaders_and_batch_lists():
    inputs = torch.tensor([[0.0], [1.0], [2.0]])
    labels = torch.tensor([0, 1, 2])
    loader = DataLoader(TensorDataset(inputs, labels), batch_size=2)
    assert evaluate(FixedLogits(), loader, progress=False).top1 == 100.0
    assert evaluate(FixedLogits(), [(inputs, labels)], progress=False).top1 == 100.0


def test_empty_or_partly_labelled_data_raise():
    with pytest.raises(ValueError, match="no samples"):
        evaluate(FixedLogits(), [], progress=False)
    batches = [(torch.tensor([[0.0]]), torch.tensor([0])), torch.tensor([[1.0]])]
    with pytest.raises(ValueError, match="carried labels"):
        evaluate(FixedLogits(), batches, progress=False)
    with pytest.raises(TypeError, match="tensors or"):
        evaluate(FixedLogits(), [{"x": 1}], progress=False)


def test_progress_bar_can_be_turned_off(capsys):
    evaluate(FixedLogits(), torch.tensor([[0.0]]), progress=False)
    assert capsys.readouterr().err == ""
