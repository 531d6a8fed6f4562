"""A stand-in `kubectl` for tests (there is no cluster here): it records every call with its
arguments and stdin in calls.jsonl and prints canned answers."""

from __future__ import annotations

import json
import stat
import sys
from pathlib import Path


def fake_kubectl(tmp_path: Path, answers: dict[str, str] | None = None) -> Path:
    """A `kubectl` that appends {argv, stdin} to calls.jsonl and prints answers[argv[0]]."""
    bindir = tmp_path / "bin"
    bindir.mkdir(exist_ok=True)
    (tmp_path / "answers.json").write_text(json.dumps(answers or {}))
    script = bindir / "kubectl"
    script.write_text(f"""#!{sys.executable}
import json, sys
args = sys.argv[1:]
stdin = sys.stdin.read() if "-" in args else None
with open({str(tmp_path / "calls.jsonl")!r}, "a") as f:
    f.write(json.dumps({{"argv": args, "stdin": stdin}}) + "\\n")
answers = json.load(open({str(tmp_path / "answers.json")!r}))
key = " ".join(args[:2])
print(answers.get(key, answers.get(args[0], "")), end="")
""")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return bindir


def kubectl_calls(tmp_path: Path) -> list[dict]:
    path = tmp_path / "calls.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []
