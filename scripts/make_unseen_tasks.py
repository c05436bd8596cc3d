#!/usr/bin/env python3
"""Classification tasks the defaults were never tuned on, derived from the fetched assets
(run `make assets` first). Written as JSON lines under assets/data/unseen/:

  source/{train,dev,test}.jsonl   which corpus a snippet comes from: tweet, amazon, nyt, movie
                                  (4 classes, imbalanced about 4:3:4:1 after subsampling)
  longdocs/{train,dev,test}.jsonl documents of 40 consecutive snippets (tweets, Amazon, NYT), far
                                  past the model's 512 positions; label: the majority sentiment
"""
import json
import random
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "assets" / "data"
OUT = DATA / "unseen"


def rows(path: Path):
    lines = path.read_text(encoding="utf-8").splitlines()[1:]
    return [tuple(line.split("\t")) for line in lines]


def write(task: str, examples, rng: random.Random) -> None:
    rng.shuffle(examples)
    n = len(examples)
    cut = {"test": examples[: n // 10], "dev": examples[n // 10 : n // 5], "train": examples[n // 5 :]}
    (OUT / task).mkdir(parents=True, exist_ok=True)
    for split, items in cut.items():
        with open(OUT / task / f"{split}.jsonl", "w", encoding="utf-8") as f:
            for text, label in items:
                f.write(json.dumps({"text": text, "label": label}, ensure_ascii=False) + "\n")
    counts = {}
    for _, label in examples:
        counts[label] = counts.get(label, 0) + 1
    print(f"{task}: {n} examples, labels {counts}")


def main() -> None:
    rng = random.Random(0)
    corpora = {name: rows(DATA / "domain-shift" / f"{name}.tsv") for name in ("tweets", "amazon", "nyt")}
    corpora["movie"] = rows(DATA / "movie-reviews" / "train.tsv")
    # Subsampled to keep a CPU run short, in deliberately unequal shares.
    shares = {"tweets": 1600, "amazon": 1200, "nyt": 1600, "movie": 400}
    source = [(text, name) for name, n in shares.items() for text, _ in rng.sample(corpora[name], n)]
    write("source", source, rng)

    docs = []
    for name in ("tweets", "amazon", "nyt"):
        snippets = corpora[name]
        for start in range(0, len(snippets) - 40, 40):
            chunk = snippets[start : start + 40]
            positive = sum(label == "positive" for _, label in chunk)
            docs.append((" ".join(text for text, _ in chunk), "positive" if positive * 2 > len(chunk) else "negative"))
    write("longdocs", docs, rng)


if __name__ == "__main__":
    main()
