"""Shared pieces of the Python tests: the tiny fixture models, a separable toy task, the CLI binary."""

import os
import pathlib
import shutil

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[3]
FIXTURES = ROOT / "tests" / "fixtures"
MINILM = str(ROOT / "assets" / "models" / "all-MiniLM-L6-v2")
CLI = pathlib.Path(os.environ.get("SOFTPROMPT_BIN", ROOT / "target" / "release" / "softprompt"))

POSITIVE = ["good", "great", "fun", "wonderful", "moving", "love"]
NEGATIVE = ["bad", "awful", "dull", "boring", "weak", "hate"]
FILLER = ["the", "movie", "film", "plot", "was", "very"]


def toy_rows(n=48):
    """The CLI tests' toy task: (text, label) pairs in the tiny vocabulary."""
    rows = []
    for i in range(n):
        words, label = (POSITIVE, "positive") if i % 2 == 0 else (NEGATIVE, "negative")
        rows.append((f"{FILLER[i % 6]} {words[i % 6]} {FILLER[(i + 1) % 6]} {words[(i + 3) % 6]}", label))
    return rows


def dev_rows():
    return [
        (f"a {POSITIVE[i % 6]} film", "positive") if i % 2 == 0 else (f"a {NEGATIVE[i % 6]} film", "negative")
        for i in range(8)
    ]


def write_tsv(path, rows):
    path.write_text("text\tlabel\n" + "".join(f"{t}\t{l}\n" for t, l in rows))
    return str(path)


@pytest.fixture(scope="session")
def tiny_bert():
    return str(FIXTURES / "tiny-bert")


@pytest.fixture(scope="session")
def tiny_decoder(tmp_path_factory):
    """A tiny GPT-2 with the tiny BERT's tokenizer (as the CLI tests build it)."""
    model = tmp_path_factory.mktemp("models") / "tiny-decoder"
    model.mkdir()
    for f in ["config.json", "model.safetensors"]:
        shutil.copy(FIXTURES / "tiny-gpt2" / f, model / f)
    shutil.copy(FIXTURES / "tiny-bert" / "tokenizer.json", model / "tokenizer.json")
    return str(model)


@pytest.fixture(scope="session")
def cli():
    if not CLI.exists():
        pytest.fail(f"{CLI} is missing: `cargo build --release` first (make test does)")
    return str(CLI)


# the options every toy run uses: short, evaluated often, the same on both sides
TOY = dict(max_steps=40, eval_every=10, patience=0, num_virtual_tokens=4, batch_size=8, seed=7)
TOY_FLAGS = ["--max-steps", "40", "--eval-every", "10", "--patience", "0", "--num-virtual-tokens", "4",
             "--batch-size", "8", "--seed", "7"]


def adapter_bytes(directory):
    return (pathlib.Path(directory) / "adapter_model.safetensors").read_bytes()
