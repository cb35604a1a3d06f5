"""The MLP's input features: random Fourier features of x and the time embedding's scale."""

import math

import pytest
import torch

from flowmatch.config import TrainConfig
from flowmatch.errors import UserError
from flowmatch.models import MLP, make_model


def test_fourier_features_are_sines_of_fixed_projections():
    """The first layer sees [x, sin(2 pi x B), cos(2 pi x B)] with B ~ N(0, scale^2) fixed by its
    own seed: the same B in every network, whatever the global random state."""
    torch.manual_seed(1)
    a = MLP(2, width=16, depth=1, fourier=(8, 3.0))
    torch.manual_seed(2)
    b = MLP(2, width=16, depth=1, fourier=(8, 3.0))
    assert torch.equal(a.freqs, b.freqs)
    assert a.freqs.std().item() == pytest.approx(3.0, rel=0.5)
    x = torch.randn(5, 2)
    proj = 2 * math.pi * x @ a.freqs
    feats = torch.cat([x, proj.sin(), proj.cos()], 1)
    seen = []
    a.inp.register_forward_hook(lambda m, inp, out: seen.append(inp[0]))
    a(x, torch.rand(5))
    torch.testing.assert_close(seen[0], feats)


def test_network_without_fourier_features_is_the_notebooks():
    torch.manual_seed(0)
    plain = MLP(2)
    assert sum(p.numel() for p in plain.parameters()) == 1_578_498
    assert "freqs" not in plain.state_dict()


def test_spec_carries_the_features_into_a_rebuilt_network():
    cfg = TrainConfig(fourier=16, fourier_scale=2.0, time_scale=100.0, width=32, depth=2, prediction="velocity")
    net = make_model(cfg.model_spec(), (2,))
    assert net.fourier == 16 and net.time_scale == 100.0 and net.inp.in_features == 2 + 32
    again = make_model(TrainConfig.from_dict(cfg.to_dict()).model_spec(), (2,))
    again.load_state_dict(net.state_dict())
    x, t = torch.randn(4, 2), torch.rand(4)
    torch.testing.assert_close(again(x, t), net(x, t))


@pytest.mark.parametrize("field,value", [("fourier", -1), ("fourier_scale", 0.0), ("fourier_scale", float("nan")),
                                         ("time_scale", -2.0), ("time_scale", float("inf"))])
def test_bad_feature_settings_name_the_option(field, value):
    with pytest.raises(UserError, match=f"^{field}: "):
        TrainConfig(**{field: value}).validate()


@pytest.mark.parametrize("path_name", ["linear", "cosine", "vp"])
def test_data_prediction_is_the_paths_conversion(path_name):
    """A network predicting x1 gives the velocity the path assigns to that x1-prediction, with
    sigma clipped at 0.05 near t = 1 (where the division would blow up)."""
    from flowmatch.models import DataPrediction
    from flowmatch.paths import make_path

    path = make_path(path_name)
    target = torch.randn(6, 2, generator=torch.Generator().manual_seed(0))

    class Fixed(torch.nn.Module):
        def forward(self, x, t):
            return target

    v = DataPrediction(Fixed(), path)
    x, t = torch.randn(6, 2), torch.tensor([0.0, 0.2, 0.5, 0.8, 0.9, 0.999])
    out = v(x, t)
    torch.testing.assert_close(out[:5], path.x1_to_velocity(target, x, t)[:5])
    assert torch.isfinite(out).all()


def test_data_prediction_round_trips_through_a_run_config():
    cfg = TrainConfig(prediction="data", width=16, depth=1)
    net = make_model(cfg.model_spec(), (2,), path=cfg.build_path())
    assert type(net).__name__ == "DataPrediction" and all(k.startswith("net.") for k in net.state_dict())
    with pytest.raises(UserError, match="prediction"):
        make_model(TrainConfig(prediction="eps").model_spec(), (2,))


def test_defaults_predict_data_for_vectors_and_velocity_for_images():
    assert TrainConfig().model_spec((2,))["prediction"] == "data"
    assert TrainConfig().model_spec((1, 8, 8))["prediction"] == "velocity"


def test_a_run_written_before_the_sharpness_settings_keeps_its_network():
    """config.json of an older run has no fourier/prediction keys: it rebuilds the plain MLP."""
    old = {k: v for k, v in TrainConfig().to_dict().items() if k not in ("fourier", "fourier_scale", "film", "time_scale",
                                                                         "prediction", "loss", "huber_c")}
    cfg = TrainConfig.from_dict(old)
    assert (cfg.fourier, cfg.prediction, cfg.loss) == (0, "velocity", "mse")
    assert sum(p.numel() for p in make_model(cfg.model_spec((2,)), (2,)).parameters()) == 1_578_498


def _film_params(width: int, depth: int, interval: bool = False) -> int:
    """FiLM's parameters: the sinusoids' Linear(64 or 128, 64), then Linear(64, 2 W) per block."""
    return (64 * (2 if interval else 1) * 64 + 64) + depth * (64 * 2 * width + 2 * width)


def test_film_starts_as_the_plain_mlp_of_the_same_seed():
    """FiLM's layers are made last and start at zero: the same seed gives the plain MLP's layers
    and, at init, its outputs; only the FiLM layers are added."""
    torch.manual_seed(0)
    plain = MLP(2, width=32, depth=3, fourier=8)
    torch.manual_seed(0)
    film = MLP(2, width=32, depth=3, fourier=8, film=True)
    assert sum(p.numel() for p in film.parameters()) == sum(p.numel() for p in plain.parameters()) + _film_params(32, 3)
    x, t = torch.randn(6, 2), torch.rand(6)
    torch.testing.assert_close(film(x, t), plain(x, t))


def test_film_scales_and_shifts_every_block():
    """ReLU(W h * (1 + g) + b): with g = -1 and b fixed by the FiLM layers' biases, every block
    forgets its input, and the output is the last block's ReLU(b) through the output layer."""
    torch.manual_seed(0)
    net = MLP(2, width=16, depth=2, film=True)
    shifts = [torch.randn(16) for _ in net.film]
    with torch.no_grad():
        for layer, b in zip(net.film, shifts):
            layer.bias.copy_(torch.cat([-torch.ones(16), b]))
    x, t = torch.randn(5, 2), torch.rand(5)
    want = net.out(torch.relu(shifts[-1])).expand(5, 2)
    torch.testing.assert_close(net(x, t), want)


def test_film_sees_the_interval_of_an_average_velocity_network():
    """MeanFlow's network: FiLM's sinusoids take t and the interval h, so with the additive interval
    embedding zeroed the output still depends on h, through the blocks' scales alone."""
    torch.manual_seed(0)
    net = MLP(2, width=16, depth=2, interval=True, film=True, time_scale=10.0)
    assert sum(p.numel() for p in net.parameters()) - _film_params(16, 2, interval=True) == sum(
        p.numel() for p in MLP(2, width=16, depth=2, interval=True, time_scale=10.0).parameters())
    with torch.no_grad():
        net.interval.weight.zero_()
        net.interval.bias.zero_()
        for layer in net.film:
            layer.weight.normal_()
    x, t = torch.randn(5, 2), torch.rand(5) * 0.5
    assert not torch.allclose(net(x, t, h=torch.full((5,), 0.5)), net(x, t, h=torch.zeros(5)))
    for layer in net.film:  # without FiLM the zeroed interval embedding leaves h unseen
        layer.weight.data.zero_()
    torch.testing.assert_close(net(x, t, h=torch.full((5,), 0.5)), net(x, t, h=torch.zeros(5)))


def test_film_rebuilds_from_a_run_config_and_refuses_the_unet():
    cfg = TrainConfig(film=True, width=16, depth=1)
    net = make_model(TrainConfig.from_dict(cfg.to_dict()).model_spec((2,)), (2,), path=cfg.build_path())
    assert net.net.film is not None
    assert make_model(TrainConfig(width=16, depth=1).model_spec((2,)), (2,), path=cfg.build_path()).net.film is None
    with pytest.raises(UserError, match="film"):
        make_model(TrainConfig(film=True).model_spec((1, 8, 8)), (1, 8, 8))
