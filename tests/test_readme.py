"""README.md, the front page: its two fresh-machine commands, its four paths within reach of the
top, its copy of the defaults table, its links, and every command it gives, run as written at tiny
budgets (the machinery is tests/test_docs.py's, shared with the documentation's pages)."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
from test_docs import TINY, Runner, _generate, blocks, commands, pages, tomllib, workdir_fixture  # noqa: F401 (a fixture)

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
CI = (ROOT / ".ci" / "run").read_text(encoding="utf-8")


def bash_blocks() -> list[str]:
    return [body for lang, body in blocks(README) if lang == "bash"]


def test_readme_opens_with_the_two_fresh_machine_commands():
    first = [(" ".join(words), comment) for words, comment in commands(bash_blocks()[0])]
    setup = [c for c, _ in first]
    assert README.index("```bash") < README.index("\n## ")  # before anything else
    assert setup[:3] == ["python3 -m venv .venv", ". .venv/bin/activate", "pip install -c constraints.txt -e ."]
    assert setup[3] == "flowmatch train"  # the main job: the default data set, the checkerboard
    assert setup[4:] == ["bash .ci/run"]  # the tests: CI's own script
    # .ci/run sets up from nothing and runs what the README says it runs, once each
    for step in ("python3 -m venv .venv", '-c constraints.txt -e ".[dev,export,track,fid,docs]"', "ruff check .",
                 "mkdocs build --strict", "python -m pytest"):
        assert step in CI, step
    assert CI.count("python -m pytest") == 1 and CI.index("ruff check .") < CI.index("mkdocs build") < CI.index("pytest\n")


def test_the_first_install_brings_everything_readme_commands_need():
    """README's first command installs the core package only: the dev and docs extras may hold test and
    documentation tools and nothing a README command needs (the image stack, plots, diffusers are core)."""
    from importlib.metadata import requires

    reqs = requires("flowmatch")  # what pip installed, from pyproject.toml
    core = " ".join(r for r in reqs if "extra ==" not in r).lower()
    for needed in ("torch", "torchdiffeq", "pot", "safetensors", "accelerate", "diffusers", "matplotlib", "tqdm",
                   "typer", "pillow", "scikit-learn", "prdc", "mlxtend"):
        assert needed in core, needed
    dev = [re.split(r"[<>=\[ ;]", r)[0].lower() for r in reqs if 'extra == "dev"' in r]
    assert set(dev) <= {"pytest", "pytest-xdist", "hypothesis", "ruff"}, dev
    docs = [re.split(r"[<>=\[ ;]", r)[0].lower() for r in reqs if 'extra == "docs"' in r]
    assert set(docs) <= {"mkdocs", "mkdocs-material", "mkdocstrings", "pymdown-extensions"}, docs
    assert '".[images]"' not in README and ".[" not in bash_blocks()[0].split("\n")[1]


PATHS = ("## Your own table", "## Your images", "## A one-step generator", "## Your own training loop")


def test_readme_is_short_and_each_path_reaches_its_first_command_within_60_lines():
    lines = README.splitlines()
    assert len(lines) <= 300, len(lines)
    for heading in PATHS:
        start = next(i for i, line in enumerate(lines) if line.startswith(heading))
        fence = next(i for i in range(start, len(lines)) if lines[i].startswith("```"))
        assert fence + 2 <= 60, (heading, f"first command on line {fence + 2}")  # 1-based: the line after the fence


def test_readme_defaults_table_is_the_one_generated_from_the_recipes():
    """README keeps a copy of `python docs/hooks/generate.py defaults-short`: regenerate it when RECIPES change."""
    assert _generate().GENERATORS["defaults-short"]() in README


def test_readme_links_are_absolute_and_into_the_repository():
    """README renders on a package index too: no relative links; the repository's address is written
    once in pyproject.toml's [project.urls] and every link into the repository starts with it."""
    repo = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["urls"]["Repository"]
    for target in re.findall(r"\]\(([^)]+)\)", README):
        assert target.startswith(("#", "https://")), target
        if "/blob/main/" in target or "/raw/main/" in target:
            assert target.startswith(repo + "/"), target
            assert (ROOT / target.split("/main/", 1)[1].split("#")[0]).exists(), target


def test_every_command_in_readme_works_in_order(cli, script, workdir):
    env = Runner("README.md", cli, script, workdir).page(README)  # the python block's names
    main = sorted(workdir.glob("runs/checkerboard-*"))  # its pictures: tests/test_cli.py (they cost most of a tiny run)
    assert len(main) == 1 and (main[0] / "ema.safetensors").exists(), sorted(workdir.rglob("*"))
    assert (workdir / "samples.npy").exists() and (workdir / "cats.png").exists() and (workdir / "one-step.png").exists()
    assert tuple(env["x"].shape) == (1000, 2)


@pytest.mark.slow
def test_the_documented_accelerate_launch_command(workdir):
    """The documentation's one-machine `accelerate launch` line, with 2 processes (this machine's cores)
    in place of 8; the two-machine line needs two machines."""
    text = "\n".join(p.read_text(encoding="utf-8") for p in pages())
    cmd = next(words for lang, body in blocks(text) if lang == "bash" for words, _ in commands(body)
               if words[:2] == ["accelerate", "launch"] and "--num_machines" not in words)
    i = cmd.index("--num_processes")
    cmd[i + 1] = "2"
    p = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", *cmd[2:], *TINY["train"], "--no-progress",
                        "--no-plots"], capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    out = cmd[cmd.index("--out") + 1]
    assert (workdir / out / "ema.safetensors").exists()
