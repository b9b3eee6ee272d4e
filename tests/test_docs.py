"""The documentation holds together (CPU, no run started): every relative link and image of the
README, docs/ and the folder READMEs resolves to a file, and every #fragment to a heading of the
page it names (GitHub's anchors); the README stays a door (≤ 15,000 bytes, a link to every docs
page) and the scripts its code blocks name exist; each variant page has cleanrl's four sections
in order; every figure of the results is shown on docs/results.md."""

import os
import re
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
SKIPPED_FOLDERS = {"runs", "saved_models", "saved_checkpoints", "videos", "wandb", "build", "node_modules"}
VARIANT_PAGES = ["r2d2.md", "r2d2_mp.md", "r2d2_ray.md"]
VARIANT_SECTIONS = ["Usage", "Logged metrics", "Implementation details", "Results"]


def markdown_files() -> list[Path]:
    """Every Markdown file of the repository outside hidden folders and run outputs (which are not
    walked: runs/ may hold thousands of files)."""
    found = []
    for folder, subfolders, files in os.walk(ROOT):
        subfolders[:] = [name for name in subfolders if not (name.startswith(".") or name in SKIPPED_FOLDERS
                                                             or name.endswith(".egg-info"))]
        found += [Path(folder) / name for name in files if name.endswith(".md")]
    return sorted(found)


def split_fences(text: str) -> tuple[str, list[str]]:
    """(the text with fenced code blocks blanked, line for line; the code blocks' contents)."""
    prose, blocks, block, fence = [], [], [], None
    for line in text.splitlines():
        marker = re.match(r"\s*(```+|~~~+)", line)
        if fence is None and marker:
            fence, block = marker.group(1), []
            prose.append("")
        elif fence is not None and line.strip().startswith(fence):
            fence = None
            blocks.append("\n".join(block))
            prose.append("")
        elif fence is not None:
            block.append(line)
            prose.append("")
        else:
            prose.append(line)
    return "\n".join(prose), blocks


def without_code_spans(prose: str) -> str:
    """Inline code spans (which may wrap a line, not a paragraph) replaced by a placeholder."""
    return re.sub(r"(`+)((?:(?!\n\s*\n).)+?)\1", "code", prose, flags=re.S)


def links(path: Path) -> list[str]:
    """Targets of the Markdown links, images, reference definitions and HTML src/href of a file."""
    prose = without_code_spans(split_fences(path.read_text())[0])
    targets = re.findall(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)", prose)
    targets += re.findall(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)", prose, flags=re.M)
    targets += re.findall(r"<(?:img|a)\s[^>]*?(?:src|href)=\"([^\"]+)\"", prose)
    return targets


def github_slug(heading: str) -> str:
    """GitHub's anchor for a heading: its text as rendered, lower case, punctuation and symbols
    dropped (letters, digits, '_', '-' and spaces kept), each space a '-'."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # links and images: their text
    text = re.sub(r"<[^>]+>", "", text).replace("`", "").replace("*", "")
    text = "".join(c for c in text.lower() if c.isalpha() or c.isdecimal() or c in "_- ")
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """The anchors of a Markdown file's headings (repeats get -1, -2, ... as on GitHub) and of its
    explicit HTML anchors."""
    prose = split_fences(path.read_text())[0]
    found, seen = set(), {}
    for heading in re.findall(r"^\s{0,3}#{1,6}\s+(.+?)\s*#*\s*$", prose, flags=re.M):
        slug = github_slug(heading)
        count = seen.get(slug, 0)
        found.add(slug if count == 0 else f"{slug}-{count}")
        seen[slug] = count + 1
    found.update(re.findall(r"<a\s[^>]*?(?:id|name)=\"([^\"]+)\"", prose))
    return found


def test_github_slugs_follow_githubs_rules():
    assert github_slug("Pong with `--preset atari_fast` (`r2d2_mp.py`, in progress)") == \
        "pong-with---preset-atari_fast-r2d2_mppy-in-progress"
    assert github_slug("CartPole: sequence length × burn-in (the seed's study)") == \
        "cartpole-sequence-length--burn-in-the-seeds-study"
    assert github_slug("Saved models, evaluation and pictures: [`evaluate.py`](x.md)") == \
        "saved-models-evaluation-and-pictures-evaluatepy"


def test_the_pages_checked_include_the_readme_docs_and_folder_readmes():
    names = {path.relative_to(ROOT).as_posix() for path in markdown_files()}
    assert {"README.md", "docs/results.md", "docs/architecture.md", "benchmarks/README.md",
            "tests/README.md", "experiment_configs/README.md", "write_and_test/README.md"} <= names


@pytest.mark.parametrize("page", markdown_files(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_relative_link_and_image_resolves(page):
    broken = []
    for target in links(page):
        if re.match(r"[a-zA-Z][a-zA-Z0-9+.-]*:", target) or target.startswith("//"):
            continue  # https:, mailto: ...: not checked here
        file_part, _, fragment = unquote(target).partition("#")
        linked = (page.parent / file_part).resolve() if file_part else page
        if not linked.exists():
            broken.append(f"{target}: no such file")
        elif fragment and linked.suffix == ".md" and fragment not in anchors(linked):
            broken.append(f"{target}: no heading #{fragment} in {linked.relative_to(ROOT)}")
    assert not broken, f"{page.relative_to(ROOT)}: " + "; ".join(broken)


def test_the_readme_is_a_door():
    size = len(README.read_bytes())
    assert size <= 15_000, f"README.md is {size:,} bytes: move what is not the door to docs/"
    linked = {(README.parent / unquote(t).partition("#")[0]).resolve() for t in links(README)}
    unlinked = [page.name for page in sorted(DOCS.glob("*.md")) if page.resolve() not in linked]
    assert not unlinked, f"README.md links to no docs/{unlinked}"


@pytest.mark.parametrize("page", [README, *sorted(DOCS.glob("*.md"))], ids=lambda p: p.relative_to(ROOT).as_posix())
def test_scripts_named_in_code_blocks_exist(page):
    """Commands run from the repository root: every path to a script, notebook, config or
    requirements file in a code block, and every file `python` or `pip -r` is given, is there."""
    missing = set()
    for block in split_fences(page.read_text())[1]:
        paths = re.findall(r"(?<![\w./<{$-])((?:[\w.-]+/)+[\w-]+\.(?:py|ipynb|yaml|yml|txt))\b", block)
        paths += re.findall(r"(?:\bpython|\s-r)\s+([\w-]+\.(?:py|txt))\b", block)
        missing.update(path for path in paths if not (ROOT / path).exists())
    assert not missing, f"{page.relative_to(ROOT)} names {sorted(missing)}, which do not exist"


@pytest.mark.parametrize("name", VARIANT_PAGES)
def test_variant_pages_have_cleanrls_sections_in_order(name):
    sections = re.findall(r"^## (.+?)\s*$", split_fences((DOCS / name).read_text())[0], flags=re.M)
    assert sections == VARIANT_SECTIONS, f"docs/{name}: sections {sections}"


def test_every_results_figure_is_on_the_results_page():
    shown = {(DOCS / unquote(t).partition("#")[0]).resolve() for t in links(DOCS / "results.md")}
    figures = [*(ROOT / "write_and_test" / "figures").glob("*.png"), *(ROOT / "write_and_test" / "figures").glob("*.gif"),
               *(ROOT / "benchmarks" / "results").rglob("*.png")]
    assert figures
    missing = [f.relative_to(ROOT).as_posix() for f in sorted(figures) if f.resolve() not in shown]
    assert not missing, f"docs/results.md does not show {missing}"
