"""Rectified flow: teachers, pairs, reflow and distillation."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from flowmatch.errors import UserError
from flowmatch.metrics import format_table, straightness
from flowmatch.reflow import PairsDataset, generate_pairs
from flowmatch.runs import load_run
from flowmatch.teachers import DiffusersTeacher, FlowTeacher, make_teacher

from helpers import TINY, one_line_error


def _shards(d):
    return {p.name: load_file(p) for p in sorted(d.glob("shard-*.safetensors"))}


def test_diffusers_teacher_is_deterministic_and_pairs_repeat(ddpm_dir, tmp_path):
    teacher = make_teacher(f"diffusers:{ddpm_dir}", nfe=4)
    assert isinstance(teacher, DiffusersTeacher) and teacher.shape == (1, 8, 8)
    z0 = torch.randn(6, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    a, b = teacher(z0), teacher(z0)
    assert torch.equal(a, b) and not torch.equal(a, z0)
    # per-sample deterministic: a sample does not depend on its batch-mates
    torch.testing.assert_close(teacher(z0[:2]), a[:2], atol=1e-5, rtol=1e-5)
    one = _shards(generate_pairs(teacher, 10, tmp_path / "p1", shard_size=4, seed=3, progress=False))
    two = _shards(generate_pairs(teacher, 10, tmp_path / "p2", shard_size=4, seed=3, progress=False))
    assert list(one) == ["shard-00000.safetensors", "shard-00001.safetensors", "shard-00002.safetensors"]
    for k in one:
        assert torch.equal(one[k]["z0"], two[k]["z0"]) and torch.equal(one[k]["z1"], two[k]["z1"])
    assert one["shard-00002.safetensors"]["z0"].shape == (2, 1, 8, 8)
    # the teacher takes a shard in pieces of its batch_size: the same pairs as the whole shard at once
    teacher.batch_size = 3
    three = _shards(generate_pairs(teacher, 10, tmp_path / "p3", shard_size=4, seed=3, progress=False))
    for k in one:
        assert torch.equal(one[k]["z0"], three[k]["z0"])
        torch.testing.assert_close(three[k]["z1"], teacher(three[k]["z0"]), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(three[k]["z1"], one[k]["z1"], atol=1e-5, rtol=1e-5)


def test_ddim_eta0_matches_a_hand_written_deterministic_loop(ddpm_dir):
    """The teacher equals DDIM with eta = 0 written out from the scheduler's alphas."""
    from diffusers import DDIMScheduler, UNet2DModel

    teacher = make_teacher(f"diffusers:{ddpm_dir}", nfe=5, device="cpu")
    assert teacher.describe()["clipped_eps"] is True
    raw = DiffusersTeacher(ddpm_dir, steps=5, device="cpu", clipped_eps=False)
    unet = UNet2DModel.from_pretrained(ddpm_dir / "unet").eval()
    sched = DDIMScheduler.from_pretrained(ddpm_dir / "scheduler", timestep_spacing="trailing")
    sched.set_timesteps(5)
    assert sched.timesteps.tolist() == [99, 79, 59, 39, 19]  # trailing: the first step starts from pure noise
    ac = sched.alphas_cumprod
    z = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    ts = sched.timesteps.tolist()
    for clipped, got in ((True, teacher(z)), (False, raw(z))):
        x = z
        with torch.no_grad():
            for i, t in enumerate(ts):
                prev = ts[i + 1] if i + 1 < len(ts) else -1
                a_t, a_prev = ac[t], (ac[prev] if prev >= 0 else sched.final_alpha_cumprod)
                eps = unet(x, t).sample
                x0 = ((x - (1 - a_t).sqrt() * eps) / a_t.sqrt()).clamp(-1, 1)  # the DDPM config clips x0
                if clipped:  # go on with the noise the clipped x0 implies
                    eps = (x - a_t.sqrt() * x0) / (1 - a_t).sqrt()
                x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps  # eta = 0: no fresh noise
        torch.testing.assert_close(got, x, atol=1e-5, rtol=1e-4)
    # this random UNet's clean-image estimates leave [-1, 1], so the two samplers differ
    assert (teacher(z) - raw(z)).abs().max() > 1e-2
    # walk() yields the same loop's states: the noise first, each step's time, the sample last
    walked = list(teacher.walk(z))
    assert [t for t, _ in walked] == [*ts, None]
    assert torch.equal(walked[0][1], z) and torch.equal(walked[-1][1], teacher(z))


def test_one_ddim_step_is_the_clipped_data_prediction_from_pure_noise(ddpm_dir):
    """DDIM at one step maps x_T to the network's x0 prediction at t = T - 1 (clipped to [-1, 1]):
    what a one-step diffusion sample is. The saved DDPM's own "leading" spacing would start from
    t = 0 and hand back (nearly) the noise."""
    from diffusers import DDPMScheduler, UNet2DModel

    teacher = make_teacher(f"diffusers:{ddpm_dir}", nfe=1, device="cpu")
    unet = UNet2DModel.from_pretrained(ddpm_dir / "unet").eval()
    ab = DDPMScheduler.from_pretrained(ddpm_dir / "scheduler").alphas_cumprod[99]
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        x0 = ((x - (1 - ab).sqrt() * unet(x, 99).sample) / ab.sqrt()).clamp(-1, 1)
    torch.testing.assert_close(teacher(x), x0, atol=1e-5, rtol=1e-4)
    assert teacher.describe()["spacing"] == "trailing"


def test_interrupted_pair_generation_resumes_to_the_same_pairs(tiny_run, tmp_path):
    teacher = FlowTeacher(tiny_run, solver="midpoint", nfe=8)
    full = _shards(generate_pairs(teacher, 700, tmp_path / "full", shard_size=256, seed=1, progress=False))
    # an interrupted run: some shards done (as another process would do), one half-written temp file
    part = tmp_path / "part"
    generate_pairs(teacher, 700, part, shard_size=256, seed=1, progress=False, shards=[2])
    (part / ".shard-00000.safetensors.tmp.junk.safetensors").write_bytes(b"partial")
    before = (part / "shard-00002.safetensors").stat().st_mtime_ns
    resumed = _shards(generate_pairs(teacher, 700, part, shard_size=256, seed=1, progress=False))
    assert (part / "shard-00002.safetensors").stat().st_mtime_ns == before  # skipped, not redone
    assert list(resumed) == list(full)
    for k in full:
        assert torch.equal(full[k]["z0"], resumed[k]["z0"]) and torch.equal(full[k]["z1"], resumed[k]["z1"])


def test_pairs_from_another_teacher_are_refused(tiny_run, tmp_path):
    generate_pairs(FlowTeacher(tiny_run, solver="midpoint", nfe=8), 100, tmp_path / "p", shard_size=64, progress=False)
    with pytest.raises(UserError, match=r"another teacher or settings \(teacher differ\)"):
        generate_pairs(FlowTeacher(tiny_run, solver="euler", nfe=3), 100, tmp_path / "p", shard_size=64, progress=False)


def test_pairs_stream_in_a_bounded_window(tiny_run, tmp_path):
    d = generate_pairs(FlowTeacher(tiny_run, solver="euler", nfe=2), 1000, tmp_path / "p", shard_size=100, progress=False)
    ds = PairsDataset(str(d), max_bytes=3 * 2 * 4 * 100 * 2)  # room for three shards
    assert ds.window == 3
    g = torch.Generator().manual_seed(0)
    all_z0 = torch.cat([load_file(p)["z0"] for p in sorted(d.glob("shard-*"))])
    seen = set()
    for _ in range(40):
        b = ds.sample(50, g)
        assert len(ds._resident[1]) <= 300
        assert b.x0.shape == (50, 2) and b.x1.shape == (50, 2)
        seen.update(torch.cdist(b.x0, all_z0).argmin(1).tolist())
    assert len(seen) > 600  # the window moved through most shards
    # the window's position is restored from the trainer state
    ds2 = PairsDataset(str(d), max_bytes=3 * 2 * 4 * 100 * 2)
    ds2.load_state_dict(ds.state_dict())
    g2 = torch.Generator().manual_seed(5)
    g.manual_seed(5)
    assert torch.equal(ds.sample(50, g).x0, ds2.sample(50, g2).x0)


def test_gaussian_to_gaussian_reflow_is_straight(cli, tmp_path):
    rng = np.random.default_rng(0)
    data = rng.normal(size=(4000, 2)) @ np.array([[2.5, 0.0], [1.5, 0.4]]) + np.array([3.0, -2.0])
    np.save(tmp_path / "g.npy", data)
    args = ["--batch-size", "256", "--width", "64", "--depth", "3", "--no-progress", "--no-plots"]
    rc, _, err = cli("train", "--data", tmp_path / "g.npy", "--steps", "1500", "--lr", "2e-3", "--out", tmp_path / "rf1",
                     *args)
    assert rc == 0, err
    rc, _, err = cli("reflow", tmp_path / "rf1", "--out", tmp_path / "rf2", "--pairs", "8000", "--steps", "1500",
                     "--lr", "1e-3", "--batch-size", "256", "--tol", "1e-4", "--no-progress", "--no-plots")
    assert rc == 0, err
    rf1, rf2 = load_run(tmp_path / "rf1"), load_run(tmp_path / "rf2")
    x0 = torch.randn(2000, 2, generator=torch.Generator().manual_seed(1)).to(rf1.device)
    s1 = straightness(rf1.velocity, x0)
    s2 = straightness(rf2.velocity, x0)
    assert s1 > 0.05  # the 1-rectified flow between these Gaussians is curved
    assert s2 < 0.2 * s1 and s2 < 0.02
    lineage = json.loads((tmp_path / "rf2" / "config.json").read_text())["train"]["lineage"]
    assert lineage["kind"] == "reflow" and lineage["k"] == 2 and lineage["pairs"] == 8000


def test_distilled_run_samples_in_one_step(cli, tiny_run, tmp_path):
    rc, _, err = cli("distill", tiny_run, "--out", tmp_path / "d", "--pairs", "512", "--steps", "30", "--teacher-nfe",
                     "4", "--shard-size", "256", "--no-progress", "--no-plots")
    assert rc == 0, err
    cfg = json.loads((tmp_path / "d" / "config.json").read_text())["train"]
    assert cfg["time_dist"] == "grid" and cfg["time_steps"] == 1 and cfg["lineage"]["kind"] == "distill"
    rc, _, err = cli("sample", tmp_path / "d", "--nfe", "1", "--n", "64", "--out", tmp_path / "x.npy", "--no-progress")
    assert rc == 0, err
    assert np.load(tmp_path / "x.npy").shape == (64, 2)
    # eval measures the map at its steps, and neither integrates it to a tolerance nor walks it
    # along 100 steps for straightness: it is not a velocity field
    rc, out, err = cli("eval", tmp_path / "d", "--nfe", "1,2", "--n", "200", "--repeats", "1", "--json")
    assert rc == 0, err
    res = json.loads(out)
    assert set(res["nfe"]) == {"1", "2"} and res["map_steps"] == 1
    assert "adaptive" not in res and "straightness" not in res
    rows = [line.split()[0] for line in format_table(res).splitlines()]
    assert "dopri5" not in rows and "straightness" not in rows and "distilled 1-step map" in format_table(res)
    # a velocity-field run keeps both
    rc, out, err = cli("eval", tiny_run, "--nfe", "1", "--n", "200", "--repeats", "1", "--json")
    assert rc == 0, err
    res = json.loads(out)
    assert "map_steps" not in res and res["adaptive"]["nfe"] > 0 and "straightness" in res


def test_students_take_the_recipe_for_their_teachers_data(cli, tiny_run, tmp_path):
    """Pairs, steps, batch and the teacher's budget left unset come from STUDENT_RECIPES by the teacher's
    samples (images: 2000 pairs of 16 midpoint steps, 500 steps at batch 64, and a class-conditional
    teacher's pairs at guidance 1.5, a fifth without a class; vectors: 20000 dopri5 pairs, 4000 steps at
    batch 512, unconditional); what is given is kept, and --teacher-nfe 0 asks for dopri5."""
    from flowmatch.config import StudentOptions

    assert StudentOptions().resolve((2,)) == StudentOptions(pairs=20000, teacher_nfe=0, steps=4000, batch_size=512)
    assert StudentOptions().resolve((2,), num_classes=3).guidance is None
    assert StudentOptions(pairs=7, batch_size=8).resolve((1, 28, 28)) == StudentOptions(pairs=7, teacher_nfe=16, steps=500,
                                                                                          batch_size=8)
    assert StudentOptions().resolve((1, 28, 28), num_classes=10).guidance == 1.5
    assert StudentOptions(guidance=2.0).resolve((1, 28, 28), num_classes=10).guidance == 2.0
    rc, _, err = cli("train", "--data", "digits", "--steps", "2", "--batch-size", "4", "--out", tmp_path / "img",
                     "--no-progress", "--no-plots")
    assert rc == 0, err
    budgets = {(run, nfe): (t.solver, t.nfe) for run in (tiny_run, tmp_path / "img") for nfe in (None, 0, 5, 8)
               for t in [make_teacher(run, nfe=nfe)]}
    assert budgets == {(tiny_run, None): ("dopri5", None), (tmp_path / "img", None): ("midpoint", 16),
                       **{(run, 0): ("dopri5", None) for run in (tiny_run, tmp_path / "img")},
                       **{(run, 5): ("euler", 5) for run in (tiny_run, tmp_path / "img")},
                       **{(run, 8): ("midpoint", 8) for run in (tiny_run, tmp_path / "img")}}
    rc, _, err = cli("distill", tmp_path / "img", "--pairs", "8", "--steps", "2", "--out", tmp_path / "d", "--no-progress",
                     "--no-plots")
    assert rc == 0, err
    cfg = json.loads((tmp_path / "d" / "config.json").read_text())["train"]
    assert (cfg["steps"], cfg["batch_size"], cfg["lineage"]["pairs"]) == (2, 64, 8)
    assert (cfg["lineage"]["teacher"]["solver"], cfg["lineage"]["teacher"]["nfe"]) == ("midpoint", 16)
    # the digits have classes: the pairs have them too (guidance 1.5), two of the eight without one
    meta = json.loads((tmp_path / "d" / "pairs" / "pairs.json").read_text())
    labels = load_file(tmp_path / "d" / "pairs" / "shard-00000.safetensors")["label"]
    assert (meta["guidance"], meta["null_share"], int((labels < 0).sum())) == (1.5, 0.2, 2)
    # --null-share 1: every pair the teacher's unconditional map
    rc, _, err = cli("distill", tmp_path / "img", "--pairs", "8", "--steps", "1", "--null-share", "1", "--out", tmp_path / "u",
                     "--no-progress", "--no-plots")
    assert rc == 0, err
    pairs = load_file(tmp_path / "u" / "pairs" / "shard-00000.safetensors")
    assert (pairs["label"] < 0).all()
    torch.testing.assert_close(pairs["z1"], make_teacher(tmp_path / "img")(pairs["z0"]))
    assert "a number of DDIM steps" in one_line_error(*cli("distill", "--teacher", "diffusers:x", "--teacher-nfe", "0",
                                                           "--out", tmp_path / "dd")[::2])


def test_bad_reflow_input(cli, tiny_run, ddpm_dir, tmp_path):
    out = tmp_path / "out"
    assert "not a run directory" in one_line_error(*cli("reflow", tmp_path / "nope", "--out", out)[::2])
    assert "diffusers" in one_line_error(*cli("reflow", "--teacher", f"diffusers:{tmp_path}", "--out", out)[::2])
    assert "not both" in one_line_error(*cli("reflow", tiny_run, "--teacher", f"diffusers:{ddpm_dir}", "--out", out)[::2])
    assert "--pairs" in one_line_error(*cli("reflow", tiny_run, "--pairs", "0", "--out", out)[::2])
    assert not out.exists()
    # a student whose pairs came from another teacher
    rc, _, err = cli("reflow", tiny_run, "--out", out, "--pairs", "64", "--steps", "2", "--teacher-nfe", "2",
                     "--no-progress", "--no-plots", "--shard-size", "32")
    assert rc == 0, err
    for name in ("trainer_state.pt", "model.safetensors", "ema.safetensors"):  # as if killed before a checkpoint
        (out / name).unlink()
    line = one_line_error(*cli("reflow", tiny_run, "--out", out, "--pairs", "64", "--teacher-nfe", "4", "--resume",
                          "--no-progress", "--shard-size", "32")[::2])
    assert "another teacher" in line
    # a damaged shard names its file
    shard = out / "pairs" / "shard-00001.safetensors"
    from safetensors.torch import save_file

    save_file({"z0": torch.zeros(3, 5), "z1": torch.zeros(3, 5)}, shard)
    line = one_line_error(*cli("reflow", tiny_run, "--out", out, "--pairs", "64", "--teacher-nfe", "2", "--resume",
                          "--no-progress", "--shard-size", "32", "--steps", "2")[::2])
    assert "shard-00001" in line


@pytest.mark.parametrize("objective", ["meanflow", "shortcut"])
def test_distilling_a_one_step_run_is_refused_before_anything_is_written(cli, tmp_path, objective):
    """A one-step run's student would train only at the grid's times with no interval, while it
    samples by the interval's average velocity: refused in one line naming the run, nothing written.
    Reflowing it stays open (the objective trains its intervals on the pairs' straight paths)."""
    run = tmp_path / objective
    rc, _, err = cli("train", "--objective", objective, "--steps", "2", "--batch-size", "32", "--out", run,
                     "--no-plots", *TINY)
    assert rc == 0, err
    out = tmp_path / "d"
    line = one_line_error(*cli("distill", run, "--out", out, "--pairs", "16", "--steps", "2", "--teacher-nfe", "2",
                               "--no-progress")[::2])
    assert str(run) in line and objective in line and "one step" in line
    assert not out.exists()
    rc, _, err = cli("reflow", run, "--out", tmp_path / "r", "--pairs", "16", "--steps", "2", "--teacher-nfe", "2",
                     "--batch-size", "8", "--no-progress", "--no-plots")
    assert rc == 0, err
    assert load_run(tmp_path / "r").cfg.objective == objective


def test_teacher_run_must_exist_and_shapes_must_agree(tmp_path, tiny_run):
    with pytest.raises(UserError, match="not a run directory"):
        make_teacher(tmp_path / "nope")
    with pytest.raises(UserError, match="needs a number"):
        FlowTeacher(tiny_run, solver="euler", nfe=None)
