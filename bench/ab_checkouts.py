"""Two checkouts of distilkernels timed side by side in one run: "did this change make the model slower?".

    python bench/ab_checkouts.py --before ../old-checkout --after . --shapes mixed16x128,1x128 --threads 2 \
        --dtype bf16

Each checkout gets its own worker process (PYTHONPATH = that checkout, its extension built in place) that
builds the same random-init distilbert-base (fixed seed) and the same batch, patches it, and waits. The parent
then runs interleaved rounds: every round times one forward of HF sdpa (fp32) and of each checkout's patched
model (fp32, fp32 under torch's "high" matmul precision, bf16 or int8: `--dtype`), in a shuffled order
(seeded), so drifts of a shared machine hit all of them alike. Reports medians and ratios.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

WORKER = r"""
import json, sys, time, torch, transformers
torch.set_num_threads(int(sys.argv[1]))
import distilkernels
batch, seqlen, lo = (int(v) for v in sys.argv[2:5])
dtype = sys.argv[5]
torch.manual_seed(0)
stock = transformers.DistilBertModel(transformers.DistilBertConfig()).eval()
stock.set_attn_implementation("sdpa")
g = torch.Generator().manual_seed(0)
lengths = torch.randint(lo, seqlen + 1, (batch,), generator=g) if lo < seqlen else torch.full((batch,), seqlen)
ids = torch.randint(1, 30522, (batch, seqlen), generator=g)
mask = (torch.arange(seqlen)[None, :] < lengths[:, None]).long()
ids = ids * mask
import copy
models = {"hf_sdpa": stock}  # dtype "none": the HF sdpa worker, nothing patched
if dtype != "none":
    models["patched"] = patched = copy.deepcopy(stock)
    if dtype == "int8":
        distilkernels.quantize(patched)
    else:
        distilkernels.patch(patched, dtype={"fp32": torch.float32, "fp32-high": torch.float32,
                                            "bf16": torch.bfloat16}[dtype])
    if dtype == "fp32-high":  # torch's "high" float32 matmul precision, in this worker only (bf16x3 GEMMs)
        torch.set_float32_matmul_precision("high")
with torch.inference_mode():
    err = None
    if "patched" in models:
        ref = stock(input_ids=ids, attention_mask=mask).last_hidden_state
        got = patched(input_ids=ids, attention_mask=mask).last_hidden_state
        err = (got.float() - ref)[mask.bool()].abs().max().item()
    print(json.dumps({"ready": distilkernels.__file__, "max_abs_err": err}), flush=True)
    for line in sys.stdin:
        model = models[line.strip()]
        start = time.perf_counter()
        model(input_ids=ids, attention_mask=mask)
        print(json.dumps({"ms": (time.perf_counter() - start) * 1e3}), flush=True)
"""


def _shape(name: str) -> tuple[int, int, int]:
    """"8x128" -> (8, 128, 128); "mixed16x128" -> (16, 128, 8): lengths uniform in 8..128 (right padding)."""
    mixed = name.startswith("mixed")
    batch, seqlen = (int(v) for v in name.removeprefix("mixed").split("x"))
    return batch, seqlen, max(1, seqlen // 16) if mixed else seqlen


_PAUSE_S = 0.05


class Worker:
    def __init__(self, checkout: Path, threads: int, shape: tuple[int, int, int], dtype: str):
        env = dict(os.environ, PYTHONPATH=str(checkout.resolve()), HF_HUB_OFFLINE="1")
        self.proc = subprocess.Popen([sys.executable, "-c", WORKER, str(threads), *map(str, shape), dtype], env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd="/")
        self.info = json.loads(self.proc.stdout.readline())

    def time(self, name: str) -> float:
        # A pause before each call: the other workers' OpenMP threads spin-wait for a while after their last
        # parallel region (libgomp's default), and a call started meanwhile shares its cores with them. Without
        # the pause, and with HF sdpa in the "after" worker, the same checkout measured ~25% slower as "before"
        # than as "after".
        time.sleep(_PAUSE_S)
        self.proc.stdin.write(name + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())["ms"]

    def close(self):
        self.proc.stdin.close()
        self.proc.wait()


def run_shape(before: Path, after: Path, shape_name: str, threads: int, rounds: int, dtype: str = "fp32") -> dict:
    shape = _shape(shape_name)
    # HF sdpa runs in a worker of its own, so that each worker runs once a round: no checkout's worker is
    # busier (its code and data warmer) than the other's.
    workers = {"hf": Worker(after, threads, shape, "none"), "before": Worker(before, threads, shape, dtype),
               "after": Worker(after, threads, shape, dtype)}
    order = [("hf", "hf_sdpa"), ("before", "patched"), ("after", "patched")]
    samples = {f"{w}:{m}": [] for w, m in order}
    for w, m in order:  # warm-up
        workers[w].time(m)
    shuffle = random.Random(0).shuffle
    for _ in range(rounds):
        shuffle(round_order := list(order))
        for w, m in round_order:
            samples[f"{w}:{m}"].append(workers[w].time(m))
    for w in workers.values():
        w.close()
    med = {k: statistics.median(v) for k, v in samples.items()}
    return {"shape": shape_name, "dtype": dtype, "samples_ms": samples, "median_ms": med,
            "max_abs_err": {k: workers[k].info["max_abs_err"] for k in ("before", "after")},
            "speedup_vs_hf_sdpa": {k: med["hf:hf_sdpa"] / med[f"{k}:patched"] for k in ("before", "after")},
            "after_over_before": med["before:patched"] / med["after:patched"]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", type=Path, required=True)
    parser.add_argument("--after", type=Path, default=Path("."))
    parser.add_argument("--shapes", default="mixed16x128")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--dtype", choices=("fp32", "fp32-high", "bf16", "int8"), default="fp32",
                        help="the patched models' precision (HF sdpa stays fp32)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from bench.environment import environment

    results = {"environment": environment(), "before": str(args.before), "after": str(args.after), "shapes": []}
    for name in args.shapes.split(","):
        row = run_shape(args.before, args.after, name, args.threads, args.rounds, args.dtype)
        results["shapes"].append(row)
        m = row["median_ms"]
        print(f"{name:12s} {args.dtype} HF sdpa {m['hf:hf_sdpa']:8.1f} ms | before {m['before:patched']:8.1f} ms "
              f"({row['speedup_vs_hf_sdpa']['before']:.2f}x) | after {m['after:patched']:8.1f} ms "
              f"({row['speedup_vs_hf_sdpa']['after']:.2f}x) | after/before speed {row['after_over_before']:.3f}",
              flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
