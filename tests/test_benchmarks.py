"""benchmarks/README.md is the index of benchmarks/: every maintained script is listed there and parses its
options, every file is either listed or a helper named there, and the folder stays small."""

import re
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
INDEX = (BENCHMARKS / "README.md").read_text(encoding="utf-8")


def section(title: str) -> str:
    """The text of the index's ``## title`` section."""
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", INDEX, flags=re.M | re.S)
    assert match, f"benchmarks/README.md has no '## {title}' section"
    return match.group(1)


def table_names(text: str, header: str) -> list[str]:
    """The first column's `name` of the table whose header row starts with ``| header |``."""
    table = text[text.index(f"| {header} |"):].split("\n\n")[0]
    return re.findall(r"^\| `([\w.]+)` \|", table, flags=re.M)


def maintained() -> list[str]:
    return table_names(section("Maintained scripts"), "script")


def helpers() -> list[str]:
    return table_names(section("Maintained scripts"), "helper")


def test_the_index_lists_every_script_and_helper_in_benchmarks():
    scripts, aids = maintained(), helpers()
    assert "levers.py" in scripts and "peers.py" in scripts and "step_cost.py" in scripts, scripts
    assert "peer_adapters.py" in aids and "install_peers.sh" in aids, aids
    for name in scripts + aids:
        assert (BENCHMARKS / name).is_file(), name
    files = sorted(p.name for p in BENCHMARKS.iterdir() if p.suffix in (".py", ".sh"))
    assert files == sorted(scripts + aids), set(files) ^ set(scripts + aids)
    for name in table_names(section("Retired"), "script"):  # retired: gone from the folder, with a commit to fetch it from
        assert not (BENCHMARKS / name).exists(), name
        assert re.search(rf"git show [0-9a-f]{{7,}}:benchmarks/{re.escape(name)} > {re.escape(name)}", INDEX), name


def test_every_maintained_benchmark_parses_its_options(script):
    """Each listed script's ``--help``, run in this process (one start-up and one set of imports for all)."""
    for name in maintained():
        rc, out, err = script(BENCHMARKS / name, "--help")
        assert rc == 0 and "usage" in out.lower(), (name, err[-1000:])


def test_benchmarks_stay_at_most_1900_lines():
    files = [p for p in BENCHMARKS.iterdir() if p.suffix in (".py", ".sh")]
    lines = {p.name: len(p.read_text(encoding="utf-8").splitlines()) for p in files}
    assert sum(lines.values()) <= 1900, sorted(lines.items(), key=lambda kv: -kv[1])
