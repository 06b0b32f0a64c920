#!/usr/bin/env python3
"""Regenerate the judge prompts in third_party/{llava,mm-vet,mathvista}/ from checkouts of the official repositories.

The texts are read from the Python sources with `ast` (nothing is imported or run) and written exactly as Python
evaluates the literals, so `\\n` escapes become newlines, as the official scripts send them.

Usage (from the repo root; each argument is a git directory or work tree at the commit named in its README):
    .venv/bin/python tools/extract_eval_prompts.py --llava LLaVA --mm-vet MM-Vet --mathvista MathVista

Running it twice produces identical bytes.
"""

import argparse
import ast
import subprocess
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "third_party"


def read(repo: Path, path: str) -> bytes:
    """A file at HEAD of a git directory (bare or not)."""
    return subprocess.run(["git", "-C", str(repo), "show", f"HEAD:{path}"], check=True, capture_output=True).stdout


def string_constants(source: bytes):
    return [node.value for node in ast.walk(ast.parse(source)) if isinstance(node, ast.Constant)
            and isinstance(node.value, str)]


def module_assignment(source: bytes, name: str) -> str:
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign) and [t.id for t in node.targets if isinstance(t, ast.Name)] == [name]:
            return ast.literal_eval(node.value)
    raise SystemExit(f"no module-level assignment to {name}")


def only(values, description):
    values = sorted(set(values))
    if len(values) != 1:
        raise SystemExit(f"expected one {description}, found {values}")
    return values[0]


def write(relative: str, data):
    path = OUT / relative
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
    print(f"wrote {path.relative_to(OUT.parent)} ({path.stat().st_size} bytes)")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--llava", type=Path, required=True, help="haotian-liu/LLaVA")
    parser.add_argument("--mm-vet", type=Path, required=True, help="yuweihao/MM-Vet")
    parser.add_argument("--mathvista", type=Path, required=True, help="lupantech/MathVista")
    args = parser.parse_args()

    write("llava/LICENSE", read(args.llava, "LICENSE"))
    write("llava/rule.json", read(args.llava, "llava/eval/table/rule.json"))
    review = read(args.llava, "llava/eval/eval_gpt_review_bench.py")
    write("llava/review_system_prompt.txt",
          only([s for s in string_constants(review) if s.startswith("You are a helpful")], "system prompt"))

    write("mm-vet/LICENSE", read(args.mm_vet, "LICENSE"))
    grader = read(args.mm_vet, "mm-vet_evaluator.py")
    write("mm-vet/grader_prompt.txt", module_assignment(grader, "prompt"))
    write("mm-vet/retry_suffix.txt",
          only([s for s in string_constants(grader) if "Predict the correctness" in s], "re-ask suffix"))

    write("mathvista/LICENSE", read(args.mathvista, "LICENSE"))
    write("mathvista/demo_prompt.txt",
          module_assignment(read(args.mathvista, "evaluation/prompts/ext_ans.py"), "demo_prompt"))


if __name__ == "__main__":
    main()
