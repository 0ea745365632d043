"""Time and peak memory of WikiText-2 perplexity: the model's full logits vs the LM head in chunks.

    python benchmarks/perplexity_memory.py                      # gemma3-270m and smollm2-135m, 4096 tokens
    python benchmarks/perplexity_memory.py --num-tokens 2048 --max-length 512 --batch-size 2
    python benchmarks/perplexity_memory.py --device cuda --dtype bfloat16 --num-tokens 65536 --batch-size 8

Modes of :func:`unidetox.evaluation.likelihood.sliding_window_nll` over the first ``--num-tokens`` tokens of
``wikitext2/wiki.test.raw`` (windows of ``--max-length``, stride half of it):
- ``full``: ``chunked_head=False``, the model's own forward returns ``(batch, window, vocabulary)`` logits.
- ``chunked``: the decoder runs once and the LM head sees ``NLL_CHUNK_POSITIONS`` scored positions at a time.

Every (model, mode) run is its own subprocess, so what one mode allocated never sits in the other's
baseline. Peak memory is the growth over what the process holds once the model is loaded and warmed up:
``torch.cuda.max_memory_allocated`` on GPU; on CPU the largest RSS a thread reading ``psutil`` every
millisecond sees. Modes alternate over ``--repeats`` and medians are reported; the ratios printed last are
chunked / full (below 1: chunked is faster or smaller).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import threading
import time

import psutil
import torch

from unidetox import load_model_and_tokenizer
from unidetox.evaluation.likelihood import sliding_window_nll
from unidetox.paths import default_data_dir, require_file

MODES = ("full", "chunked")


class PeakRss:
    """The largest resident set size of this process while the block runs, sampled by a thread."""

    def __init__(self, interval_s: float = 0.001):
        self.interval_s, self.process = interval_s, psutil.Process()
        self.peak, self._stop = 0, threading.Event()

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            self._stop.wait(self.interval_s)

    def __enter__(self):
        self.peak = self.process.memory_info().rss
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)


def measure(args) -> dict:
    """One mode on one model in this process: seconds, peak memory growth (bytes) and the perplexity."""
    model, tokenizer = load_model_and_tokenizer(args.model, dtype=getattr(torch, args.dtype))
    model.to(args.device).eval()
    path = require_file(args.text or default_data_dir() / "wikitext2" / "wiki.test.raw", "WikiText-2 text")
    text = path.read_text(encoding="utf-8")[: 20 * args.num_tokens]  # characters enough for num_tokens tokens
    kwargs = dict(max_length=args.max_length, batch_size=args.batch_size, max_tokens=args.num_tokens,
                  chunked_head=args.mode == "chunked")
    # Warm-up on a few tokens: pages in the memory-mapped weights and initialises kernels before the baseline.
    sliding_window_nll(model, tokenizer, text, **{**kwargs, "batch_size": 1, "max_tokens": 16})
    cuda = args.device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        nll, count = sliding_window_nll(model, tokenizer, text, **kwargs)
        torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        peak = torch.cuda.max_memory_allocated() - base
    else:
        with PeakRss() as rss:
            base = rss.peak
            start = time.perf_counter()
            nll, count = sliding_window_nll(model, tokenizer, text, **kwargs)
            seconds = time.perf_counter() - start
        peak = rss.peak - base
    return {"seconds": seconds, "peak_bytes": peak, "perplexity": math.exp(nll / count), "tokens": count,
            "vocab_size": model.get_output_embeddings().weight.shape[0],
            "torch_threads": torch.get_num_threads()}


def run_worker(args, model: str, mode: str) -> dict:
    command = [sys.executable, __file__, "--worker", "--model", model, "--mode", mode,
               "--num-tokens", str(args.num_tokens), "--max-length", str(args.max_length),
               "--batch-size", str(args.batch_size), "--device", args.device, "--dtype", args.dtype]
    if args.text:
        command += ["--text", args.text]
    out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main():
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--models", default="gemma3-270m,smollm2-135m", help="comma-separated")
    parser.add_argument("--num-tokens", type=int, default=4096, help="WikiText-2 tokens scored")
    parser.add_argument("--max-length", type=int, default=1024, help="window length (stride: half of it)")
    parser.add_argument("--batch-size", type=int, default=4, help="windows per forward")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--text", help="file to score (default: $UNIDETOX_DATA_DIR/wikitext2/wiki.test.raw)")
    parser.add_argument("--json", help="also write the numbers to this file")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(measure(args)))
        return

    report = {"device": args.device, "dtype": args.dtype, "num_tokens": args.num_tokens,
              "max_length": args.max_length, "batch_size": args.batch_size, "models": {}}
    for model in args.models.split(","):
        runs = {mode: [] for mode in MODES}
        for _ in range(args.repeats):
            for mode in MODES:
                runs[mode].append(run_worker(args, model, mode))
                r = runs[mode][-1]
                print(f"{model:14s} {mode:8s} {r['seconds']:8.2f} s  peak +{r['peak_bytes'] / 2**20:9.1f} MiB"
                      f"  ppl {r['perplexity']:.6f}  ({r['tokens']} tokens, vocab {r['vocab_size']}, "
                      f"{r['torch_threads']} threads)", flush=True)
        summary = {mode: {"seconds": statistics.median(r["seconds"] for r in v),
                          "peak_bytes": statistics.median(r["peak_bytes"] for r in v),
                          "perplexity": v[0]["perplexity"]} for mode, v in runs.items()}
        chunked, full = summary["chunked"], summary["full"]
        summary["ratio"] = {key: chunked[key] / full[key] for key in ("seconds", "peak_bytes")}
        summary["perplexity_rel_diff"] = abs(chunked["perplexity"] / full["perplexity"] - 1)
        report["models"][model] = summary
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(report, fh, indent=2)
    print(json.dumps(report, indent=2))
    for model, summary in report["models"].items():
        print(f"perplexity {model} full {summary['full']['perplexity']:.6f} chunked "
              f"{summary['chunked']['perplexity']:.6f} (relative difference "
              f"{summary['perplexity_rel_diff']:.1e})")
    for model, summary in report["models"].items():
        print(f"ratio {model} time {summary['ratio']['seconds']:.3f}")
        print(f"ratio {model} peak_memory {summary['ratio']['peak_bytes']:.3f}")


if __name__ == "__main__":
    main()
