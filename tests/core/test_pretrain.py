import torch

from fewstep.core.models import ModuleDenoiser
from fewstep.core.paths import make_path
from fewstep.core.pretrain import train_denoiser
from fewstep.core.training import TensorData


class Net(torch.nn.Module):
    """Records the conditions it sees; conditions are (B, P, 3) point sets."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(2, 2)
        self.seen = []

    def forward(self, x, t, cond):
        self.seen.append(cond.detach().clone())
        return self.lin(x) + cond.mean((1, 2))[:, None]


def test_condition_dropout_handles_multi_dimensional_conditions():
    net = Net()
    model = ModuleDenoiser(net, make_path("rectified_flow"), "velocity")
    x, cond = torch.randn(64, 2), torch.ones(64, 5, 3)
    train_denoiser(
        model,
        TensorData(x, cond),
        steps=3,
        batch_size=32,
        cond_dropout=0.5,
        null_cond=torch.zeros_like,
        progress=False,
    )
    seen = torch.cat(net.seen)
    dropped = (seen == 0).all(dim=(1, 2))
    assert ((seen == 1).all(dim=(1, 2)) | dropped).all(), "a whole condition is kept or nulled"
    assert 0.2 < dropped.float().mean() < 0.8


class DictNet(torch.nn.Module):
    """Records dict conditions {"labels", "control"}."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(2, 2)
        self.seen = []

    def forward(self, x, t, cond):
        self.seen.append({k: v.detach().clone() for k, v in cond.items()})
        return self.lin(x) + cond["control"].mean(1, keepdim=True)


def test_dict_conditions_are_drawn_together_and_dropped_as_null_cond_says():
    """TensorData keeps each sample's entries aligned; dropout nulls the label and, as this
    null_cond asks, keeps the control."""
    net = DictNet()
    model = ModuleDenoiser(net, make_path("rectified_flow"), "velocity")
    n = 64
    labels = torch.arange(n)
    control = labels[:, None].float().expand(n, 4).clone()  # row i holds i: alignment check
    train_denoiser(
        model,
        TensorData(torch.randn(n, 2), {"labels": labels, "control": control}),
        steps=3,
        batch_size=32,
        cond_dropout=0.5,
        null_cond=lambda c: {**c, "labels": torch.full_like(c["labels"], -1)},
        progress=False,
    )
    lab = torch.cat([s["labels"] for s in net.seen])
    ctl = torch.cat([s["control"] for s in net.seen])
    kept = lab >= 0
    assert 0.2 < (~kept).float().mean() < 0.8
    assert (ctl[kept, 0] == lab[kept].float()).all()  # label and control of the same sample
    assert (ctl == ctl[:, :1]).all() and (ctl >= 0).all()  # control never dropped


def test_tensor_data_rejects_a_condition_of_the_wrong_length():
    import pytest

    with pytest.raises(ValueError, match="control has 3"):
        TensorData(torch.randn(4, 2), {"labels": torch.zeros(4), "control": torch.zeros(3, 2)})
