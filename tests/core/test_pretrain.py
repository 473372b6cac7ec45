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
