#!/usr/bin/env python3
"""The PEFT round trip on the default model (make interop):

1. PEFT writes a SEQ_CLS prompt-tuning adapter for all-MiniLM-L6-v2; `softprompt predict` loads it
   and must give PEFT's logits within 1e-4.
2. softprompt trains an adapter with `--pool pooler`; PEFT loads it and must give softprompt's logits
   within 1e-4.
"""
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from peft import PeftModel, PromptTuningConfig, TaskType, get_peft_model
from transformers import AutoTokenizer, BertForSequenceClassification

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


def peft_logits(model) -> torch.Tensor:
    tok = AutoTokenizer.from_pretrained(MODEL)
    model.eval()
    with torch.no_grad():
        return torch.stack([model(**tok(t, return_tensors="pt")).logits[0] for t in TEXTS])


def softprompt_logits(adapter: Path) -> torch.Tensor:
    out = subprocess.run([str(BIN), "predict", "--model", str(MODEL), "--adapter", str(adapter), "--json", *TEXTS],
                         check=True, capture_output=True, text=True).stdout
    return torch.tensor([json.loads(line)["logits"] for line in out.splitlines()])


def report(name: str, ours: torch.Tensor, theirs: torch.Tensor) -> bool:
    diff = (ours - theirs).abs().max().item()
    ok = diff < TOLERANCE
    print(f"{name}: max |logit difference| = {diff:.2e} ({'ok' if ok else 'FAIL'}, tolerance {TOLERANCE:g})")
    return ok


def main() -> int:
    torch.manual_seed(0)
    work = Path(tempfile.mkdtemp(prefix="softprompt-interop-"))
    base = BertForSequenceClassification.from_pretrained(MODEL, num_labels=2)
    peft_model = get_peft_model(base, PromptTuningConfig(task_type=TaskType.SEQ_CLS, num_virtual_tokens=20))
    with torch.no_grad():
        # as after training: prompt vectors near the embedding scale, a non-trivial head
        peft_model.prompt_encoder["default"].embedding.weight.normal_(0.0, 0.05)
        peft_model.base_model.classifier.modules_to_save["default"].weight.normal_(0.0, 0.5)
    peft_model.save_pretrained(work / "from-peft")
    ok = report("PEFT adapter → softprompt predict", softprompt_logits(work / "from-peft"), peft_logits(peft_model))

    ours = work / "from-softprompt"
    subprocess.run([str(BIN), "train", "--model", str(MODEL), "--train", str(DATA / "train.tsv"),
                    "--output", str(ours), "--pool", "pooler", "--max-steps", "20"], check=True,
                   stderr=subprocess.DEVNULL)
    loaded = PeftModel.from_pretrained(BertForSequenceClassification.from_pretrained(MODEL, num_labels=2), ours)
    ok &= report("softprompt adapter → PEFT", softprompt_logits(ours), peft_logits(loaded))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
