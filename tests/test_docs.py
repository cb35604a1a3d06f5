"""The documentation's commands, run as written at tiny budgets, and the rules its pages keep.

Every ```bash block of README.md and of each page under docs/ runs in order in a fresh directory
(later commands read what earlier ones wrote), each ```python block with it. `flowmatch ...` runs
in-process with the budget options of :data:`TINY` appended (the last occurrence of an option
wins), so a command that stops working fails here. A command marked long (a trailing comment
that starts with ``long:``) and every command on a results page (they reproduce published
numbers: minutes to hours) is checked, not run: its options must exist, its script must answer
``--help``. Any other program must be one of :data:`NOT_RUN`, with the check it gets there.
"""

from __future__ import annotations

import importlib.util
import re
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from helpers import image_folder, tiny_ddpm, write_cifar10

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
README = ROOT / "README.md"


def _generate():
    """docs/hooks/generate.py, the mkdocs hook that writes the generated pages."""
    spec = importlib.util.spec_from_file_location("docs_generate", DOCS / "hooks" / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def pages() -> list[Path]:
    return sorted(p for p in DOCS.rglob("*.md") if "hooks" not in p.parts)


def results_page(path: Path) -> bool:
    return path.parent.name == "results"


# --- reading commands out of Markdown --------------------------------------------------------

FENCE = re.compile(r"^```(bash|python)[^\n]*\n(.*?)^```", re.S | re.M)


def blocks(text: str) -> list[tuple[str, str]]:
    """The page's ```bash and ```python blocks, in order, as (language, body)."""
    return FENCE.findall(text)


def commands(block: str) -> list[tuple[list[str], str]]:
    """A bash block's commands as (words, trailing comment): continuation lines joined, whole-line
    comments dropped, ``a && b`` split."""
    text = block.replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        code, _, comment = line.partition(" #")
        code = code.strip()
        if code and not code.startswith("#"):
            out += [(shlex.split(part), comment.strip()) for part in code.split("&&")]
    return out


def long_marked(comment: str) -> bool:
    return comment.startswith("long:")


# --- running them ------------------------------------------------------------------------------

# per subcommand, the options that make it tiny (appended: the last occurrence of an option wins)
TINY = {
    "train": ["--steps", "6", "--batch-size", "32", "--width", "32", "--depth", "2", "--checkpoint-every", "6"],
    # (a step of the 28x28 UNet at batch 32 took 8 s on a loaded 2-core machine)
    "reflow": ["--pairs", "32", "--steps", "2", "--teacher-nfe", "4", "--batch-size", "8"],
    "distill": ["--pairs", "32", "--steps", "2", "--teacher-nfe", "4", "--batch-size", "8"],
    "sample": ["--nfe", "2", "--n", "200", "--tol", "1e-3"],  # --nfe not for a distilled run: it samples at its own NFE
    "export": ["--nfe", "2"],  # likewise (tracing an 8-step guided UNet sampler alone took 48 s)
    "eval": ["--n", "200"],
    "nll": ["--n", "8", "--tol", "1e-2"],  # an untrained field is stiff: dopri5 at 1e-3 took 15 s
}
# image runs: a smaller UNet and batch, fewer steps (a 6-step run of the default UNet on 32x32 images took a minute)
TINY_IMAGES = ["--steps", "2", "--batch-size", "8", "--unet", "tiny", "--checkpoint-every", "2"]
# pictures cost most of a tiny run (a 2-D run's flow.gif alone: tens of seconds): no command draws them here
# (tests/test_cli.py checks that a 2-D run writes every picture)
QUIET = {"train": ["--no-progress", "--no-plots"], "reflow": ["--no-progress", "--no-plots"],
         "distill": ["--no-progress", "--no-plots"], "sample": ["--no-progress"]}

# programs the pages name that are not run here, and what is checked instead
NOT_RUN = {
    "python3": "the fresh-machine set-up (python3 -m venv)",
    ".": "activating the virtual environment",
    "source": "activating the virtual environment",
    "pip": "an install: its extras must exist in pyproject.toml",
    "bash": "a script of the repository: it must exist",
    "mkdocs": "the documentation build: CI runs it (.ci/run)",
    "ruff": "the linter: CI runs it",
    "git": "reading the repository's history",
    "accelerate": "a multi-process launch: its flowmatch options must exist (a slow test runs one)",
    "tensorboard": "a viewer of the tracking logs",
    "lscpu": "reading the CPU's features",
    "huggingface-cli": "uploading a Hub folder (needs an account and the network)",
}


class Runner:
    """Runs one page's commands in order in ``workdir``; ``cli``/``script`` are conftest's in-process runners."""

    helped: set = set()  # scripts whose --help already ran (once per session)

    def __init__(self, where: str, cli, script, workdir: Path, run: bool = True):
        self.where, self.cli, self.script, self.workdir, self.run = where, cli, script, workdir, run
        self.group = None

    def command_group(self):
        if self.group is None:
            import typer

            from flowmatch.cli import app

            self.group = typer.main.get_command(app)
        return self.group

    def check_options(self, sub: str, args: list[str], what) -> None:
        group = self.command_group()
        assert sub in group.commands, (self.where, what, f"no command {sub!r}")
        known = {"--help", *_generate().command_options(group.commands[sub])}
        for a in args:
            if a.startswith("--"):
                assert a.split("=")[0] in known, (self.where, what, f"{sub} has no option {a}")

    def help(self, path: str, what) -> None:
        assert (ROOT / path).is_file(), (self.where, what, f"{path}: no such file")
        if path in Runner.helped:
            return
        rc, out, err = self.script(ROOT / path, "--help")
        assert rc == 0 and "usage" in out.lower(), (self.where, what, err[-1000:])
        Runner.helped.add(path)

    def python_block(self, code: str) -> None:
        """A ```python block at a tiny budget: loops of hundreds of steps run 3, `steps=` and `pairs=` of
        hundreds or more become 2 and 32 (at batch 8), and TrainConfig trains 6 steps of a small network."""
        import flowmatch

        code = re.sub(r"range\(\d{3,}\)", "range(3)", code)
        code = re.sub(r"\bsteps=\d{3,}", "steps=2", code)
        code = re.sub(r"\bpairs=\d{3,}", "pairs=32, batch_size=8", code)
        code = re.sub(r"\.log_prob\(([^()]*(?:\([^()]*\))?[^()]*)\)", r".log_prob(\1, tol=1e-2)", code)
        tiny = {"steps": 6, "batch_size": 32, "width": 32, "depth": 2, "plots": False}

        def tiny_config(*args, **kw):
            return flowmatch.TrainConfig(*args, **{**kw, **tiny})

        code = re.sub(r"\b(fm\.)?TrainConfig\(", "_tiny_config(", code)
        env = {"_tiny_config": tiny_config, "__name__": "__docs__"}
        exec(compile(code, self.where, "exec"), env)  # noqa: S102 (the page's own example)
        return env

    def bash_command(self, words: list[str], comment: str) -> None:
        what = " ".join(words)
        prog = words[0]
        if prog == "python" and words[1:3] == ["-m", "flowmatch"]:
            words, prog = ["flowmatch", *words[3:]], "flowmatch"
        if prog == "flowmatch":
            return self.flowmatch(words, comment)
        if prog == "python" and len(words) > 1 and words[1].endswith(".py"):
            return self.help(words[1], what)  # benchmarks and examples take minutes to hours: --help
        if prog == "python" and words[1:2] == ["-c"]:
            if self.run and not long_marked(comment):
                exec(compile(words[2], self.where, "exec"), {})  # noqa: S102 (the page's one-liner)
            return None
        if prog == "python" and words[1:3] == ["-m", "pytest"]:
            for w in words[3:]:
                if w.startswith("tests/"):
                    assert (ROOT / w.split("::")[0]).exists(), (self.where, what)
            return None
        assert prog in NOT_RUN, (self.where, what, f"{prog!r} is neither run nor listed in NOT_RUN")
        if prog == "pip":
            self.pip(words, what)
        elif prog == "bash":
            assert (ROOT / words[1]).is_file(), (self.where, what)
        elif prog == "accelerate":
            i = words.index("flowmatch")
            self.check_options(words[i + 1], words[i + 2:], what)
        return None

    def pip(self, words: list[str], what) -> None:
        assert words[1] == "install" and "-c" in words and "constraints.txt" in words, (self.where, what)
        extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
        for w in words:
            m = re.fullmatch(r"\.\[([\w,-]+)\]", w)
            if m:
                for extra in m.group(1).split(","):
                    assert extra in extras, (self.where, what, f"no extra {extra!r}")

    def flowmatch(self, words: list[str], comment: str) -> None:
        what = " ".join(words)
        redirect = words[words.index(">") + 1] if ">" in words else None  # `... > FILE`: stdout into FILE
        words = words[: words.index(">")] if redirect else words
        sub, args = words[1], words[2:]
        if not self.run or long_marked(comment) or "--help" in args:
            self.check_options(sub, args, what)
            return
        args = args + TINY.get(sub, []) + QUIET.get(sub, [])
        if sub == "train" and "--data" in args:
            data = args[args.index("--data") + 1]
            if data in ("digits", "mnist") or data.startswith("cifar10:") or Path(data).is_dir():
                args += TINY_IMAGES
            if data != "digits":
                args += ["--image-size", "8"]
        if sub in ("sample", "export") and args and "distilled" in args[0]:
            args.remove("--nfe"), args.remove("2")
        if sub == "eval":  # image runs are measured at one NFE; 2-D runs at several, with an adaptive row
            image = any(k in " ".join(args) for k in ("digits", "mnist", "cifar", "folder", "faces"))
            args += ["--nfe", "2"] if image else ["--nfe", "1,2", "--repeats", "1", "--tol", "1e-2"]
        for a in args:  # a diffusers teacher a page makes with a benchmark script: a tiny one saved the same way
            if a.startswith("diffusers:") and not Path(a.split(":", 1)[1]).exists():
                null = int(args[args.index("--teacher-null-class") + 1]) if "--teacher-null-class" in args else None
                tiny_ddpm(Path(a.split(":", 1)[1]), 28, None if null is None else null + 1, timesteps=1000)
        if "--perceptual" in args and not Path(args[args.index("--perceptual") + 1]).exists():
            tiny_distance(Path(args[args.index("--perceptual") + 1]))  # the user's LPIPS export: a small stand-in
        if "--fid-weights" in args and not Path(args[args.index("--fid-weights") + 1]).exists():
            tiny_feature_net(Path(args[args.index("--fid-weights") + 1]))  # the user's Inception file: a stand-in
        t0 = time.perf_counter()
        rc, out, err = self.cli(sub, *args)
        print(f"{time.perf_counter() - t0:6.1f} s  {self.where}: {what}", file=sys.__stderr__)
        assert rc == 0, (self.where, what, err[-2000:])
        if redirect:
            (self.workdir / redirect).write_text(out)

    def page(self, text: str) -> dict:
        """Every block of ``text`` in order; returns the last python block's names."""
        env = {}
        for lang, body in blocks(text):
            if lang == "python":
                if self.run:
                    env = self.python_block(body)
                continue
            for words, comment in commands(body):
                self.bash_command(words, comment)
        return env


# --- stand-ins for files the user supplies ----------------------------------------------------

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


@pytest.fixture(name="workdir")
def workdir_fixture(tmp_path, monkeypatch):
    """The pages' commands run from a fresh directory: `path/to/folder` is a small image folder,
    `path/to/table.csv` a table of three columns with a header (the last column a condition),
    `path/to/cifar-10-batches-bin` a small CIFAR-10 in its official format."""
    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(0)
    (tmp_path / "path" / "to").mkdir(parents=True)
    np.savetxt(tmp_path / "path" / "to" / "table.csv", rng.normal(size=(200, 3)), delimiter=",", header="a,b,c",
               comments="")
    image_folder(tmp_path / "path" / "to" / "folder", per_class=6, size=12)
    write_cifar10(tmp_path / "path" / "to" / "cifar-10-batches-bin")
    return tmp_path


# --- the tests --------------------------------------------------------------------------------

RUN_PAGES = [p.relative_to(ROOT).as_posix() for p in pages() if not results_page(p) and blocks(p.read_text())]


@pytest.mark.parametrize("page", RUN_PAGES)
def test_every_command_on_the_page_works_in_order(page, cli, script, workdir):
    Runner(page, cli, script, workdir).page((ROOT / page).read_text(encoding="utf-8"))


def test_results_pages_and_inline_commands_name_real_options_and_scripts(cli, script, tmp_path):
    """Results pages' commands take minutes to hours: their options and scripts are checked, not run;
    so are the commands every page quotes inline (`flowmatch sample RUN --nfe 4`)."""
    checked = 0
    for page in [README, *pages()]:
        text = page.read_text(encoding="utf-8")
        runner = Runner(page.relative_to(ROOT).as_posix(), cli, script, tmp_path, run=False)
        if results_page(page):
            runner.page(text)
        for m in re.finditer(r"`((?:flowmatch [a-z]|python benchmarks/)[^`]*)`", text):  # not `flowmatch COMMAND`
            runner.bash_command(shlex.split(m.group(1).replace("...", "")), "long:")
            checked += 1
    assert checked >= 30, checked


def test_every_levers_variant_the_pages_give_parses_to_train_settings():
    """benchmarks/levers.py's variants (name:setting=value,...) are TrainConfig settings of the right type."""
    from flowmatch.config import TrainConfig

    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from levers import parse_variant
    finally:
        sys.path.pop(0)
    text = "\n".join(p.read_text(encoding="utf-8") for p in [README, *pages()])
    found = re.findall(r"python benchmarks/levers\.py((?:\\\n|[^`\n])*)", text)
    variants = [w for c in found for w in c.replace("\\\n", " ").split() if re.fullmatch(r"[\w.-]+:\S*", w)]
    assert len(variants) >= 20, variants
    for v in variants:
        _, over = parse_variant(v)
        TrainConfig(**over).validate()
    with pytest.raises(SystemExit, match="steps=abc"):
        parse_variant("x:steps=abc")


def test_the_cli_reference_names_every_option_of_every_command():
    gen = _generate()
    text = gen.cli_reference()
    assert gen.missing_options(text) == []
    assert "## `flowmatch train`" in text and "`--print-config`" in text
    # the check can fail: drop one option's row and it is reported
    broken = text.replace("| `--print-config`", "| `--print-konfig`")
    assert gen.missing_options(broken) == ["train --print-config"]


def test_generated_parts_are_asked_for_where_the_reference_needs_them():
    assert "<!-- generated: cli -->" in (DOCS / "reference" / "cli.md").read_text()
    assert "<!-- generated: defaults -->" in (DOCS / "reference" / "defaults.md").read_text()


TIME_WORDS = re.compile(r"\b(today|today's|this week|this week's|this machine|this afternoon|this morning|yesterday)\b",
                        re.I)


def header(text: str) -> str:
    """A page's header: everything before its first second-level heading."""
    return text.split("\n## ", 1)[0]


def test_no_page_says_today_or_this_machine_outside_the_results_headers():
    found = []
    for path in [README, ROOT / "CHANGELOG.md", *pages()]:
        text = path.read_text(encoding="utf-8")
        body = text[len(header(text)):] if results_page(path) else text
        found += [f"{path.relative_to(ROOT)}: {m.group(0)!r}" for m in TIME_WORDS.finditer(body)
                  if body[m.start() - 1] != '"']  # the rule itself, quoted, may name the words
    assert not found, found


def test_results_pages_open_with_commit_date_machine_and_torch():
    for path in pages():
        if results_page(path) and path.name != "index.md":
            head = header(path.read_text(encoding="utf-8"))
            for word in ("commit", "date", "machine", "torch"):
                assert word in head.lower(), (path.name, word)
            assert re.search(r"\b[0-9a-f]{7}\b", head), (path.name, "no commit hash in the header")
            assert re.search(r"\b20\d\d-\d\d-\d\d\b", head), (path.name, "no date in the header")


def test_every_results_table_names_the_command_that_made_it():
    """Each table below a results page's header has a command (`flowmatch ...` or `python benchmarks/...`)
    in the text between the previous table (or heading) and its own end."""
    missing = []
    for path in pages():
        if not results_page(path) or path.name == "index.md":
            continue
        text = path.read_text(encoding="utf-8")
        body = text[len(header(text)):]
        start = 0
        for m in re.finditer(r"(?:^\|.*\|\n)+", body, flags=re.M):
            if m.group(0).count("![") >= 2:  # a table of pictures: their captions name the runs
                start = m.end()
                continue
            before = body[start:m.end()]
            if not re.search(r"flowmatch \w|python benchmarks/|benchmarks/\w+\.py", before):
                missing.append(f"{path.name}: table at {m.group(0)[:60]!r}")
            start = m.end()
    assert not missing, missing


def test_readme_and_the_site_link_only_to_files_that_exist():
    """README's absolute links into the repository and the pages' relative links name existing files."""
    repo = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["urls"]["Repository"]
    for target in re.findall(r"\]\((" + re.escape(repo) + r"/(?:blob|raw)/main/[^)#]+)", README.read_text()):
        assert (ROOT / target.split("/main/", 1)[1]).exists(), target
