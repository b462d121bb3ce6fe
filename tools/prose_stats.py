"""Measures how plain a notebook's prose is: words per sentence and parenthetical remarks, in its markdown cells.

    python tools/prose_stats.py [notebooks/src/NN_name.py ...]

A markdown cell's text is read without code (fenced blocks and `inline code` become one word), links keep their
text, headings and list items count as sentences of their own. A sentence ends at ``.``, ``?`` or ``!``
followed by a space or the end of a line, at a line that starts a list item or heading, and at a blank line.
A parenthetical is a ``(...)`` in the text (code and links left out) or a pair of em dashes.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CELL = re.compile(r"^# %%(.*)$", re.M)
FENCE = re.compile(r"```.*?```", re.S)
INLINE_CODE = re.compile(r"`[^`]*`")
LINK = re.compile(r"\[([^\]]*)\]\([^)]*\)")
MATH = re.compile(r"\$[^$]+\$")
SENTENCE_END = re.compile(r"(?<=[.?!])\s+|\n\s*\n|\n(?=\s*(?:[-*]|\d+\.|#+)\s)")


def markdown_cells(source: str) -> list[str]:
    """The text of each markdown cell of a jupytext percent-format source, without its leading ``# ``."""
    parts = CELL.split(source)
    cells = []
    for header, body in zip(parts[1::2], parts[2::2], strict=True):
        if "[markdown]" in header:
            lines = body.splitlines()
            cells.append("\n".join(line[2:] if line.startswith("# ") else line.lstrip("#") for line in lines))
    return cells


def stats(path: Path) -> dict[str, float]:
    sentences, parentheticals = [], 0
    for text in markdown_cells(path.read_text()):
        text = INLINE_CODE.sub("code", FENCE.sub("code", MATH.sub("math", LINK.sub(r"\1", text))))
        parentheticals += len(re.findall(r"\([^()]*\)", text)) + text.count("—") // 2
        for sentence in SENTENCE_END.split(text):
            words = re.findall(r"[\w'’.-]+", re.sub(r"^\s*(?:[-*]|\d+\.|#+)\s+", "", sentence))
            if len(words) >= 3:  # a heading of one or two words, a label: not a sentence
                sentences.append(len(words))
    return {"sentences": len(sentences), "words_per_sentence": sum(sentences) / max(len(sentences), 1),
            "over_30_words": sum(n > 30 for n in sentences), "parentheticals": parentheticals}


def main(paths: list[str]) -> None:
    paths = paths or sorted(str(p) for p in (ROOT / "notebooks" / "src").glob("[0-9]*.py"))
    print(f"{'notebook':32} {'sentences':>9} {'words/sentence':>14} {'over 30':>7} {'parentheticals':>14}")
    for name in paths:
        s = stats(Path(name))
        print(f"{Path(name).stem:32} {s['sentences']:9d} {s['words_per_sentence']:14.1f} {s['over_30_words']:7d} "
              f"{s['parentheticals']:14d}")


if __name__ == "__main__":
    main(sys.argv[1:])
