"""The prose of the benchmark reports, kept out of the code in Markdown beside this module (``<name>.md``).

A file is a list of ``## <key>`` sections (text before the first one is a comment for its reader); a section is one
paragraph of a report, its lines joined with single spaces, with Python format fields (``{name}``,
``{name:.2f}``) that the renderer fills in with numbers.
"""

from __future__ import annotations

import functools
import os

HERE = os.path.dirname(os.path.abspath(__file__))


@functools.lru_cache(maxsize=None)
def sections(name: str) -> dict[str, str]:
    """``{key: paragraph}`` of ``benchmarks/notes/<name>.md``, in file order."""
    with open(os.path.join(HERE, f"{name}.md"), encoding="utf-8") as fh:
        text = fh.read()
    out: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        if line.startswith("## "):
            current = line[3:].strip()
            if current in out:
                raise ValueError(f"{name}.md: section {current!r} twice")
            out[current] = []
        elif current is not None and line.strip():
            out[current].append(line.strip())
    return {key: " ".join(lines) for key, lines in out.items()}


def note(name: str, key: str, **values: object) -> str:
    """Section ``key`` of ``<name>.md`` with its format fields filled in from ``values``."""
    return sections(name)[key].format(**values)
