#!/usr/bin/env python3
"""The PEFT round trip on the default model (make interop):

1. PEFT writes SEQ_CLS adapters for all-MiniLM-L6-v2 (prompt tuning; P-tuning with an MLP and
   with an LSTM encoder); `softprompt predict` loads each and must give PEFT's logits within 1e-4.
2. softprompt trains adapters with `--pool pooler`, one per `--method` (prompt, p-tuning with each
   encoder, residual); PEFT loads each and must give softprompt's logits within 1e-4.
   Multitask prompt tuning both ways too: PEFT's 2-task adapter under task id 1 against softprompt's
   `--task 1`, and softprompt's (trained on the split with alternate rows named "a" and "b") under
   `--task b` against PEFT's task id 1.
3. softprompt trains a prefix-tuning verbalizer on SmolLM2 (PEFT runs prefix tuning on decoders, not
   on BERT); PEFT loads it on transformers' SmolLM2 (the same GGUF, dequantized) and its next-token
   logits of the label words must be softprompt's within 1e-4 of their scale (as for SmolLM2 alone).
4. softprompt trains a `--task seq2seq` prompt and a prefix on the tiny T5 of the fixtures (no T5
   checkpoint ships in any package); PEFT loads each as a SEQ_2_SEQ_LM adapter and must give
   softprompt's `eval` token loss within 1e-4 and write the tokens `softprompt generate` writes
   (greedy).
"""
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from peft import (MultitaskPromptTuningConfig, PeftModel, PromptEncoderConfig, PromptTuningConfig, TaskType,
                  get_peft_model)
from transformers import AutoModelForCausalLM, AutoTokenizer, BertForSequenceClassification

import make_fixtures

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "assets" / "models" / "all-MiniLM-L6-v2"
DATA = ROOT / "assets" / "data" / "movie-reviews"
BIN = ROOT / "target" / "release" / "softprompt"
TEXTS = [
    "A gorgeous, witty, seductive movie.",
    "The plot is nothing but boilerplate clichés from start to finish.",
    "It's a bit long, but the performances carry it.",
    "Worst film of the year.",
]
TOLERANCE = 1e-4
MODELS, SMOLLM2 = ROOT / "assets" / "models", "SmolLM2-135M-Instruct.Q4_1.gguf"
TEMPLATE, WORDS = "Review: {text}\nSentiment:", ["negative", "positive"]


def peft_logits(model, **kwargs) -> torch.Tensor:
    tok = AutoTokenizer.from_pretrained(MODEL)
    model.eval()
    with torch.no_grad():
        return torch.stack([model(**tok(t, return_tensors="pt"), **kwargs).logits[0] for t in TEXTS])


def softprompt_logits(adapter: Path, *flags: str) -> torch.Tensor:
    out = subprocess.run([str(BIN), "predict", "--model", str(MODEL), "--adapter", str(adapter), "--json", *flags,
                          *TEXTS], check=True, capture_output=True, text=True).stdout
    return torch.tensor([json.loads(line)["logits"] for line in out.splitlines()])


def report(name: str, ours: torch.Tensor, theirs: torch.Tensor, relative: bool = False) -> bool:
    diff = (ours - theirs).abs().max().item()
    if relative:
        # a 30-layer model's logits in f32, summed in another order: as the SmolLM2 parity test
        # (tests/all/parity.rs), the difference against the logits' scale
        scale = theirs.abs().max().item()
        ok = diff / scale < TOLERANCE
        print(f"{name}: max |logit difference| = {diff:.2e} of logits up to {scale:.1f}, relative {diff / scale:.2e} "
              f"({'ok' if ok else 'FAIL'}, tolerance {TOLERANCE:g})")
        return ok
    ok = diff < TOLERANCE
    print(f"{name}: max |logit difference| = {diff:.2e} ({'ok' if ok else 'FAIL'}, tolerance {TOLERANCE:g})")
    return ok


PEFT_CONFIGS = {
    "prompt tuning": PromptTuningConfig(task_type=TaskType.SEQ_CLS, num_virtual_tokens=20),
    "P-tuning (MLP)": PromptEncoderConfig(task_type=TaskType.SEQ_CLS, num_virtual_tokens=20, encoder_hidden_size=128),
    "P-tuning (LSTM)": PromptEncoderConfig(task_type=TaskType.SEQ_CLS, num_virtual_tokens=20, encoder_hidden_size=64,
                                           encoder_reparameterization_type="LSTM"),
    "multitask prompt tuning, task 1 of 2": MultitaskPromptTuningConfig(task_type=TaskType.SEQ_CLS,
                                                                        num_virtual_tokens=20, num_tasks=2),
}
# PEFT's forward arguments, softprompt predict's flags
TASK_ONE = ({"task_ids": torch.tensor([1])}, ["--task", "1"])
SOFTPROMPT_METHODS = {
    "--method prompt": [],
    "--method p-tuning": ["--method", "p-tuning", "--encoder-hidden-size", "128"],
    "--method p-tuning --encoder lstm": ["--method", "p-tuning", "--encoder", "lstm", "--encoder-hidden-size", "64"],
    "--method residual": ["--method", "residual", "--encoder-hidden-size", "128"],
}


def main() -> int:
    torch.manual_seed(0)
    work = Path(tempfile.mkdtemp(prefix="softprompt-interop-"))
    ok = True
    for i, (name, config) in enumerate(PEFT_CONFIGS.items()):
        base = BertForSequenceClassification.from_pretrained(MODEL, num_labels=2)
        peft_model = get_peft_model(base, config)
        with torch.no_grad():
            # as after training: a prompt near the embedding scale, a non-trivial head
            for p in peft_model.prompt_encoder["default"].parameters():
                p.normal_(0.0, 0.05)
            peft_model.base_model.classifier.modules_to_save["default"].weight.normal_(0.0, 0.5)
        peft_model.save_pretrained(work / f"from-peft-{i}")
        task, flags = TASK_ONE if "multitask" in name else ({}, [])
        ok &= report(f"PEFT {name} adapter → softprompt predict",
                     softprompt_logits(work / f"from-peft-{i}", *flags), peft_logits(peft_model, **task))

    for i, (name, flags) in enumerate(SOFTPROMPT_METHODS.items()):
        ours = work / f"from-softprompt-{i}"
        subprocess.run([str(BIN), "train", "--model", str(MODEL), "--train", str(DATA / "train.tsv"),
                        "--output", str(ours), "--pool", "pooler", "--max-steps", "20", *flags], check=True,
                       stderr=subprocess.DEVNULL)
        loaded = PeftModel.from_pretrained(BertForSequenceClassification.from_pretrained(MODEL, num_labels=2), ours)
        ok &= report(f"softprompt {name} adapter → PEFT", softprompt_logits(ours), peft_logits(loaded))
    ok &= multitask_round_trip(work)
    ok &= decoder_prefix_round_trip(work)
    ok &= t5_round_trip(work, "prompt")
    ok &= t5_round_trip(work, "prefix")
    ok &= t5_round_trip(work, "multitask")
    ok &= t5_verbalizer_round_trip(work)
    return 0 if ok else 1


def multitask_round_trip(work: Path) -> bool:
    """softprompt's multitask adapter (tasks "a" and "b", PEFT's ids 0 and 1) → PEFT under task id 1."""
    lines = (DATA / "train.tsv").read_text().splitlines()
    tasks = work / "train-tasks.tsv"
    tasks.write_text("\n".join([lines[0] + "\ttask"] + [f"{l}\t{'ab'[i % 2]}" for i, l in enumerate(lines[1:])]) + "\n")
    ours = work / "from-softprompt-multitask"
    subprocess.run([str(BIN), "train", "--model", str(MODEL), "--train", str(tasks), "--output", str(ours), "--pool",
                    "pooler", "--max-steps", "20", "--method", "multitask", "--task-column", "task", "--task-rank", "2"],
                   check=True, stderr=subprocess.DEVNULL)
    loaded = PeftModel.from_pretrained(BertForSequenceClassification.from_pretrained(MODEL, num_labels=2), ours)
    return report("softprompt --method multitask adapter (--task b) → PEFT (task id 1)",
                  softprompt_logits(ours, "--task", "b"), peft_logits(loaded, **TASK_ONE[0]))


def decoder_prefix_round_trip(work: Path) -> bool:
    ours = work / "from-softprompt-prefix"
    model = str(MODELS / SMOLLM2)
    subprocess.run([str(BIN), "train", "--model", model, "--task", "verbalizer", "--template", TEMPLATE.replace("\n", "\\n"),
                    "--label-words", ",".join(WORDS), "--init", "labels", "--method", "prefix", "--train",
                    str(DATA / "train.tsv"), "--output", str(ours), "--max-steps", "3", "--batch-size", "4"],
                   check=True, stderr=subprocess.DEVNULL)
    out = subprocess.run([str(BIN), "predict", "--model", model, "--adapter", str(ours), "--json", *TEXTS],
                         check=True, capture_output=True, text=True).stdout
    ours_logits = torch.tensor([json.loads(line)["logits"] for line in out.splitlines()])
    tok = AutoTokenizer.from_pretrained(MODELS, gguf_file=SMOLLM2)
    base = AutoModelForCausalLM.from_pretrained(MODELS, gguf_file=SMOLLM2, dtype=torch.float32)
    loaded = PeftModel.from_pretrained(base, ours).eval()
    # each label's score: the logit of its word's first token, as written after the template
    words = [tok(" " + w, add_special_tokens=False).input_ids[0] for w in WORDS]
    with torch.no_grad():
        theirs = torch.stack([
            loaded(**tok(TEMPLATE.format(text=t), return_tensors="pt", add_special_tokens=False)).logits[0, -1, words]
            for t in TEXTS])
    return report("softprompt --method prefix verbalizer on SmolLM2 → PEFT", ours_logits, theirs, relative=True)


T5_PAIRS = [("the movie was good and fun", "good"), ("the plot was dull and boring", "bad film"),
            ("i love this great film", "good"), ("a weak and awful story", "bad film")]


def greedy(model, enc, new_tokens: int, task: int = None) -> list:
    """The tokens greedy decoding by PEFT's forward writes after the start token, EOS left out
    (make_fixtures.greedy: not PEFT's `generate`, which drops a SEQ_2_SEQ_LM prefix and a
    multitask prompt's decoder half)."""
    return [t for t in make_fixtures.greedy(model, enc, new_tokens, task)[1:] if t != 1]


def t5_round_trip(work: Path, method: str) -> bool:
    """softprompt --task seq2seq --method `method` on the tiny T5 → PEFT: the same token loss and
    greedy tokens. A multitask prompt is trained on two tasks (x and y, of the same pairs) and
    compared for task x, PEFT's task id 0."""
    from tokenizers import Tokenizer
    from transformers import T5ForConditionalGeneration

    t5 = ROOT / "tests" / "fixtures" / "tiny-t5"
    multitask = method == "multitask"
    pairs, train = work / "pairs.tsv", work / "pairs-tasks.tsv"
    pairs.write_text("text\tlabel\ttask\n" + "".join(f"{x}\t{y}\tx\n" for x, y in T5_PAIRS * 8))
    train.write_text("text\tlabel\ttask\n" + "".join(f"{x}\t{y}\t{task}\n" for task in "xy" for x, y in T5_PAIRS * 4))
    tasks = ["--task-column", "task"] if multitask else []
    ours = work / f"from-softprompt-t5-{method}"
    subprocess.run([str(BIN), "train", "--model", str(t5), "--task", "seq2seq", "--method", method, "--train",
                    str(train if multitask else pairs), "--output", str(ours), "--num-virtual-tokens", "4",
                    "--max-steps", "20", "--lr", "0.1", *tasks], check=True, stderr=subprocess.DEVNULL)
    task = ["--task", "x"] if multitask else []
    score = json.loads(subprocess.run([str(BIN), "eval", "--model", str(t5), "--adapter", str(ours), "--data",
                                       str(pairs), "--json", *task], check=True, capture_output=True,
                                      text=True).stdout)
    written = subprocess.run([str(BIN), "generate", "--model", str(t5), "--adapter", str(ours), "--json",
                              "--max-new-tokens", "4", *task, *[x for x, _ in T5_PAIRS]], check=True,
                             capture_output=True, text=True).stdout
    loaded = PeftModel.from_pretrained(T5ForConditionalGeneration.from_pretrained(t5), ours).eval()
    tok = Tokenizer.from_file(str(t5 / "tokenizer.json"))
    inputs = [tok.encode(x).ids for x, _ in T5_PAIRS * 8]
    targets = [tok.encode(y).ids for _, y in T5_PAIRS * 8]
    n, t = max(map(len, inputs)), max(map(len, targets))
    ids = torch.tensor([x + [0] * (n - len(x)) for x in inputs])
    mask = torch.tensor([[1] * len(x) + [0] * (n - len(x)) for x in inputs])
    labels = torch.tensor([y + [-100] * (t - len(y)) for y in targets])
    task_id = 0 if multitask else None
    task_ids = {"task_ids": torch.zeros(len(inputs), dtype=torch.long)} if multitask else {}
    with torch.no_grad():
        theirs = loaded(input_ids=ids, attention_mask=mask, labels=labels, **task_ids).loss.item()
        tokens_ok = True
        for (x, _), line in zip(T5_PAIRS, written.splitlines()):
            peft_tokens = greedy(loaded, torch.tensor([tok.encode(x).ids]), 4, task_id)
            tokens_ok &= peft_tokens == json.loads(line)["tokens"]
    diff = abs(score["token_loss"] - theirs)
    ok = diff < TOLERANCE and tokens_ok
    print(f"softprompt --task seq2seq --method {method} on the tiny T5 → PEFT SEQ_2_SEQ_LM: |token loss difference| = {diff:.2e} "
          f"(softprompt {score['token_loss']:.6f}, PEFT {theirs:.6f}), greedy tokens {'the same' if tokens_ok else 'DIFFER'} "
          f"({'ok' if ok else 'FAIL'}, tolerance {TOLERANCE:g})")
    return ok


def t5_verbalizer_round_trip(work: Path) -> bool:
    """softprompt --task verbalizer on the tiny T5 → PEFT: softprompt's label logits are PEFT's
    logits of the label words at the decoder's first position."""
    from tokenizers import Tokenizer
    from transformers import T5ForConditionalGeneration

    t5 = ROOT / "tests" / "fixtures" / "tiny-t5"
    rows = work / "ranked.tsv"
    rows.write_text("text\tlabel\n" + "".join(f"{x}\t{'pos' if y == 'good' else 'neg'}\n" for x, y in T5_PAIRS * 8))
    ours = work / "from-softprompt-t5-verbalizer"
    subprocess.run([str(BIN), "train", "--model", str(t5), "--task", "verbalizer", "--label-words", "bad,good",
                    "--train", str(rows), "--output", str(ours), "--num-virtual-tokens", "4", "--max-steps", "20",
                    "--lr", "0.1"], check=True, stderr=subprocess.DEVNULL)
    texts = [x for x, _ in T5_PAIRS]
    predicted = subprocess.run([str(BIN), "predict", "--model", str(t5), "--adapter", str(ours), "--json", *texts],
                               check=True, capture_output=True, text=True).stdout
    labels = json.loads((ours / "softprompt.json").read_text())["labels"]
    ours_logits = torch.tensor([json.loads(line)["logits"] for line in predicted.splitlines()])
    loaded = PeftModel.from_pretrained(T5ForConditionalGeneration.from_pretrained(t5), ours).eval()
    tok = Tokenizer.from_file(str(t5 / "tokenizer.json"))
    words = {"neg": "bad", "pos": "good"}
    word_ids = [tok.encode(words[label], add_special_tokens=False).ids[0] for label in labels]
    with torch.no_grad():
        theirs = []
        for x in texts:
            enc = torch.tensor([tok.encode(x).ids])
            first = loaded(input_ids=enc, attention_mask=torch.ones_like(enc),
                           decoder_input_ids=torch.zeros(1, 1, dtype=torch.long)).logits[0, 0]
            theirs.append(first[word_ids])
    return report("softprompt --task verbalizer prompt on the tiny T5 → PEFT first decoder logits", ours_logits,
                  torch.stack(theirs))


if __name__ == "__main__":
    sys.exit(main())
