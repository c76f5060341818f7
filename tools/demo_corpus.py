"""Writes the demo's training corpus: every fortune of Debian's `fortunes` package (English
quotations, jokes and verse, about 2.5 MB) as one JSONL document each, {"text": ...}, the
last 2% held out for evaluation.

    .venv/bin/python tools/demo_corpus.py runs/demo    # -> runs/demo/{train,eval}.jsonl
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

FORTUNES = Path("/usr/share/games/fortunes")


def documents() -> list[str]:
    docs = []
    for path in sorted(FORTUNES.iterdir()):
        if path.suffix or not path.is_file() or path.name == "ascii-art":  # .dat indexes, .u8 links, pictures
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        docs += [d.strip() for d in text.split("\n%\n") if d.strip()]
    return docs


def main() -> None:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/demo")
    if not FORTUNES.is_dir():
        sys.exit(f"demo_corpus: {FORTUNES} is missing: run `make setup` (it installs Debian's fortunes)")
    docs = documents()
    random.Random(0).shuffle(docs)
    held_out = max(1, len(docs) // 50)
    out.mkdir(parents=True, exist_ok=True)
    for name, part in (("eval", docs[:held_out]), ("train", docs[held_out:])):
        with open(out / f"{name}.jsonl", "w") as f:
            for doc in part:
                f.write(json.dumps({"text": doc}) + "\n")
    print(f"demo_corpus: {len(docs) - held_out} training and {held_out} evaluation documents in {out}")


if __name__ == "__main__":
    main()
