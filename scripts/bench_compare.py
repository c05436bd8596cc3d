#!/usr/bin/env python3
"""make bench: softprompt and the PyTorch + peft reference, alternately (never both at once), on the
same shapes; prints one table of times, ratios (softprompt / reference; below 1 is faster) and
shares of the machine's FMA peak (scripts/fma_peak.sh), then the real job: training examples/s
on the movie-review train split (softprompt train with its defaults, and the reference's
train_throughput_pt.py on the same rows).

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
MODEL = ROOT / "assets" / "models" / "all-MiniLM-L6-v2"
TRAIN = ROOT / "assets" / "data" / "movie-reviews" / "train.tsv"
# the reference formulas' FLOPs of one training example of the real job (docs/DESIGN.md, section 7)
REAL_JOB_GFLOP = 2.055

# (arch, mode, softprompt steps, reference steps, dtype): the reference README's step counts; bf16 is
# softprompt's --dtype bf16 against the reference's --bf16-autocast, on CPUs with AVX512-BF16 only
CASES = [
    ("minilm-l6", "train", 30, 30, "f32"),
    ("minilm-l6", "forward", 40, 40, "f32"),
    ("bert-base", "train", 15, 15, "f32"),
    ("bert-base", "forward", 20, 20, "f32"),
    ("gpt2-small", "train", 10, 10, "f32"),
    ("t5-small", "train", 10, 10, "f32"),
    ("bert-base", "train", 15, 15, "bf16"),
]


def has_bf16() -> bool:
    return "avx512_bf16" in Path("/proc/cpuinfo").read_text()


def fma_peak() -> float:
    return float(subprocess.run([str(ROOT / "scripts" / "fma_peak.sh")], check=True, capture_output=True,
                                text=True).stdout)


def real_job(python: str, steps: int, dtype: str) -> tuple[float, float]:
    """Median training examples/s over `steps` steps after 5 of warm-up: (softprompt, reference)."""
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([str(BIN), "train", "--model", str(MODEL), "--train", str(TRAIN), "--output", tmp,
                        "--max-steps", str(steps + 5), "--dtype", dtype], check=True, capture_output=True)
        records = [json.loads(line) for line in (Path(tmp) / "metrics.jsonl").read_text().splitlines()]
        rates = sorted(r["examples_per_s"] for r in records if "examples_per_s" in r and r["step"] > 5)
        out = Path(tmp) / "r.jsonl"
        autocast = ["--bf16-autocast"] if dtype == "bf16" else []
        subprocess.run([python, str(REFERENCE / "train_throughput_pt.py"), "--model", str(MODEL), "--data",
                        str(TRAIN), "--steps", str(steps), "--out", str(out), *autocast], check=True,
                       capture_output=True, text=True, cwd=REFERENCE)
        reference = json.loads(out.read_text().splitlines()[-1])["examples_per_s"]
    return rates[len(rates) // 2], reference


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


def reference(python: str, arch: str, mode: str, steps: int, dtype: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "r.jsonl"
        cmd = [python, str(REFERENCE / "bench_pt.py"), "--model", arch, "--mode", mode, "--steps", str(steps),
               "--out", str(out)]
        if mode == "train":
            cmd.append("--no-dropout")
        if dtype == "bf16":
            cmd.append("--bf16-autocast")
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
    peak = fma_peak()
    python = str(Path(args.python).absolute())
    print(f"machine: {machine}, {os.cpu_count()} CPUs; FMA peak {peak:.1f} GFLOP/s (f32, 2 threads); "
          "batch 8 x (128 + 20 virtual tokens), f32 unless marked bf16, 2 threads")
    print("GFLOP/s: what softprompt computes (done); of peak: done / peak; ref: the reference's model FLOPs / peak")
    print(f"{'case':<20} {'softprompt s':>13} {'reference s':>12} {'ratio':>6} {'GFLOP/s':>8} {'of peak':>8} "
          f"{'ref':>5} {'RSS MiB (ours/ref)':>19}")
    for arch, mode, steps, ref_steps, dtype in ([] if args.only_generate else CASES):
        if dtype == "bf16" and not has_bf16():
            print(f"{arch + ' ' + mode + ' bf16':<20} skipped: this CPU has no AVX512-BF16", flush=True)
            continue
        if args.quick:
            steps, ref_steps = max(steps // 3, 3), max(ref_steps // 3, 3)
        a = ours(arch, mode, steps, "--dtype", dtype)
        b = reference(python, arch, mode, ref_steps, dtype)
        ref_share = a["model_gflop"] / b["median_s"] / peak
        name = f"{arch} {mode}" + (" bf16" if dtype == "bf16" else "")
        print(f"{name:<20} {a['median_s']:>13.3f} {b['median_s']:>12.3f} {a['median_s'] / b['median_s']:>6.2f} "
              f"{a['gflop_per_s']:>8.1f} {a['gflop_per_s'] / peak:>7.0%} {ref_share:>5.0%} "
              f"{a['peak_rss_mib']:>9.0f}/{b['peak_rss_mib']:<9.0f}", flush=True)
    for dtype in [] if args.only_generate else ["f32", "bf16"] if has_bf16() else ["f32"]:
        a, b = real_job(python, 20 if args.quick else 60, dtype)
        name = "real job (ex/s)" + (" bf16" if dtype == "bf16" else "")
        print(f"{name:<20} {a:>13.1f} {b:>12.1f} {b / a:>6.2f} {a * REAL_JOB_GFLOP:>8.1f} "
              f"{a * REAL_JOB_GFLOP / peak:>7.0%} {b * REAL_JOB_GFLOP / peak:>5.0%}   "
              "(movie-review train split, batch 32, 20 virtual tokens; ratio = reference / ours time)", flush=True)
    generation(python, 3 if args.quick else 10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
