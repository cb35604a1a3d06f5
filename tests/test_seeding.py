"""Where draws come from: named streams of the user's seed (flowmatch.seeding), one rule shared by
sampling, likelihood and teacher pairs; streams that share nothing."""

import pytest
import torch
from safetensors.torch import load_file

from flowmatch import seeding
from flowmatch.reflow import generate_pairs, shard_draws
from flowmatch.runs import load_run
from flowmatch.solvers import integrate
from flowmatch.teachers import FlowTeacher


@pytest.mark.parametrize("seed, k", [(0, 0), (3, 2), (7, 12)])
def test_a_streams_draw_is_randn_from_its_mixed_seed(seed, k):
    import numpy as np

    mixed = int(np.random.SeedSequence([seed, seeding.STREAMS["sample"], k]).generate_state(1, np.uint64)[0] >> np.uint64(1))
    assert seeding.seed_of(seed, "sample", k) == mixed
    expected = torch.randn(5, 2, 3, generator=torch.Generator().manual_seed(mixed))
    assert torch.equal(seeding.noise(seed, k, 5, (2, 3)), expected)
    assert torch.equal(shard_draws(k, 5, (2, 3), seed)[0], expected)  # a teacher's shard k: sampling batch k's noise


def test_streams_and_indices_share_no_draws():
    seeds = {seeding.seed_of(s, stream, k) for s in range(3) for stream in seeding.STREAMS for k in range(3)}
    assert len(seeds) == 3 * len(seeding.STREAMS) * 3
    assert all(0 <= s < 2**63 for s in seeds)  # what torch.Generator.manual_seed takes
    with pytest.raises(ValueError, match="stream must be one of"):
        seeding.seed_of(0, "nope", 1)


def test_samples_and_teacher_pairs_start_from_the_batch_noise(tiny_run, tmp_path):
    run = load_run(tiny_run, device="cpu")
    sizes = (4, 4, 2)
    expected = [run.dataset.decode(integrate(run.velocity, seeding.noise(3, k, m, run.shape), "euler", 2).x)
                for k, m in enumerate(sizes)]
    assert torch.equal(run.sample(10, nfe=2, seed=3, batch_size=4), torch.cat(expected))
    teacher = FlowTeacher(tiny_run, solver="euler", nfe=2, device="cpu")
    pairs = generate_pairs(teacher, 10, tmp_path / "pairs", shard_size=4, seed=3, progress=False)
    for k, m in enumerate(sizes):
        assert torch.equal(load_file(pairs / f"shard-{k:05d}.safetensors")["z0"], seeding.noise(3, k, m, run.shape))
