"""The documentation stays true to the repository: the paths it names exist, its links reach their
files and headings, and no file points to a design document outside the repository."""
import importlib
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The user guide, every page of docs/ (each tool's reference, the design) and the results.
DOCS = ["README.md", "benchmarks/RESULTS.md"] + sorted(
    os.path.join("docs", name) for name in os.listdir(os.path.join(ROOT, "docs")) if name.endswith(".md"))

CODE_SPAN = re.compile(r"```.*?```|`[^`\n]+`", re.S)
LINK = re.compile(r"\]\(([^)\s]+)\)")
# Files a doc names without a folder: checked at the repository root. (.txt and .json are left out:
# the run folder's log.txt and config.json are named too.)
ROOT_FILE = re.compile(r"^[\w.-]+\.(py|sh|md|ini)$")


def top_level_folders() -> set[str]:
    return {name for name in os.listdir(ROOT) if os.path.isdir(os.path.join(ROOT, name)) and name != ".git"}


def named_paths(text: str) -> set[str]:
    """Words inside code spans and code blocks that name a repository path: under one of its top-level
    folders (`benchmarks/results/bench-cpu.md`, `eval/`), or a root file (`train.py`)."""
    folders, paths = top_level_folders(), set()
    for span in CODE_SPAN.findall(text):
        for word in span.strip("`").split():
            word = word.strip("()[],;:'\"")
            if any(c in word for c in "<>{}*|$=") or word.startswith(("http", "-")):
                continue
            if word.split("/")[0] in folders or ROOT_FILE.match(word):
                paths.add(word)
    return paths


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path: str) -> set[str]:
    with open(path, encoding="utf-8") as f:
        text = CODE_SPAN.sub("", f.read())
    return {github_anchor(m) for m in re.findall(r"^#+ (.+)$", text, re.M)}


@pytest.mark.parametrize("doc", DOCS)
def test_every_repository_path_a_doc_names_exists(doc):
    with open(os.path.join(ROOT, doc), encoding="utf-8") as f:
        paths = named_paths(f.read())
    assert paths, f"{doc} names no path at all: the check would prove nothing"
    missing = sorted(p for p in paths if not os.path.exists(os.path.join(ROOT, p)))
    assert not missing, f"{doc} names paths that do not exist: {missing}"


@pytest.mark.parametrize("doc", DOCS)
def test_every_link_of_a_doc_reaches_its_file_and_heading(doc):
    with open(os.path.join(ROOT, doc), encoding="utf-8") as f:
        links = LINK.findall(f.read())
    broken = []
    for link in links:
        if link.startswith(("http://", "https://")):
            continue
        target, _, anchor = link.partition("#")
        path = os.path.normpath(os.path.join(ROOT, os.path.dirname(doc), target)) if target else \
            os.path.join(ROOT, doc)
        if not os.path.exists(path):
            broken.append(f"{link} (no file)")
        elif anchor and path.endswith(".md") and anchor not in anchors(path):
            broken.append(f"{link} (no heading)")
    assert not broken, f"{doc} has broken links: {broken}"


def test_every_page_of_docs_is_checked_and_linked_from_the_readme():
    """README is the way in: a reference page it does not link is one no user finds."""
    pages = {doc for doc in DOCS if doc.startswith("docs/")}
    assert {"docs/design.md", "docs/train.md", "docs/sample.md"} <= pages
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        linked = {link.partition("#")[0] for link in LINK.findall(f.read())}
    assert not sorted(pages - linked), f"docs pages README does not link: {sorted(pages - linked)}"

# Each tool and the docs/ page that is its full reference (README gives the most used options only).
TOOL_PAGES = [("train", "docs/train.md"), ("sample", "docs/sample.md"), ("ema", "docs/ema.md"),
              ("prepare_latents", "docs/prepare_latents.md"), ("ablate", "docs/ablate.md"),
              ("plots", "docs/ablate.md"), ("bench", "docs/bench.md"), ("eval.sample_fid", "docs/evaluate.md"),
              ("eval.evaluate", "docs/evaluate.md"),
              ("eval.ref_stats", "docs/evaluate.md")]


def help_options(module: str, capsys) -> set[str]:
    with pytest.raises(SystemExit):
        importlib.import_module(module).main(["--help"])
    return set(re.findall(r"^ {2}(?:-\w, )?(--[a-z0-9-]+)", capsys.readouterr().out, re.M)) - {"--help"}


@pytest.mark.parametrize("module,page", TOOL_PAGES)
def test_every_option_of_a_tool_is_named_on_its_reference_page(module, page, capsys):
    options = help_options(module, capsys)
    assert options, f"{module} --help: no option parsed, the check would prove nothing"
    with open(os.path.join(ROOT, page), encoding="utf-8") as f:
        text = f.read()
    if module == "train":  # the eight switches are README's table, which docs/train.md links
        with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
            text += f.read()
    missing = sorted(o for o in options if not re.search(re.escape(o) + r"(?![\w-])", text))
    assert not missing, f"{page} does not name these options of {module}: {missing}"

def test_the_path_check_catches_a_missing_file():
    text = "See `benchmarks/no_such_file.py`, `train.py` and `python eval/fid.py A B`; `results/000/log.txt`."
    assert named_paths(text) == {"benchmarks/no_such_file.py", "train.py", "eval/fid.py"}
    assert github_anchor("Ablation on the CPU (small budget)") == "ablation-on-the-cpu-small-budget"


def test_no_file_points_to_a_document_outside_the_repository():
    """The repository documents itself: no comment or doc sends the reader to the specification or the
    benchmark notes kept outside it (docs/design.md and benchmarks/RESULTS.md are the repository's own)."""
    outside = ["design".upper(), "benchmarks".upper() + ".md", "../" + "shared"]  # (spelled so this file passes)
    with open(os.path.join(ROOT, ".gitignore"), encoding="utf-8") as f:  # run folders and venvs are not ours
        ignored = {line.strip().strip("/") for line in f if line.strip().startswith("/")}
    offenders = []
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if not d.startswith(".") and d != "__pycache__"
                   and not (folder == ROOT and d in ignored)]
        for name in files:
            if name.endswith((".py", ".md", ".sh")):
                path = os.path.join(folder, name)
                with open(path, encoding="utf-8", errors="replace") as f:
                    offenders += [f"{os.path.relpath(path, ROOT)}:{number}" for number, line in enumerate(f, 1)
                                  if any(word in line for word in outside)]
    assert not offenders, f"references outside the repository (name docs/design.md instead): {offenders}"
