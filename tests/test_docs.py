"""The docs as a newcomer meets them (`make test-docs`, run by `.ci/run`; marked ``docs``).

* Every Python block and every shell command of the README and the docs pages runs as written, in
  page order, in a scratch folder beside a link to ``../shared``, with the small budget of
  ``tests/docs_budget/sitecustomize.py`` (at most 3 meta-iterations and 10 evaluation tasks, whatever
  the block asks for). A block that cannot run here carries ``<!-- docs-test: skip — why -->`` on
  the line before it. ``make`` lines are the entry points CI runs itself and are not re-run.
* The site builds with warnings as errors, which includes the check (docs/conf.py) that every
  parameter of every function and class on the API page is described; no page loads a script or
  a stylesheet from the network; math is rendered by the MathJax copied into the site; the CLI page
  holds every option of every subcommand's parser.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.docs

REPO = Path(__file__).resolve().parents[1]
BUDGET = Path(__file__).resolve().parent / "docs_budget"
BIN = Path(sys.executable).parent
PAGES = ["README.md", "docs/index.md", "docs/install.md", "docs/concepts.md", "docs/cli.md",
         "docs/tutorials/train-and-read-wandb.md", "docs/tutorials/imaml-with-betty.md",
         "docs/tutorials/write-a-variant.md", "docs/tutorials/bring-your-own.md", "docs/results.md", "docs/api.md"]
RUNNABLE = {"python": "python", "py": "python", "bash": "shell", "sh": "shell", "shell": "shell"}
FENCE = re.compile(r"^```(\S*)[^\n]*\n(.*?)^```", re.S | re.M)
SKIP = re.compile(r"<!-- docs-test: skip — (.+?) -->\s*$")


def code_blocks(page: str) -> list[tuple[int, str, str, str | None]]:
    """(line, kind, code, reason it is not run) of each Python/shell block of ``page``."""
    text = (REPO / page).read_text()
    found = []
    for match in FENCE.finditer(text):
        kind = RUNNABLE.get(match.group(1).lower())
        if kind is None:
            continue
        before = text[:match.start()].rstrip("\n").rsplit("\n", 1)[-1]
        skip = SKIP.search(before)
        found.append((text[:match.start()].count("\n") + 1, kind, match.group(2), skip.group(1) if skip else None))
    return found


def shell_commands(code: str) -> list[list[str]]:
    joined = re.sub(r"\\\n\s*", " ", code)
    return [words for line in joined.splitlines() if (words := shlex.split(line, comments=True))]


def as_run_here(words: list[str]) -> list[str]:
    """The command with ``.venv/bin/X``, ``bilevel-maml``, ``python`` pointing into this environment."""
    program = words[0]
    if program.startswith(".venv/bin/"):
        program = str(BIN / program.removeprefix(".venv/bin/"))
    elif program in ("bilevel-maml", "torchrun"):
        program = str(BIN / program)
    elif program in ("python", "python3"):
        program = sys.executable
    return [program, *(os.path.expanduser(os.path.expandvars(word)) for word in words[1:])]


BLOCKS = [(page, *block) for page in PAGES for block in code_blocks(page)]


@pytest.fixture(scope="module")
def page_folders(tmp_path_factory):
    """One scratch folder per page (blocks of a page share it, in order, as a reader's shell would),
    each beside a ``shared`` link so that ``../shared/data/omniglot-small`` resolves."""
    base = tmp_path_factory.mktemp("docs-blocks")
    (base / "shared").symlink_to(REPO.parent / "shared")
    folders = {}
    for page in PAGES:
        folder = base / page.replace("/", "_")
        folder.mkdir()
        for name in ("examples", "benchmarks"):
            (folder / name).symlink_to(REPO / name)
        folders[page] = folder
    return folders


def run(command: list[str], folder: Path, what: str):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(BUDGET), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="2", WANDB_SILENT="true")
    done = subprocess.run(command, cwd=folder, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and "Traceback" not in done.stderr, (
        f"{what} failed (exit {done.returncode}):\n{done.stdout[-1500:]}\n{done.stderr[-3000:]}")
    return done


def test_the_pages_have_runnable_blocks():
    assert len([b for b in BLOCKS if b[4] is None]) >= 12
    for page, line, kind, code, reason in BLOCKS:
        assert reason is None or len(reason) > 20, f"{page}:{line}: a skipped block must say why"


@pytest.mark.parametrize("page,line,kind,code,reason", BLOCKS,
                         ids=[f"{page}:{line}" for page, line, *_ in BLOCKS])
def test_block_runs_as_written(page, line, kind, code, reason, page_folders):
    if reason is not None:
        pytest.skip(f"marked in the page: {reason}")
    folder = page_folders[page]
    if kind == "python":
        script = folder / f"block-{line}.py"
        script.write_text(code)
        run([sys.executable, script.name], folder, f"{page}:{line} (Python)")
        return
    ran = 0
    for words in shell_commands(code):
        if words[0] == "make":  # `make demo`, `make test`, `make setup`: what CI and the fresh-clone check run
            continue
        run(as_run_here(words), folder, f"{page}:{line} `{' '.join(words)}`")
        ran += 1
    assert ran or all(words[0] == "make" for words in shell_commands(code))


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    out = tmp_path_factory.mktemp("site")
    done = subprocess.run([sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html",
                           str(REPO / "docs"), str(out)], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-5000:]
    return out


def test_the_site_builds_with_every_parameter_described(site):
    assert (site / "api.html").is_file() and (site / "cli.html").is_file()


def test_no_page_loads_anything_from_the_network(site):
    pages = sorted(site.rglob("*.html"))
    assert len(pages) >= 10
    remote = re.compile(r"<(?:script|link|img)\b[^>]*(?:src|href)=\"(?:https?:)?//[^\"]+\"", re.I)
    for page in pages:
        text = page.read_text()
        for tag in remote.findall(text):
            assert "rel=\"stylesheet\"" not in tag and not tag.lower().startswith("<script") \
                and not tag.lower().startswith("<img"), f"{page.name} loads {tag}"


def test_math_is_rendered_by_the_bundled_mathjax(site):
    concepts = (site / "concepts.html").read_text()
    assert concepts.count("\\(") >= 10, "the concepts page's math is gone"
    scripts = re.findall(r"<script[^>]*src=\"([^\"]*mathjax[^\"]*)\"", concepts, re.I)
    assert scripts, "no MathJax script on the concepts page"
    for src in scripts:
        local = site / src.split("?")[0]
        assert local.is_file() and local.stat().st_size > 100_000, f"{src} is not a bundled MathJax"
    fonts = list((site / "_static" / "mathjax" / "output" / "chtml" / "fonts").rglob("*.woff"))
    assert fonts, "MathJax's fonts are not bundled"


def test_the_cli_page_is_generated_from_the_parsers(site):
    sys.path.insert(0, str(REPO / "benchmarks"))
    import meta_iteration

    from bilevel_maml.arguments import build_parser

    text = (site / "cli.html").read_text()
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    options = {option for sub in commands.values() for action in sub._actions for option in action.option_strings}
    options |= {option for action in meta_iteration.build_parser()._actions for option in action.option_strings}
    missing = sorted(option for option in options if option not in text)
    assert not missing, f"options missing from the CLI page: {missing}"
    assert "--memory-steps" in text and "ours maml vectorized (cuda graph)" in text
