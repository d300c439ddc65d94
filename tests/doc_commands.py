"""The commands README.md and docs/*.md give users, split as bash splits them: what tests/test_docs.py
validates and tests/test_launch.py sends through the launchers."""
import glob
import math
import os
import re
import shlex

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FENCE = re.compile(r"^ *```(\w*)\n(.*?)^ *```", re.S | re.M)  # list items indent theirs
INLINE = re.compile(r"`([^`\n]+)`")


def doc_files() -> list[str]:
    return [os.path.join(ROOT, "README.md")] + sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))


def read(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


def prose(text: str) -> str:
    """The text without its fenced blocks."""
    return FENCE.sub("", text)


def split(line: str) -> list[list[str]]:
    """A shell line as bash splits it: words (quotes removed, comments dropped), one list per
    command of a `&&` / `;` / `|` chain. Unquoted parentheses are a syntax error in bash: here too."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split, lexer.commenters = True, "#"
    commands, words = [], []
    for token in lexer:
        if token in ("&&", ";", "|", "||", "&"):
            commands.append(words)
            words = []
        elif token in ("(", ")") or token.startswith(("(", ")")):
            raise ValueError(f"unquoted parenthesis in {line!r}: bash reads it as a syntax error")
        else:
            words.append(token)
    return [c for c in commands + [words] if c]


def commands() -> list[tuple[str, list[str], dict]]:
    """(where, argv, exported environment) of every command in a ```bash block or an inline
    `python ...` / `launch/...` span of the README and docs/*.md."""
    out = []
    for path in doc_files():
        text, name = read(path), os.path.relpath(path, ROOT)
        for lang, body in FENCE.findall(text):
            if lang not in ("bash", "sh"):
                continue
            env = {}
            for line in body.replace("\\\n", " ").splitlines():
                for argv in split(line):
                    if argv[0] == "export":
                        env.update(w.split("=", 1) for w in argv[1:] if "=" in w)
                        continue
                    while argv and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", argv[0]):  # VAR=value command
                        env = {**env, **dict([argv.pop(0).split("=", 1)])}
                    if argv:
                        out.append((f"{name}: {line.strip()[:90]}", argv, dict(env)))
        for span in INLINE.findall(prose(text)):
            if span.startswith(("python ", "launch/")):
                for argv in split(span):
                    out.append((f"{name}: `{span[:90]}`", argv, {}))
    return out


def overrides() -> list[str]:
    """Every `--config.*` word of every command in the docs, as the program receives it."""
    seen = []
    for _, argv, _ in commands():
        seen += [w for w in argv if w.startswith("--config.") and w not in seen]
    return seen


def chips(accelerator: str) -> int:
    """Chips of a Cloud TPU name: v4-N and v5p-N count TensorCores (2 per chip), v5litepod-N,
    v5e-N and v6e-N chips; 'v5p:4x4x4' is the chip grid."""
    if ":" in accelerator:
        return math.prod(int(n) for n in accelerator.split(":")[1].split("x"))
    kind, n = accelerator.rsplit("-", 1)
    return int(n) // 2 if kind in ("v4", "v5p") else int(n)
