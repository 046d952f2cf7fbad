"""Rewrite reST math/roles in docstrings to the Markdown that mkdocstrings renders.

``:math:`x``` -> ``$x$``; a ``.. math::`` block -> ``$$ ... $$``; ``:func:`x``` / ``:class:`x``` /
``:mod:`x``` / ``:meth:`x``` -> ``x`` in backticks. Run: ``python tools/md_docstrings.py FILES``.
"""

from __future__ import annotations

import re
import sys

ROLE = re.compile(r":(?:func|class|mod|meth|attr|data):`~?([^`]+)`")
MATH = re.compile(r":math:`([^`]+)`")


def convert(text: str) -> str:
    text = MATH.sub(lambda m: f"${m.group(1)}$", text)
    text = ROLE.sub(lambda m: f"`{m.group(1)}`", text)
    lines, out, i = text.split("\n"), [], 0
    while i < len(lines):
        line = lines[i]
        m = re.match(r"^(\s*)\.\. math::\s*(.*)$", line)
        if not m:
            out.append(line)
            i += 1
            continue
        indent, inline = m.group(1), m.group(2)
        body = [inline] if inline else []
        i += 1
        while i < len(lines) and (not lines[i].strip() or lines[i].startswith(indent + " ")):
            if not lines[i].strip() and body and i + 1 < len(lines) and not lines[
                i + 1
            ].startswith(indent + " "):
                break
            body.append(lines[i].strip())
            i += 1
        body = [b for b in body if b]
        out.append(f"{indent}$$")
        out.extend(f"{indent}{b}" for b in body)
        out.append(f"{indent}$$")
    return "\n".join(out)


if __name__ == "__main__":
    for path in sys.argv[1:]:
        with open(path) as f:
            src = f.read()
        new = convert(src)
        if new != src:
            with open(path, "w") as f:
                f.write(new)
            print("rewrote", path)
