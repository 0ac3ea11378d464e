"""The fenced code blocks of README.md and docs/*.md, as the tests that run them read them."""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGES = ["README.md", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md"))]
COMMAND_LANGUAGES = ("bash", "sh", "console", "python")  # a block in another language (text, a layout) is no command
FENCE = re.compile(r"^```(\S*)\n(.*?)^```", re.S | re.M)


@dataclass(frozen=True)
class Block:
    page: str  # relative to the repository root
    section: str  # the heading above the block, with its #s
    language: str
    nth: int  # among the blocks of this language in the section
    text: str

    @property
    def key(self) -> tuple[str, str, str, int]:
        return (self.page, self.section, self.language, self.nth)


def page_blocks(page: str) -> list[Block]:
    """Every fenced block of ``page``, in order, each with the nearest heading above it."""
    text = (ROOT / page).read_text()
    out, seen = [], {}
    for m in FENCE.finditer(text):
        headings = re.findall(r"^#+ .*$", FENCE.sub("", text[:m.start()]), re.M)  # a "# comment" in a block is none
        section = headings[-1] if headings else ""
        nth = seen.get((section, m.group(1)), 0)
        seen[(section, m.group(1))] = nth + 1
        out.append(Block(page, section, m.group(1), nth, m.group(2)))
    return out


def command_blocks() -> list[Block]:
    """The blocks of README and the docs pages that hold commands or Python."""
    return [b for page in PAGES for b in page_blocks(page) if b.language in COMMAND_LANGUAGES]


def block(page: str, section: str, language: str = "bash", nth: int = 0) -> str:
    """The ``nth`` ``language`` block under the heading of ``page`` that starts with ``section``."""
    found = [b for b in page_blocks(page) if b.section.startswith(section) and b.language == language]
    if len(found) <= nth:
        raise LookupError(f"{page} has no {language} block {nth} under a heading starting with {section!r}")
    return found[nth].text


def nbsrc_commands(text: str) -> list[list[str]]:
    """The ``python -m nbsrc`` lines of a block as argument lists after ``-m nbsrc`` (comments dropped)."""
    return [shlex.split(line, comments=True)[3:] for line in text.splitlines() if "-m nbsrc " in line]
