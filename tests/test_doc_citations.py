"""Every doc the code cites exists (issue 18, item 7): a reader who follows a citation finds the page,
and the section, it names.

The modules, tests, scripts, unit files and docs of the tree (README.md, setup.cfg, jizhi/, workers/,
cube/, bin/, etc/, tests/, docs/) are read as text. Three kinds of citation are checked:

* a path ``docs/...`` is a file or directory of the tree;
* a Markdown file named anywhere (``formats.md``, ``docs/formats.md``, ``examples/node/README.md``) is
  in the tree: at that path from the top, from the citing file's directory or in docs/ (a document
  kept outside the repository is no citation a reader can follow);
* a section cited the way this tree cites one, a page of docs/ or the README, a comma, then the
  title in double quotes (a citation may wrap onto the next line of a docstring or comment), is a
  heading of that page or the bold lead-in of one of its paragraphs: the title, or its start up to
  a colon, a comma or a parenthesis.
"""
import os
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PLACES = ("README.md", "setup.cfg", "jizhi", "workers", "cube", "bin", "etc", "tests", "docs")
SKIP_DIRS = {"__pycache__", "node_modules"}

DOCS_PATH = re.compile(r"(?<![\w./-])docs/[\w./-]*\w")
MARKDOWN = re.compile(r"(?<![\w./:-])[\w][\w./-]*\.md\b")
SECTION = re.compile(r"(?<![\w./-])(docs/[\w./-]+\.md|README(?:\.md)?)\)?,? \"([^\"]+)\"")
WRAP = re.compile(r"[ \t]*\n[ \t]*(?:#+[ \t]*)?")      # a line break inside a citation, and a comment's "#"
HEADING = re.compile(r"^#{1,6} +(.+?) *$", re.M)
LEAD_IN = re.compile(r"^\*\*(.+?)\*\*", re.M)


def texts():
    """(path relative to the top, text) of every text file in the places above."""
    for place in PLACES:
        top = ROOT / place
        paths = [top] if top.is_file() else (
            Path(d) / n for d, dirs, names in os.walk(top)
            if not dirs.__setitem__(slice(None), [x for x in dirs if x not in SKIP_DIRS and x[0] != "."])
            for n in names)
        for path in paths:
            try:
                yield path.relative_to(ROOT), path.read_text()
            except (UnicodeDecodeError, OSError):
                continue    # a PNG, a compiled file


def line_of(text, pos):
    return text.count("\n", 0, pos) + 1


def titles(page):
    """The headings and bold paragraph lead-ins of a Markdown page."""
    text = (ROOT / page).read_text()
    return [t.rstrip(".").strip() for t in HEADING.findall(text) + LEAD_IN.findall(text)]


def names_section(title, cited):
    return title == cited or (title.startswith(cited) and title[len(cited)] in ":,( ")


def test_every_docs_path_a_file_names_exists():
    missing = [f"{rel}:{line_of(text, m.start())}: {m.group(0)}"
               for rel, text in texts() for m in DOCS_PATH.finditer(text)
               if not (ROOT / m.group(0).rstrip(".")).exists()]
    assert not missing, "cited but not in the tree:\n" + "\n".join(missing)


def test_every_markdown_page_a_file_names_is_in_the_repository():
    missing = []
    for rel, text in texts():
        for m in MARKDOWN.finditer(text):
            name = m.group(0)
            if not any(p.is_file() for p in (ROOT / name, ROOT / rel.parent / name, ROOT / "docs" / name)):
                missing.append(f"{rel}:{line_of(text, m.start())}: {name}")
    assert not missing, "pages named but not in the repository:\n" + "\n".join(missing)


def test_every_section_a_file_cites_is_a_heading_of_its_page():
    pages, missing = {}, []
    for rel, text in texts():
        flat = WRAP.sub(" ", text)
        for m in SECTION.finditer(flat):
            page = "README.md" if m.group(1).startswith("README") else m.group(1)
            if not (ROOT / page).is_file():
                continue    # the first test says so
            if not any(names_section(t, m.group(2)) for t in pages.setdefault(page, titles(page))):
                missing.append(f"{rel}: {page}, \"{m.group(2)}\"")
    assert not missing, "sections cited but not in their page:\n" + "\n".join(missing)
