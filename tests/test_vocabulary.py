"""One vocabulary: every `--flag` that a tool's help or its error messages name is an option of that tool
(or, where the text names another tool, of that one); --help shows every default; an unknown or
misspelt option is answered with the one meant.

A tool's error messages are the string literals of its own file (docstrings left out) and of the
library modules whose errors speak for it (train.py: config.py, training.py, eval/during_training.py, logs.py).
"""
import ast
import importlib
import os
import re

import pytest

import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOLS = {  # module -> the files whose messages it prints
    "train": ["train.py", "config.py", "training.py", "eval/during_training.py", "logs.py"],
    "sample": ["sample.py"],
    "ema": ["ema.py"],
    "plots": ["plots.py"],
    "prepare_latents": ["prepare_latents.py"],
    "ablate": ["ablate.py"],
    "bench": ["bench.py"],
    "eval.evaluate": ["eval/evaluate.py"],
    "eval.sample_fid": ["eval/sample_fid.py"],
    "eval.ref_stats": ["eval/ref_stats.py"],
}
SCRIPTS = {os.path.basename(files[0]): module for module, files in TOOLS.items()}
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*[a-z0-9]")
SCRIPT = re.compile(r"\b(\w+\.py)\b|\b(pip|torchrun|tensorboard)\b|([(),;])|-m ([\w.]+)")


class _Captured(BaseException):
    def __init__(self, parser):
        self.parser = parser


def parser_of(module_name: str, monkeypatch) -> cli.Parser:
    """The parser the tool's main() builds (caught as it parses)."""
    module = importlib.import_module(module_name)

    def capture(self, args=None, namespace=None):
        raise _Captured(self)
    monkeypatch.setattr(cli.Parser, "parse_known_args", capture)
    try:
        module.main([])
    except _Captured as caught:
        return caught.parser
    raise AssertionError(f"{module_name}.main() parsed no cli.Parser")


def messages(path: str) -> list[str]:
    """The sentences among the string literals of a file (f-strings joined, their fields left out):
    docstrings and a command line's single items ("--ckpt-every") left out."""
    tree = ast.parse(open(os.path.join(ROOT, path)).read())
    docstrings = {id(node.value) for node in ast.walk(tree) if isinstance(node, ast.Expr)
                  and isinstance(node.value, ast.Constant)}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.JoinedStr):
            found.append("".join(v.value if isinstance(v, ast.Constant) else " " for v in node.values))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            found.append(node.value)
    return [m for m in found if re.search(r"[a-z]{2,} [a-z]{2,}", m)]


def named_flags(text: str, own: str) -> list[tuple[str, str]]:
    """(tool, flag) for every --flag in `text`: the tool is the script (x.py) or module (-m eval.x) named
    before it on its line (up to a bracket, comma or semicolon), else `own`; None where that is another
    program (pip, torchrun)."""
    found = []
    for line in text.splitlines():
        tool = own
        events = sorted([(m.start(), "script", m) for m in SCRIPT.finditer(line)] +
                        [(m.start(), "flag", m) for m in FLAG.finditer(line)], key=lambda e: e[0])
        for _, kind, m in events:
            if kind == "script":
                tool = (own if m.group(3) else SCRIPTS.get(m.group(1)) if m.group(1)
                        else m.group(4) if m.group(4) in TOOLS else None)
            elif tool is not None:
                found.append((tool, m.group(0)))
    return found


@pytest.fixture(scope="module")
def parsers():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("COLUMNS", "100000")  # help lines unwrapped (argparse breaks lines at hyphens)
        found = {name: parser_of(name, mp) for name in TOOLS}
    return found


def help_text(parser) -> str:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("COLUMNS", "100000")
        return parser.format_help()


@pytest.mark.parametrize("module_name", list(TOOLS))
def test_every_flag_a_tool_names_in_its_help_and_errors_is_an_option(module_name, parsers):
    own = parsers[module_name]
    texts = [help_text(own)] + [m for path in TOOLS[module_name] for m in messages(path)]
    wrong = sorted({f"{flag} ({tool})" for text in texts for tool, flag in named_flags(text, module_name)
                    if flag not in parsers[tool].options()})
    assert not wrong, f"{module_name} names options that do not exist: {wrong}"


@pytest.mark.parametrize("module_name", list(TOOLS))
def test_help_shows_every_default(module_name, parsers):
    parser = parsers[module_name]
    text = " ".join(help_text(parser).split())
    for action in parser._actions:
        if (action.option_strings and action.default not in (None, False, "==SUPPRESS==")
                and action.help != "==SUPPRESS=="):
            assert action.option_strings[-1] in text
            shown = " ".join(map(str, action.default)) if isinstance(action.default, (list, tuple)) else str(action.default)
            assert "default" in (action.help or "").lower() or f"(default: {shown})" in text or \
                f"default: {shown}" in text, (action.option_strings, action.default)


def test_the_run_folder_the_results_parent_and_progress_have_one_name_in_every_tool(parsers):
    for tool in ("sample", "ema", "eval.sample_fid"):
        assert "--run-dir" in parsers[tool].options()
    assert "--results-dir" in parsers["train"].options()
    for tool in ("sample", "eval.sample_fid", "eval.evaluate", "eval.ref_stats"):
        assert "--no-progress" in parsers[tool].options(), tool


@pytest.mark.parametrize("tool, argv, meant", [
    ("sample", ["--results-dir", "RUN"], "--run-dir"),
    ("eval.sample_fid", ["--progress"], "--no-progress"),
    ("train", ["--ref", "x.npz"], "--eval-ref"),
    ("train", ["--num-step", "5"], None),  # (a unique prefix is argparse's abbreviation: accepted)
    ("train", ["--batchsize", "8"], "--batch-size"),
])
def test_an_unknown_option_is_answered_with_the_one_meant(tool, argv, meant, capsys):
    module = importlib.import_module(tool)
    parser = module.build_parser() if hasattr(module, "build_parser") else None
    if meant is None:
        parser.parse_args(argv)
        return
    with pytest.raises(SystemExit) as exited:
        (parser.parse_args(argv) if parser is not None else module.main(argv))
    assert exited.value.code == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"error: unknown option {argv[0]}; did you mean {meant}?")


def test_sample_takes_the_run_from_a_checkpoint_file(tmp_path):
    import argparse
    import sample
    run = tmp_path / "000-run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.json").write_text("{}")
    (run / "checkpoints" / "0000010.pt").write_bytes(b"")
    args = argparse.Namespace(run_dir=None, ckpt=str(run / "checkpoints" / "0000010.pt"))
    assert sample.resolve_run_dir(args) == str(run)
    with pytest.raises(sample.RunError, match="--run-dir RUN is required"):
        sample.resolve_run_dir(argparse.Namespace(run_dir=None, ckpt="10"))


def test_a_flag_after_a_module_command_belongs_to_that_module():
    line = "compute one with python -m eval.ref_stats --data-path D, then pass --eval-ref; python -m pytest -x"
    assert named_flags(line, "train") == [("eval.ref_stats", "--data-path"), ("train", "--eval-ref")]
