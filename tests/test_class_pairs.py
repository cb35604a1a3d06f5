"""Teacher pairs with classes: a class-conditional teacher (a flowmatch run or a diffusers UNet
with class embeddings) maps each pair's noise to a class, with classifier-free guidance, and the
student learns the classes."""

import json

import pytest
import torch
from safetensors.torch import load_file

from flowmatch.data.pairs import PairsDataset
from flowmatch.errors import UserError
from flowmatch.reflow import Classes, generate_pairs, shard_draws
from flowmatch.runs import load_run
from flowmatch.solvers import integrate
from flowmatch.teachers import FlowTeacher, make_teacher

from helpers import one_line_error, tiny_ddpm


@pytest.fixture(scope="module")
def cond_ddpm(tmp_path_factory):
    """A tiny, untrained diffusers DDPM whose UNet has 3 class embeddings (2 classes and a null),
    saved the usual way; its class embedding is scaled up so that classes change the output."""
    return tiny_ddpm(tmp_path_factory.mktemp("cddpm") / "pipe", class_embeds=3, class_scale=20)


def _ddim(d, x, steps, labels, null=None, w=1.0):
    """DDIM (eta 0, trailing) written out from the scheduler's alphas, with guidance on the noise;
    each step goes on with the noise of the clipped clean-image estimate."""
    from diffusers import DDIMScheduler, UNet2DModel

    unet = UNet2DModel.from_pretrained(d / "unet").eval()
    sched = DDIMScheduler.from_pretrained(d / "scheduler", timestep_spacing="trailing")
    sched.set_timesteps(steps)
    ac, ts = sched.alphas_cumprod, sched.timesteps.tolist()
    with torch.no_grad():
        for t in ts:
            prev = t - len(ac) // steps  # DDIM's previous time: one stride back (below 0: the final alpha)
            a_t, a_prev = ac[t], (ac[prev] if prev >= 0 else sched.final_alpha_cumprod)
            eps = unet(x, t, class_labels=labels).sample
            if null is not None:
                eps_u = unet(x, t, class_labels=null).sample
                eps = eps_u + w * (eps - eps_u)
            x0 = ((x - (1 - a_t).sqrt() * eps) / a_t.sqrt()).clamp(-1, 1)  # the DDPM config clips x0
            eps = (x - a_t.sqrt() * x0) / (1 - a_t).sqrt()  # the noise that clipped x0 implies
            x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
    return x


def test_diffusers_teacher_maps_classes_around_its_null_and_guides_on_the_noise(cond_ddpm):
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    # null class 0: the classes 0, 1 are the UNet's indices 1, 2
    teacher = make_teacher(f"diffusers:{cond_ddpm}", nfe=3, device="cpu", null_class=0)
    assert teacher.num_classes == 2 and teacher.describe()["null_class"] == 0
    label = torch.tensor([0, 1, 1, 0])
    torch.testing.assert_close(teacher(x, label), _ddim(cond_ddpm, x, 3, label + 1), atol=1e-5, rtol=1e-4)
    null = torch.zeros(4, dtype=torch.long)
    torch.testing.assert_close(teacher(x), _ddim(cond_ddpm, x, 3, null), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(teacher(x, label, 3.0), _ddim(cond_ddpm, x, 3, label + 1, null, 3.0), atol=1e-5, rtol=1e-4)
    # label -1 is the null class: guided or not, those samples are the unconditional ones
    mixed = torch.tensor([-1, 1, -1, 0])
    torch.testing.assert_close(teacher(x, mixed, 3.0)[[0, 2]], teacher(x)[[0, 2]], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(teacher(x, mixed, 3.0)[[1, 3]], teacher(x, label, 3.0)[[1, 3]], atol=1e-5, rtol=1e-4)
    # the classes matter, and guidance moves the sample further from the null's
    assert (teacher(x, label) - teacher(x)).abs().mean() > 1e-3
    assert not torch.allclose(teacher(x, label, 3.0), teacher(x, label), atol=1e-4)
    # null class last (as benchmarks/ddpm_teacher.py saves it): labels are the indices themselves
    last = make_teacher(f"diffusers:{cond_ddpm}", nfe=2, device="cpu", null_class=2)
    torch.testing.assert_close(last(x, label), _ddim(cond_ddpm, x, 2, label), atol=1e-5, rtol=1e-4)


def test_pairs_with_classes_repeat_keep_the_noise_and_balance_the_classes(cond_ddpm, tmp_path):
    teacher = make_teacher(f"diffusers:{cond_ddpm}", nfe=2, device="cpu", null_class=2)
    one = generate_pairs(teacher, 10, tmp_path / "a", shard_size=6, seed=4, progress=False, classes=Classes(2.0))
    two = generate_pairs(teacher, 10, tmp_path / "b", shard_size=6, seed=4, progress=False, classes=Classes(2.0))
    assert json.loads((one / "pairs.json").read_text())["guidance"] == 2.0
    for k, m in ((0, 6), (1, 4)):
        a, b = (load_file(d / f"shard-{k:05d}.safetensors") for d in (one, two))
        assert all(torch.equal(a[key], b[key]) for key in ("z0", "z1", "label"))
        assert torch.equal(a["z0"], shard_draws(k, m, (1, 8, 8), 4)[0])  # the same noise as pairs without classes
        assert sorted(a["label"].bincount(minlength=2).tolist()) == [m // 2, m // 2]
        torch.testing.assert_close(a["z1"], teacher(a["z0"], a["label"], 2.0))
    # the student's batches carry each pair's class
    ds = PairsDataset(str(one))
    assert ds.num_classes == 2
    both = {k: load_file(one / f"shard-{k:05d}.safetensors") for k in (0, 1)}
    z0 = torch.cat([both[k]["z0"] for k in (0, 1)])
    labels = torch.cat([both[k]["label"] for k in (0, 1)])
    batch = ds.sample(32, torch.Generator().manual_seed(0))
    idx = (batch.x0.flatten(1)[:, None] == z0.flatten(1)[None]).all(-1).float().argmax(1)
    assert torch.equal(batch.label, labels[idx])
    # other settings are other pairs
    with pytest.raises(UserError, match=r"another teacher or settings \(guidance differ\)"):
        generate_pairs(teacher, 10, one, shard_size=6, seed=4, progress=False, classes=Classes(3.0))


def test_a_class_conditional_flow_teacher_gives_a_student_with_classes(cli, tmp_path):
    rc, _, err = cli("train", "--data", "digits", "--model", "mlp", "--width", "64", "--depth", "2", "--steps", "40",
                     "--batch-size", "64", "--out", tmp_path / "t", "--no-progress", "--no-plots")
    assert rc == 0, err
    teacher = FlowTeacher(tmp_path / "t", solver="midpoint", nfe=4)
    d = generate_pairs(teacher, 40, tmp_path / "p", shard_size=20, seed=0, progress=False, classes=Classes(2.5))
    shard = load_file(d / "shard-00001.safetensors")
    run = load_run(tmp_path / "t")
    ref = integrate(run.field(shard["label"], 2.5), shard["z0"], "midpoint", 4).x
    torch.testing.assert_close(shard["z1"], ref)
    assert sorted(shard["label"].bincount(minlength=10).tolist()) == [2] * 10
    rc, _, err = cli("distill", tmp_path / "t", "--out", tmp_path / "s", "--guidance", "2.5", "--pairs", "64",
                     "--steps", "5", "--teacher-nfe", "4", "--no-progress", "--no-plots")
    assert rc == 0, err
    student = load_run(tmp_path / "s")
    assert student.num_classes == 10 and student.lineage["kind"] == "distill"
    # a fifth of the pairs (--null-share 0.2) is the teacher's unconditional map, under the null class -1; the
    # student drops no label itself: the pairs teach it both the classes and the unconditional map
    pairs = load_file(tmp_path / "s" / "pairs" / "shard-00000.safetensors")
    null = pairs["label"] < 0
    assert int(null.sum()) == round(0.2 * 64) and json.loads((tmp_path / "s" / "pairs" / "pairs.json").read_text())["null_share"] == 0.2
    torch.testing.assert_close(pairs["z1"][null], integrate(run.field(None), pairs["z0"][null], "midpoint", 4).x)
    torch.testing.assert_close(pairs["z1"][~null], integrate(run.field(pairs["label"][~null], 2.5), pairs["z0"][~null],
                                                             "midpoint", 4).x)
    assert student.cfg.label_dropout == 0.0
    rc, _, err = cli("sample", tmp_path / "s", "--label", "3", "--n", "8", "--out", tmp_path / "x.npy", "--no-progress")
    assert rc == 0, err


def test_pairs_a_teacher_cannot_make_are_refused_before_anything_is_written(cli, cond_ddpm, tiny_run, tmp_path):
    out = tmp_path / "out"
    teacher = f"diffusers:{cond_ddpm}"
    line = one_line_error(*cli("reflow", "--teacher", teacher, "--out", out, "--guidance", "2")[::2])
    assert "--teacher-null-class" in line and "--guidance 2" in line
    # its default: pairs at guidance 1.5 (an image teacher with classes), a fifth without a class
    line = one_line_error(*cli("reflow", "--teacher", teacher, "--out", out)[::2])
    assert "--teacher-null-class" in line and "--guidance 1.5" in line
    line = one_line_error(*cli("reflow", "--teacher", teacher, "--null-share", "1", "--out", out)[::2])
    assert "--teacher-null-class" in line and "unconditional" in line
    assert "0 .. 2" in one_line_error(*cli("reflow", "--teacher", teacher, "--teacher-null-class", "3", "--out", out)[::2])
    assert "no classes" in one_line_error(*cli("reflow", tiny_run, "--guidance", "2", "--out", out)[::2])
    assert "diffusers" in one_line_error(*cli("reflow", tiny_run, "--teacher-null-class", "0", "--out", out)[::2])
    assert "finite" in one_line_error(*cli("distill", tiny_run, "--guidance", "nan", "--out", out)[::2])
    assert not out.exists()
    # guidance 1 is plain conditional sampling: no null class needed, unless some pairs are to have none
    line = one_line_error(*cli("distill", "--teacher", teacher, "--guidance", "1", "--out", out)[::2])
    assert "--teacher-null-class" in line and "--null-share" in line
    assert "[0, 1]" in one_line_error(*cli("distill", tiny_run, "--null-share", "1.5", "--out", out)[::2])
    assert not out.exists()
    teacher_1 = make_teacher(teacher, nfe=2, device="cpu")
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(teacher_1(x, torch.tensor([2, 1]), 1.0), _ddim(cond_ddpm, x, 2, torch.tensor([2, 1])),
                               atol=1e-5, rtol=1e-4)
