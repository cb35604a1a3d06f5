"""The training losses: MSE (the conditional flow-matching loss) and pseudo-Huber, whose
minimiser on fixed pairs is a median rather than a mean."""

import pytest
import torch

from flowmatch.config import TrainConfig
from flowmatch.errors import UserError
from flowmatch.objectives import Loss, cfm_loss
from flowmatch.paths import LinearPath


class Constant(torch.nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.v = torch.nn.Parameter(torch.zeros(dim))

    def forward(self, x, t):
        return self.v.expand_as(x)


def test_pseudo_huber_matches_its_formula():
    g = torch.Generator().manual_seed(0)
    x0, x1, t = torch.randn(8, 3, generator=g), torch.randn(8, 3, generator=g), torch.rand(8, generator=g)
    model = Constant(3)
    with torch.no_grad():
        model.v.copy_(torch.tensor([0.1, -0.2, 0.3]))
    d2 = (model.v - (x1 - x0)).pow(2).sum(1)
    c = 0.00054 * 3**0.5
    torch.testing.assert_close(cfm_loss(model, LinearPath(), x0, x1, t, loss=Loss("pseudo-huber")), ((d2 + c**2).sqrt() - c).mean())
    torch.testing.assert_close(cfm_loss(model, LinearPath(), x0, x1, t, loss=Loss("pseudo-huber", huber_c=2.0)),
                               ((d2 + 4.0).sqrt() - 2.0).mean())
    torch.testing.assert_close(cfm_loss(model, LinearPath(), x0, x1, t), (d2 / 3).mean())


@pytest.mark.parametrize("loss,expected", [("mse", 0.4), ("pseudo-huber", 0.0)])
def test_a_constant_fit_to_two_cells_lands_between_them_under_mse_and_on_one_under_pseudo_huber(loss, expected):
    """Targets 0 (three pairs) and 1 (two pairs): MSE's minimiser is their mean 0.4, in the
    gap; pseudo-Huber's is their median 0, on the data."""
    x0 = torch.zeros(5, 1)
    x1 = torch.tensor([[0.0], [0.0], [0.0], [1.0], [1.0]])
    model = Constant(1)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(1500):
        opt.zero_grad()
        cfm_loss(model, LinearPath(), x0, x1, torch.zeros(5), loss=Loss(loss)).backward()
        opt.step()
    assert model.v.item() == pytest.approx(expected, abs=0.02)


def test_unknown_loss_is_refused():
    with pytest.raises(UserError, match="loss"):
        TrainConfig(loss="l3").validate()
    with pytest.raises(UserError, match="huber_c"):
        TrainConfig(huber_c=0.0).validate()
