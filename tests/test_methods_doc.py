"""The methods document ``docs/methods.md`` and the references to it.

Docstrings, comments, configs and READMEs cite the document as ``methods`` followed by a section sign and number
(a section) or by ``P-`` and a number (a pitfall), and the READMEs link to its anchors. These tests check that
every such reference and link lands on a numbered heading of the document, that every numbered heading carries
its fixed anchor, and that no reference to the unshipped design spec is left.
"""

from __future__ import annotations

import bisect
import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "methods.md"
SCANNED_DIRS = ("baldro_lightning", "tests", "experiments")
SCANNED_SUFFIXES = {".py", ".yaml", ".yml", ".md"}
SCANNED_FILES = ("README.md", "data/README.md")

SECTION_SIGN = "\u00a7"
SECTION = rf"{SECTION_SIGN}\d+(?:\.\d+)*[a-z]?"
PITFALL = r"P-\d+"
SEPARATOR = r"(?:[ \t]*[,/;][ \t]*|,?[ \t]+(?:and|or)[ \t]+)"
RANGE = r"[ \t]*[-\u2013][ \t]*"
REFERENCE_LIST = re.compile(
    rf"\bmethods[ \t]+(?P<refs>(?:{SECTION}|{PITFALL})"
    rf"(?:{SEPARATOR}(?:{SECTION}|{PITFALL})|{RANGE}{SECTION_SIGN}?\d+(?:\.\d+)*[a-z]?)*)",
    re.IGNORECASE,
)
"""A methods reference and the bare references that continue its list (after a comma, "and", a range dash)."""
ONE_REFERENCE = re.compile(rf"{SECTION}|{PITFALL}|(?<=[-\u2013])\d+(?:\.\d+)*[a-z]?|(?<=[-\u2013] )\d+(?:\.\d+)*")
DOC_LINK = re.compile(r"\]\((?P<path>[^)#\s]*methods\.md)#(?P<anchor>[^)\s]+)\)")
SPEC_REFERENCE = re.compile(rf"\bspec(?:'s)?[ \t:]+(?:{SECTION_SIGN}|P-\d)", re.IGNORECASE)
HEADING = re.compile(
    rf'^#{{1,6}}[ \t]+(?:<a id="(?P<id>[^"]*)"></a>)?[ \t]*(?P<ref>{SECTION}|{PITFALL})(?=[\s:]|$)', re.MULTILINE
)
ANCHOR = re.compile(r'<a id="(?P<id>[^"]+)"></a>')


def anchor_of(reference: str) -> str:
    """The anchor id of a section or pitfall: section 3.1a -> ``s3.1a``, pitfall 24 -> ``p-24``."""
    if reference.startswith(SECTION_SIGN):
        return "s" + reference[1:]
    return reference.lower()


def scanned_files() -> list[Path]:
    files = [ROOT / name for name in SCANNED_FILES if (ROOT / name).is_file()]
    for directory in SCANNED_DIRS:
        for path in sorted((ROOT / directory).rglob("*")):
            parts = path.relative_to(ROOT).parts
            if path.suffix in SCANNED_SUFFIXES and path.is_file() and not any(p.startswith(".") for p in parts):
                files.append(path)
    return files


def lines_of(path: Path) -> list[tuple[int, str]]:
    try:
        return list(enumerate(path.read_text(encoding="utf-8").splitlines(), 1))
    except UnicodeDecodeError:
        return []


def joined(path: Path) -> tuple[str, list[int]]:
    """The file's lines joined by single spaces, without indentation or comment markers, so that a reference broken
    across two lines reads as one; and the offset at which each line starts (for :func:`line_at`)."""
    parts, starts, offset = [], [], 0
    for _, line in lines_of(path):
        text = re.sub(r"^[ \t]*(?:#+[ \t]*)?", "", line)
        parts.append(text)
        starts.append(offset)
        offset += len(text) + 1
    return " ".join(parts), starts


def line_at(starts: list[int], offset: int) -> int:
    return bisect.bisect_right(starts, offset)


@pytest.fixture(scope="module")
def doc_anchors() -> set[str]:
    assert DOC.is_file(), f"{DOC.relative_to(ROOT)} is missing; the code's references point into it"
    return {match["id"] for match in ANCHOR.finditer(DOC.read_text(encoding="utf-8"))}


@pytest.fixture(scope="module")
def references() -> list[tuple[str, int, str]]:
    """``(file, line, reference)`` for every methods reference, list continuations included."""
    found = []
    for path in scanned_files():
        text, starts = joined(path)
        for match in REFERENCE_LIST.finditer(text):
            number = line_at(starts, match.start())
            for ref in ONE_REFERENCE.findall(match["refs"]):
                if not ref.startswith((SECTION_SIGN, "P-", "p-")):
                    ref = SECTION_SIGN + ref  # the end of a range such as 5.1-5.2
                found.append((str(path.relative_to(ROOT)), number, ref.upper() if ref[0] in "pP" else ref))
    return found


def test_numbered_headings_carry_their_anchor() -> None:
    text = DOC.read_text(encoding="utf-8")
    headings = list(HEADING.finditer(text))
    assert len(headings) > 30, "docs/methods.md should have a numbered heading per section and pitfall"
    wrong = [
        f"{m['ref']}: anchor {m['id']!r}, expected {anchor_of(m['ref'])!r}"
        for m in headings
        if m["id"] != anchor_of(m["ref"])
    ]
    assert not wrong, "numbered headings without their fixed anchor:\n" + "\n".join(wrong)
    anchors = [m["id"] for m in ANCHOR.finditer(text)]
    duplicates = sorted({a for a in anchors if anchors.count(a) > 1})
    assert not duplicates, f"anchors used twice in docs/methods.md: {duplicates}"


def test_methods_references_resolve(references: list[tuple[str, int, str]], doc_anchors: set[str]) -> None:
    assert references, "no methods references found; the pattern or the replacement script is broken"
    missing = [f"{file}:{line}: {ref}" for file, line, ref in references if anchor_of(ref) not in doc_anchors]
    assert not missing, "references to sections or pitfalls that docs/methods.md lacks:\n" + "\n".join(missing)


def test_links_to_methods_resolve(doc_anchors: set[str]) -> None:
    broken = []
    for path in scanned_files():
        if path.suffix != ".md":
            continue
        for number, line in lines_of(path):
            for match in DOC_LINK.finditer(line):
                target = (path.parent / match["path"]).resolve()
                where = f"{path.relative_to(ROOT)}:{number}: {match['path']}#{match['anchor']}"
                if target != DOC.resolve():
                    broken.append(f"{where} (the path does not lead to docs/methods.md)")
                elif match["anchor"] not in doc_anchors:
                    broken.append(f"{where} (no such anchor)")
    assert not broken, "broken links to docs/methods.md:\n" + "\n".join(broken)


def test_no_reference_to_the_unshipped_spec_remains() -> None:
    left = []
    for path in scanned_files():
        if path.resolve() == Path(__file__).resolve():
            continue
        text, starts = joined(path)
        lines = path.read_text(encoding="utf-8").splitlines()
        for match in SPEC_REFERENCE.finditer(text):
            number = line_at(starts, match.start())
            left.append(f"{path.relative_to(ROOT)}:{number}: {lines[number - 1].strip()[:100]}")
    assert not left, (
        "references to the design spec, which is not in the repository; cite docs/methods.md instead "
        f"(methods + section or pitfall number):\n{os.linesep.join(left)}"
    )
