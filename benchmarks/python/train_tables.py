#!/usr/bin/env python3
"""Markdown table of the GPU fine-tuning step (docs/results_cuda.md) from the JSON files of one
device call: bench_cuda_train --json OURS and bench_torch_train.py --json runs named
torch_<shape>_<variant>.json in one directory (variants: ns, ns_tf32, svd, ns_bf16).

    python3 benchmarks/python/train_tables.py OURS.json TORCH_DIR
"""
import json
import os
import sys


def main():
    ours = json.load(open(sys.argv[1]))["rows"]
    tdir = sys.argv[2]
    shape_names = {"llama2": "llama2-7b", "qwen25": "qwen25-7b"}

    def torch(shape, variant):
        p = os.path.join(tdir, f"torch_{shape_names[shape]}_{variant}.json")
        return json.load(open(p)) if os.path.exists(p) else None

    print("| shape | math | ours: step (fwd+bwd / optimizer) | PyTorch, same math, 1 NS step | ratio | PyTorch, SVD polar | ratio "
          "| ours fwd TFLOP/s (SGEMM) | memory ours / PyTorch peak |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in ours:
        tf32 = r["math"] == "tf32"
        ns = torch(r["shape"], "ns_tf32" if tf32 else "ns")
        svd = None if tf32 else torch(r["shape"], "svd")
        cell = lambda t: (f"{t['step_ms_mean']:.0f} ms ({t['breakdown']['forward_ms'] + t['breakdown']['backward_ms']:.0f} / "
                          f"{t['breakdown']['optimizer_ms']:.0f})") if t else "-"
        ratio = lambda t: f"**{t['step_ms_mean'] / r['step_ms']:.2f}x**" if t else "-"
        mem = f"{r['device_bytes'] / 2**30:.1f} / {ns['peak_bytes'] / 2**30:.1f} GiB" if ns else "-"
        print(f"| {shape_names[r['shape']]} (d_latent {r['d_latent']}) | {r['math']} | {r['step_ms']:.0f} ms ({r['forward_backward_ms']:.0f} / "
              f"{r['optimizer_ms']:.0f}) | {cell(ns)} | {ratio(ns)} | {cell(svd)} | {ratio(svd)} | {r['forward_tflops']:.0f} "
              f"({r['sgemm_tflops']:.0f}) | {mem} |")
    for shape in ("llama2", "qwen25"):
        t = torch(shape, "ns_bf16")
        if t:
            print(f"\nPyTorch bf16 (autocast, fp32 master parameters), {shape_names[shape]}: {t['step_ms_mean']:.0f} ms "
                  f"({t['breakdown']['forward_ms'] + t['breakdown']['backward_ms']:.0f} / {t['breakdown']['optimizer_ms']:.0f}), "
                  f"peak {t['peak_bytes'] / 2**30:.1f} GiB (no bf16 counterpart on our side yet).")


if __name__ == "__main__":
    main()
