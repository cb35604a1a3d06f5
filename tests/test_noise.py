"""The noise of batch k: one seed rule shared by sampling, likelihood and teacher pairs."""

import pytest
import torch
from safetensors.torch import load_file

from flowmatch.noise import batch_generator, batch_noise
from flowmatch.reflow import generate_pairs, shard_noise
from flowmatch.runs import load_run
from flowmatch.solvers import integrate
from flowmatch.teachers import FlowTeacher


@pytest.mark.parametrize("seed, k", [(0, 0), (3, 2), (7, 12)])
def test_batch_noise_is_randn_from_the_batch_seed(seed, k):
    expected = torch.Generator().manual_seed(seed * 1_000_003 + k)
    assert torch.equal(batch_noise(seed, k, 5, (2, 3)), torch.randn(5, 2, 3, generator=expected))
    assert batch_generator(seed, k).initial_seed() == seed * 1_000_003 + k
    assert torch.equal(shard_noise(k, 5, (2, 3), seed), batch_noise(seed, k, 5, (2, 3)))


def test_samples_and_teacher_pairs_start_from_the_batch_noise(tiny_run, tmp_path):
    run = load_run(tiny_run, device="cpu")
    sizes = (4, 4, 2)
    expected = [run.dataset.decode(integrate(run.velocity, batch_noise(3, k, m, run.shape), "euler", 2).x)
                for k, m in enumerate(sizes)]
    assert torch.equal(run.sample(10, nfe=2, seed=3, batch_size=4), torch.cat(expected))
    teacher = FlowTeacher(tiny_run, solver="euler", nfe=2, device="cpu")
    pairs = generate_pairs(teacher, 10, tmp_path / "pairs", shard_size=4, seed=3, progress=False)
    for k, m in enumerate(sizes):
        assert torch.equal(load_file(pairs / f"shard-{k:05d}.safetensors")["z0"], batch_noise(3, k, m, run.shape))
