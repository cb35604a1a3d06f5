"""README's commands, run as written at tiny budgets: every `flowmatch ...` line of its bash
blocks in order (later ones read the runs earlier ones wrote), its Python block, and each
benchmark script it names (`--help`: they take minutes to hours). The budget options appended
below are the only change; a README command that stops working fails here."""

import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from flowmatch.config import TrainConfig

from helpers import image_folder, tiny_ddpm, write_cifar10

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")

# per subcommand, the options that make it tiny (appended: the last occurrence of an option wins)
TINY = {
    "train": ["--steps", "6", "--batch-size", "32", "--width", "32", "--depth", "2", "--checkpoint-every", "6"],
    "reflow": ["--pairs", "64", "--steps", "4", "--teacher-nfe", "4", "--batch-size", "32"],
    "distill": ["--pairs", "64", "--steps", "4", "--teacher-nfe", "4", "--batch-size", "32"],
    "sample": ["--nfe", "2"],  # not for a distilled run: it samples at its own NFE
    "export": ["--nfe", "2"],  # likewise (tracing an 8-step guided UNet sampler alone took 48 s)
    "eval": ["--n", "200"],
}
QUIET = {"train": ["--no-progress"], "reflow": ["--no-progress", "--no-plots"],
         "distill": ["--no-progress", "--no-plots"], "sample": ["--no-progress"]}


def bash_blocks() -> list[str]:
    return re.findall(r"```bash\n(.*?)```", README, flags=re.S)


def commands(block: str) -> list[list[str]]:
    """The block's commands: continuation lines joined, comments and `a && b` split."""
    text = block.replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = line.split(" #")[0].strip()
        if line and not line.startswith("#"):
            out += [shlex.split(part) for part in line.split("&&")]
    return out


def flowmatch_commands() -> list[list[str]]:
    return [c for block in bash_blocks() for c in commands(block) if c[0] == "flowmatch"]


def test_readme_opens_with_the_two_fresh_machine_commands():
    first = commands(bash_blocks()[0])
    setup = [" ".join(c) for c in first]
    assert setup[:3] == ["python3 -m venv .venv", ". .venv/bin/activate", "pip install -c constraints.txt -e ."]
    assert first[3] == ["flowmatch", "train"]  # the main job: the default data set, the checkerboard
    assert "pip install -c constraints.txt -e .[dev,export,track,fid]" in setup and setup[-1] == "python -m pytest"
    assert (ROOT / ".ci" / "run").read_text().count("python -m pytest") == 1


def test_the_first_install_brings_everything_readme_commands_need():
    """README's first command installs the core package only: the dev extra may hold test tools
    and nothing a README command needs (the image stack, plots, diffusers are core)."""
    from importlib.metadata import requires

    reqs = requires("flowmatch")  # what pip installed, from pyproject.toml
    core = " ".join(r for r in reqs if "extra ==" not in r).lower()
    for needed in ("torch", "torchdiffeq", "pot", "safetensors", "accelerate", "diffusers", "matplotlib", "tqdm",
                   "typer", "pillow", "scikit-learn", "prdc", "mlxtend"):
        assert needed in core, needed
    dev = [re.split(r"[<>=\[ ;]", r)[0].lower() for r in reqs if 'extra == "dev"' in r]
    assert set(dev) <= {"pytest", "pytest-xdist", "hypothesis", "ruff"}, dev
    assert "[images]" not in README and ".[" not in bash_blocks()[0].split("\n")[1]


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """README's commands run from a fresh directory; `path/to/folder` is a small image folder,
    `path/to/table.csv` a table of three columns (the last one a condition), `c.npy` a condition,
    `path/to/cifar-10-batches-bin` a small CIFAR-10."""
    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(0)
    (tmp_path / "path" / "to").mkdir(parents=True)
    np.savetxt(tmp_path / "path" / "to" / "table.csv", rng.normal(size=(200, 3)), delimiter=",")
    np.save(tmp_path / "c.npy", np.array([1.5], dtype=np.float32))
    image_folder(tmp_path / "path" / "to" / "folder", per_class=6, size=12)
    write_cifar10(tmp_path / "path" / "to" / "cifar-10-batches-bin")  # a few records in the official format
    return tmp_path


def tiny_feature_net(path: Path) -> None:
    """A small random TorchScript network, images (B, 3, 299, 299) -> features (B, 8), as the FID file's stand-in."""
    import torch

    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 13, stride=13), torch.nn.Tanh(), torch.nn.AdaptiveAvgPool2d(1),
                              torch.nn.Flatten())
    torch.jit.save(torch.jit.trace(net.eval(), torch.zeros(1, 3, 299, 299)), str(path))


def tiny_distance(path: Path) -> None:
    """A small random TorchScript distance d(a, b) -> (B,) of grey images, as the LPIPS file's stand-in."""
    import torch

    class Distance(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(1, 4, 3)

        def forward(self, a, b):
            return (self.conv(a) - self.conv(b)).pow(2).mean(dim=(1, 2, 3))

    torch.jit.save(torch.jit.script(Distance()), str(path))


def test_every_flowmatch_command_in_readme_works_in_order(cli, workdir):
    cmds = flowmatch_commands()
    assert len(cmds) >= 10, cmds
    for cmd in cmds:
        redirect = cmd[cmd.index(">") + 1] if ">" in cmd else None  # `... > FILE`: stdout into FILE
        cmd = cmd[: cmd.index(">")] if redirect else cmd
        sub = cmd[1]
        args = cmd[2:] + TINY.get(sub, []) + QUIET.get(sub, [])
        if sub == "train" and "--data" in args and "digits" not in args:
            args += ["--image-size", "8"]
        if sub == "train" and "--data" in args and not args[args.index("--data") + 1].endswith((".csv", ".npz")):
            args += ["--no-plots"]  # image runs: their pictures are tested in test_images.py (minutes of sampling here)
        if sub in ("sample", "export") and "distilled" in cmd[2]:
            args.remove("--nfe"), args.remove("2")
        if sub == "eval":  # image runs are measured at one NFE; 2-D runs at several, with an adaptive row
            image = "digits" in cmd[2] or "mnist" in cmd[2]
            args += ["--nfe", "2"] if image else ["--nfe", "1,2", "--repeats", "1", "--tol", "1e-3"]
        for a in args:  # a diffusers teacher the README makes with a benchmark script: a tiny one saved the same way
            if a.startswith("diffusers:") and not Path(a.split(":", 1)[1]).exists():
                null = int(args[args.index("--teacher-null-class") + 1]) if "--teacher-null-class" in args else None
                tiny_ddpm(Path(a.split(":", 1)[1]), 28, None if null is None else null + 1, timesteps=1000)
        if "--perceptual" in args and not Path(args[args.index("--perceptual") + 1]).exists():
            tiny_distance(Path(args[args.index("--perceptual") + 1]))  # the user's LPIPS export: a small stand-in
        if "--fid-weights" in args and not Path(args[args.index("--fid-weights") + 1]).exists():
            tiny_feature_net(Path(args[args.index("--fid-weights") + 1]))  # the user's Inception file: a small stand-in
        t0 = time.perf_counter()
        rc, out, err = cli(sub, *args)
        print(f"{time.perf_counter() - t0:6.1f} s  {' '.join(cmd)}", file=sys.__stderr__)
        assert rc == 0, (cmd, err[-2000:])
        if redirect:
            (workdir / redirect).write_text(out)
    # what the commands say they leave behind
    main = sorted(workdir.glob("runs/checkerboard-*"))
    assert len(main) == 1 and (main[0] / "samples.png").exists(), sorted(workdir.rglob("*"))
    for f in ("quality.png", "x.png", "threes.png", "digits.npy", "sevens.png"):
        assert (workdir / f).exists(), f
    assert np.load(workdir / "digits.npy").shape == (1000, 1, 8, 8)


def test_readme_python_block_runs(workdir):
    code = re.findall(r"```python\n(.*?)```", README, flags=re.S)[0]
    assert "TrainConfig(steps=2000)" in code
    code = code.replace("TrainConfig(steps=2000)", "TrainConfig(steps=6, width=32, depth=2, plots=False)")
    env = {}
    exec(compile(code, "README.md", "exec"), env)  # noqa: S102 (README's own example)
    assert env["x"].shape == (1000, 2) and env["logp"].shape == (100,) and env["res"].nfe > 0


def test_every_benchmark_script_readme_names_exists_and_parses_its_options(script):
    """Each script's ``--help``, run in this process (one start-up and one set of imports for all)."""
    scripts = sorted(set(re.findall(r"python (benchmarks/\w+\.py)", README)))
    assert "benchmarks/levers.py" in scripts and len(scripts) >= 4, scripts
    for name in scripts:
        rc, out, err = script(ROOT / name, "--help")
        assert rc == 0 and "usage" in out.lower(), (name, err[-1000:])


def test_every_levers_variant_readme_gives_parses_to_train_settings():
    # README's lever commands name settings such as time_dist=logit-normal (a str | None field)
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from levers import parse_variant
    finally:
        sys.path.pop(0)
    commands = re.findall(r"python benchmarks/levers\.py((?:\\\n|[^`\n])*)", README)
    variants = [w for c in commands for w in c.replace("\\\n", " ").split() if re.fullmatch(r"[\w.-]+:\S*", w)]
    assert len(variants) >= 20 and "ln1u2:time_dist=logit-normal,time_mean=1.0,time_uniform=0.2" in variants
    for text in variants:
        name, over = parse_variant(text)
        TrainConfig(**over).validate()  # every value of the right type and range
    assert parse_variant("x:time_dist=logit-normal,lr=0.003")[1] == {"time_dist": "logit-normal", "lr": 0.003}
    with pytest.raises(SystemExit, match="steps=abc"):
        parse_variant("x:steps=abc")


@pytest.mark.slow
def test_readme_accelerate_launch_command(workdir):
    """README's one-machine `accelerate launch` line, with 2 processes (this machine's cores)
    in place of 8; the two-machine line needs two machines."""
    cmd = next(c for block in bash_blocks() for c in commands(block)
               if c[:2] == ["accelerate", "launch"] and "--num_machines" not in c)
    i = cmd.index("--num_processes")
    cmd[i + 1] = "2"
    p = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", *cmd[2:], *TINY["train"], "--no-progress",
                        "--no-plots"], capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert (workdir / "runs" / "digits8" / "ema.safetensors").exists()
