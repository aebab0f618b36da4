#!/usr/bin/env python3
"""Markdown tables of docs/results.md's GPU decode section from bench_cuda_decode's and
bench_hf_decode.py's JSON files (no numbers of its own).

usage: decode_tables.py BENCH_DECODE.json HF_DECODE.json
"""
import json
import sys


def fmt_int(x):
    return f"{x:,.0f}" if x is not None else "—"


def ratio(a, b):
    return f"{a / b:.2f}x" if a and b else "—"


def ctx_name(c):
    return f"{c // 1024}K"


def main():
    ours = json.load(open(sys.argv[1]))
    hf = json.load(open(sys.argv[2]))
    tok = {}
    for r in ours["rows"]:
        if r["path"] != "kernel" and r.get("fits", True):
            tok[(r["shape"], r["path"], r["batch"], r["context"])] = r["tokens_per_s"]
    for r in hf["rows"]:
        if r.get("fits", True):
            tok[(r["shape"], "hf", r["batch"], r["context"])] = r["tokens_per_s"]
    titles = {"llama2": "LLaMA-2-7B shapes (32 layers, 4096 hidden, 32 heads), 4x",
              "qwen25": "Qwen2.5-7B shapes (28 layers, 3584 hidden, 28 q / 4 kv heads), 2x"}
    batches = sorted({k[2] for k in tok})
    contexts = sorted({k[3] for k in tok})
    for shape in ("llama2", "qwen25"):
        print(f"{titles[shape]}, decode tokens/s:\n")
        print("| batch | context | HF | (a) standard | (b) rebuild | (a') standard, learned pos. | (c) absorbed "
              "| (c)/(a') | (c)/(a) | (c)/(b) | (a)/HF |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        for b in batches:
            for c in contexts:
                g = lambda p: tok.get((shape, p, b, c))
                hfv, a, rb, ap, cc = g("hf"), g("standard"), g("rebuild"), g("standard_learned_pos"), g("absorbed")
                print(f"| {b} | {ctx_name(c)} | {fmt_int(hfv)} | {fmt_int(a)} | {fmt_int(rb)} | {fmt_int(ap)} | {fmt_int(cc)} "
                      f"| {ratio(cc, ap)} | {ratio(cc, a)} | {ratio(cc, rb)} | {ratio(a, hfv)} |")
        print()
    copy = ours["copy_gbs"]
    print("| shape | batch | context | standard kernel | % of copy | latent kernel | % of copy | latent TFLOP/s "
          "| latent, WMMA kernel (before) | new / WMMA |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in ours["rows"]:
        if r["path"] != "kernel":
            continue
        wmma = r.get("latent_wmma_ms")
        print(f"| {r['shape']} | {r['batch']} | {ctx_name(r['context'])} | {r['std_ms']:.3f} ms, {r['std_gbs']:.0f} GB/s "
              f"| {100 * r['std_gbs'] / copy:.0f}% | {r['latent_ms']:.3f} ms, {r['latent_gbs']:.0f} GB/s "
              f"| {100 * r['latent_gbs'] / copy:.0f}% | {r['latent_tflops']:.1f} "
              f"| {wmma:.3f} ms | {wmma / r['latent_ms']:.2f}x |")


if __name__ == "__main__":
    main()
