#!/usr/bin/env python3
"""make bench: softprompt and the PyTorch + peft reference, alternately (never both at once), on the
same shapes; prints one table of times and ratios (softprompt / reference; below 1 is faster).

    python3 scripts/bench_compare.py --python .venv-ref/bin/python [--quick]
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
REFERENCE = ROOT.parent / "shared" / "reference" / "pytorch"
BIN = ROOT / "target" / "release" / "softprompt"

# (arch, mode, softprompt steps, reference steps): the reference README's step counts
CASES = [
    ("minilm-l6", "train", 30, 30),
    ("minilm-l6", "forward", 40, 40),
    ("bert-base", "train", 15, 15),
    ("bert-base", "forward", 20, 20),
    ("gpt2-small", "train", 10, 10),
]


def ours(arch: str, mode: str, steps: int, *extra: str) -> dict:
    out = subprocess.run([str(BIN), "bench", mode, "--arch", arch, "--steps", str(steps), "--json", *extra],
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out)


def generation(python: str, steps: int) -> None:
    """gpt2-small greedy generation, batch 1, 16 + 20 prompt tokens, 32 new: tokens/s against the
    reference's manual KV-cache loop, and both checked against decoding without a cache. Ours runs
    in f32 and with its matrices rounded to GGUF blocks (as --keep-quantized holds a GGUF model);
    the reference runs in f32."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "r.jsonl"
        subprocess.run([python, str(REFERENCE / "bench_pt.py"), "--model", "gpt2-small", "--mode", "generate",
                        "--steps", str(steps), "--out", str(out)], check=True, capture_output=True, text=True,
                       cwd=REFERENCE)
        r = json.loads(out.read_text().splitlines()[-1])["gen"]["manual"]
    for weights in ["f32", "q8_0", "q4_1"]:
        a = ours("gpt2-small", "generate", steps, *([] if weights == "f32" else ["--weights", weights]))
        name = f"gpt2-small gen {weights}"
        print(f"{name:<20} {a['tokens_per_s']:>10.1f} tok/s {r['tokens_per_s']:>8.1f} tok/s "
              f"{a['tokens_per_s'] / r['tokens_per_s']:>5.2f}x  same tokens as no cache: ours {a['matches_no_cache']}, "
              f"reference {r['matches_reference']}; RSS {a['peak_rss_mib']:.0f} MiB", flush=True)


def reference(python: str, arch: str, mode: str, steps: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "r.jsonl"
        cmd = [python, str(REFERENCE / "bench_pt.py"), "--model", arch, "--mode", mode, "--steps", str(steps),
               "--out", str(out)]
        if mode == "train":
            cmd.append("--no-dropout")
        subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=REFERENCE)
        r = json.loads(out.read_text().splitlines()[-1])
    key = "step" if mode == "train" else "fwd"
    return {"median_s": r["stats"][key]["median"], "min_s": r["stats"][key]["min"], "max_s": r["stats"][key]["max"],
            "peak_rss_mib": r["peak_rss_mib"]}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--python", required=True, help="the venv's python with torch, transformers, peft")
    p.add_argument("--quick", action="store_true", help="a third of the steps")
    p.add_argument("--only-generate", action="store_true", help="just the gpt2-small generation cases")
    args = p.parse_args()
    machine = subprocess.run(["sh", "-c", "lscpu | sed -n 's/^Model name: *//p'"], capture_output=True, text=True).stdout.strip()
    print(f"machine: {machine}, {os.cpu_count()} CPUs; batch 8 x (128 + 20 virtual tokens), f32, 2 threads")
    print(f"{'case':<20} {'softprompt s':>13} {'reference s':>12} {'ratio':>6} {'GFLOP/s':>8} {'RSS MiB (ours/ref)':>19}")
    for arch, mode, steps, ref_steps in ([] if args.only_generate else CASES):
        if args.quick:
            steps, ref_steps = max(steps // 3, 3), max(ref_steps // 3, 3)
        a = ours(arch, mode, steps)
        b = reference(str(Path(args.python).absolute()), arch, mode, ref_steps)
        print(f"{arch + ' ' + mode:<20} {a['median_s']:>13.3f} {b['median_s']:>12.3f} {a['median_s'] / b['median_s']:>6.2f} "
              f"{a['gflop_per_s']:>8.1f} {a['peak_rss_mib']:>9.0f}/{b['peak_rss_mib']:<9.0f}", flush=True)
    generation(str(Path(args.python).absolute()), 3 if args.quick else 10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
