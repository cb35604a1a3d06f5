"""Pages generated at build time from the code, never copied by hand (an mkdocs hook, also
imported by tests/test_docs.py).

A page asks for a generated part with a marker line:

- ``<!-- generated: cli -->``: every command of ``flowmatch`` with every argument and option,
  walked from the typer app (:data:`flowmatch.cli.app`). The build fails if an option of any
  command is missing from the page it writes.
- ``<!-- generated: defaults -->``: the defaults by data kind and objective, from
  :data:`flowmatch.config.RECIPES` (every setting in ``RECIPE_SETTINGS``).
- ``<!-- generated: defaults-short -->``: the same, in the columns README.md shows (README keeps
  a copy; tests/test_docs.py checks that it equals this one).

``python docs/hooks/generate.py cli|defaults|defaults-short`` prints one of them.
"""

from __future__ import annotations

import inspect
import re
import sys
import typing

MARKER = re.compile(r"^<!-- generated: ([\w-]+) -->$", re.M)


# --- the command line -------------------------------------------------------------------------

def _command():
    import typer

    from flowmatch.cli import app

    return typer.main.get_command(app)


def _type_name(param) -> str:
    """What an option takes, in click's words (INTEGER, FLOAT, TEXT, PATH), or '' for a flag."""
    if getattr(param, "is_flag", False):
        return ""
    t = getattr(param, "type", None)
    if t is not None and getattr(t, "name", None):
        return str(t.name).upper()
    ann = getattr(getattr(param, "type_descriptor", None), "annotation", None)
    args = [a for a in typing.get_args(ann) if a is not type(None)]
    if args:
        ann = args[0]
    names = {int: "INTEGER", float: "FLOAT", str: "TEXT", bool: "BOOLEAN"}
    if ann in names:
        return names[ann]
    return getattr(ann, "__name__", "VALUE").upper() if ann is not None else "VALUE"


def _help(param) -> str:
    text = inspect.cleandoc(getattr(param, "help", None) or "")
    text = text.replace("\\[", "[").replace("\n", " ")  # rich's escaped brackets
    return text.replace("|", "\\|")


def _default(param) -> str:
    if getattr(param, "required", False):
        return "required"
    d = getattr(param, "default", None)
    if d is None or callable(d) or d == () or d == []:
        return ""
    if getattr(param, "is_flag", False) and getattr(param, "secondary_opts", None):
        return f"`{param.opts[0] if d else param.secondary_opts[0]}`"
    return f"`{d}`"


def _option_cell(param) -> str:
    names = " / ".join(f"`{o}`" for o in [*param.opts, *getattr(param, "secondary_opts", [])])
    kind = _type_name(param)
    return f"{names} {kind}".strip()


def command_options(cmd) -> list[str]:
    """Every option string of a click command (``--x``, ``--no-x``), its arguments by name."""
    out = []
    for p in cmd.params:
        if getattr(p, "param_type_name", "") == "argument" or type(p).__name__.endswith("Argument"):
            out.append(p.name.upper())
        else:
            out += [*p.opts, *getattr(p, "secondary_opts", [])]
    return out


def cli_reference() -> str:
    """Markdown for every command, argument and option of the typer app."""
    group = _command()
    lines = []
    for name in sorted(group.commands, key=list(group.commands).index):
        cmd = group.commands[name]
        args = [p for p in cmd.params if type(p).__name__.endswith("Argument")]
        opts = [p for p in cmd.params if p not in args]
        usage = " ".join(["flowmatch", name, "[OPTIONS]",
                          *(f"{a.name.upper()}{'...' if a.nargs == -1 else ''}" for a in args)])
        lines += [f"## `flowmatch {name}`", "", inspect.cleandoc(cmd.help or "").replace("\\[", "["), "",
                  f"```text\n{usage}\n```", ""]
        if args:
            lines += ["| argument | |", "|---|---|"]
            lines += [f"| `{a.name.upper()}` | {_help(a)} |" for a in args]
            lines.append("")
        panels: dict[str, list] = {}
        for p in opts:
            panels.setdefault(getattr(p, "rich_help_panel", None) or "Options", []).append(p)
        for panel, ps in panels.items():
            if len(panels) > 1:
                lines += [f"**{panel}**", ""]
            lines += ["| option | default | what it does |", "|---|---|---|"]
            for p in ps:
                hidden = " (hidden)" if getattr(p, "hidden", False) else ""
                lines.append(f"| {_option_cell(p)} | {_default(p)} | {_help(p)}{hidden} |")
            lines.append("")
    return "\n".join(lines)


def missing_options(text: str) -> list[str]:
    """The ``command option`` pairs that ``text`` (a generated reference) does not name."""
    group = _command()
    missing = []
    sections = dict(re.findall(r"^## `flowmatch ([\w-]+)`\n(.*?)(?=^## |\Z)", text, flags=re.M | re.S))
    for name, cmd in group.commands.items():
        body = sections.get(name)
        if body is None:
            missing.append(f"{name} (the whole command)")
            continue
        for opt in command_options(cmd):
            if f"`{opt}`" not in body:
                missing.append(f"{name} {opt}")
    return missing


# --- the defaults by data kind and objective --------------------------------------------------

KINDS = {"toy": "2-D toys", "table": "your table", "image": "images"}
SHORT = ("steps", "batch_size", "lr", "fourier", "prediction", "stf", "coupling", "time_dist")
OPTION = {"time_dist": "--time-dist", "time_mean": "--time-mean"}


def _cell(key: str, value) -> str:
    if value is None:
        return "-"
    if key == "time_dist" and value == "logit-normal":
        return "logit-normal"
    if isinstance(value, float) and key == "lr":
        return f"{value:g}"
    return str(value)


def defaults_table(columns=None) -> str:
    """A Markdown table of :data:`flowmatch.config.RECIPES`: one row per (kind, objective), one
    column per setting (``columns``: a subset of ``RECIPE_SETTINGS``, in their order)."""
    from flowmatch.config import RECIPE_SETTINGS, RECIPES

    cols = [c for c in RECIPE_SETTINGS if columns is None or c in columns]
    head = ["data", "objective", *(f"`--{c.replace('_', '-')}`" for c in cols)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    objectives = list(dict.fromkeys(o for _, o in RECIPES))
    for objective in objectives:
        for kind, label in KINDS.items():
            if (kind, objective) not in RECIPES:
                continue
            row = RECIPES[(kind, objective)]
            lines.append("| " + " | ".join([label, objective, *(_cell(c, row.get(c)) for c in cols)]) + " |")
    return "\n".join(lines)


def defaults_notes() -> str:
    from flowmatch.config import DATA_RECIPES, LR_BY_UNET, WITHOUT_STF

    without = ", ".join(f"`--{k.replace('_', '-')} {v}`" for k, v in WITHOUT_STF.items())
    lrs = ", ".join(f"`--unet {k}`: {v:g}" for k, v in LR_BY_UNET.items())
    return (f"Where the stable target cannot apply (a coupling other than independent, continuous conditions, "
            f"images streamed from a folder), flow matching trains the plain target: {without}. "
            f"A UNet preset with a learning rate of its own: {lrs}. "
            + " ".join(f"`--data {data}` with `--objective {objective}`: "
                       + ", ".join(f"`--{k.replace('_', '-')} {v}`" for k, v in values.items()) + "."
                       for (data, objective), values in DATA_RECIPES.items()))


GENERATORS = {
    "cli": cli_reference,
    "defaults": lambda: defaults_table() + "\n\n" + defaults_notes(),
    "defaults-short": lambda: defaults_table(SHORT),
}


# --- the mkdocs hook --------------------------------------------------------------------------

def on_page_markdown(markdown: str, page, config, files, **kwargs) -> str:
    from mkdocs.exceptions import PluginError

    def replace(match):
        name = match.group(1)
        if name not in GENERATORS:
            raise PluginError(f"{page.file.src_path}: unknown generated part {name!r} (known: {', '.join(GENERATORS)})")
        text = GENERATORS[name]()
        if name == "cli":
            missing = missing_options(text)
            if missing:
                raise PluginError(f"{page.file.src_path}: the CLI reference misses {', '.join(missing)}")
        return text

    return MARKER.sub(replace, markdown)


# Docstrings use Sphinx roles (:func:`x`, :class:`~a.b.C`); mkdocstrings renders them as text, so the
# rendered role is turned into plain code: `x`, `C`.
ROLE = re.compile(r":(?:func|class|meth|mod|data|attr|exc|obj):<code>(~?)([\w.]+)</code>")


def on_page_content(html: str, page, config, files, **kwargs) -> str:
    # `~a.b.C` shows its last name only, as Sphinx does
    return ROLE.sub(lambda m: f"<code>{m.group(2).rsplit('.', 1)[-1] if m.group(1) else m.group(2)}</code>", html)


if __name__ == "__main__":
    what = sys.argv[1] if len(sys.argv) > 1 else "cli"
    print(GENERATORS[what]())
