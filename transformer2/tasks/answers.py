"""Answer parsers shared by several tasks. A parser never guesses: what it cannot find is None."""
from __future__ import annotations

import re
from typing import Optional


def extract_boxed(text: str) -> Optional[str]:
    """Content of the last \\boxed{...} / \\fbox{...} (nested braces kept), or of `\\boxed 5`."""
    starts = [m for m in re.finditer(r"\\(?:boxed|fbox)\s*", text)]
    for m in reversed(starts):
        i = m.end()
        if i < len(text) and text[i] == "{":
            depth = 0
            for j in range(i, len(text)):
                depth += {"{": 1, "}": -1}.get(text[j], 0)
                if depth == 0:
                    return text[i + 1:j].strip()
        elif m.group(0).endswith(" "):
            word = re.match(r"[^\s$]+", text[i:])
            if word:
                return word.group(0).rstrip(".")
    return None


_FENCE = re.compile(r"```[ \t]*([\w+#.-]*)[^\n]*\n(.*?)(?:```|\Z)", re.DOTALL)


def extract_code(completion: str, entry_point: Optional[str] = None) -> str:
    """Python from ```python fences: the last block defining `entry_point` if any, else all
    Python blocks joined; the raw text (indentation kept) when there is no fence."""
    blocks = [code for lang, code in _FENCE.findall(completion)
              if lang.lower() in ("", "python", "py", "python3")]
    if not blocks:
        return completion
    if entry_point:
        defining = [b for b in blocks if re.search(rf"^\s*def\s+{re.escape(entry_point)}\s*\(", b, re.M)]
        if defining:
            return defining[-1]
    return "\n\n".join(blocks)


CODE_SYSTEM_PROMPT = ("You are an expert Python programmer who writes correct, efficient code. Reply "
                      "with a complete, self-contained solution in a single ```python code block.")
