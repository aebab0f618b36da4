#!/usr/bin/env python3
"""HF transformers baseline for benchmarks/cuda/bench_cuda_eval.cu: perplexity-evaluation
throughput (forward + float32 cross-entropy) in PyTorch bf16 with sdpa attention, timed with
CUDA events, on the same fixtures / protocol and the same random-weight 7B shapes.

    python3 benchmarks/python/bench_hf_eval.py [--part fixtures|attention|7b|all] [--fixtures DIR] [--json PATH]

--part attention times torch's causal sdpa kernel alone on bench_cuda_eval --part attention's shapes
(head_dim 128; the backend torch picks, and the flash / cuDNN ones forced where available).
"""
import argparse
import json
import math
import os

import numpy as np
import torch
import torch.nn.functional as F
import transformers
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

MODELS = ["tiny-gpt2", "tiny-llama2", "tiny-llama3", "tiny-qwen2", "tiny-mistral", "tiny-mqa", "tiny-qwen3"]
rows = []


@torch.inference_mode()
def nll_sum(model, ids):
    logits = model(input_ids=ids).logits  # (B, T, V) bf16
    V = logits.shape[-1]
    return F.cross_entropy(logits[:, :-1].float().reshape(-1, V), ids[:, 1:].reshape(-1), reduction="sum")


def timed(fn, iters):
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    out = [fn() for _ in range(iters)]
    e.record()
    torch.cuda.synchronize()
    return s.elapsed_time(e), out


def part_fixtures(fixtures):
    ids = np.fromfile(os.path.join(fixtures, "data", "wikitext2_test.ids.u16"), dtype="<u2").astype(np.int64)
    W, B = 256, 64
    n = len(ids) // W
    wins = torch.from_numpy(ids[: n * W].reshape(n, W)).cuda()
    for name in MODELS:
        d = os.path.join(fixtures, "models", name)
        ref = json.load(open(os.path.join(d, "reference.json")))["perplexity"]["wikitext2_test_all_windows"]
        model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.bfloat16, attn_implementation="sdpa").cuda().eval()
        nll_sum(model, wins[:B])  # warm-up

        def run():
            tot = torch.zeros((), device="cuda", dtype=torch.float64)
            for b in range(0, n, B):
                tot += nll_sum(model, wins[b : b + B]).double()
            return tot

        ms, out = timed(run, 1)
        ppl = math.exp(out[0].item() / (n * (W - 1)))
        tps = n * W / (ms / 1000)
        print(f"{name:14s} hf-bf16  windows {n}  ppl {ppl:.4f} (HF fp32 {ref:.4f})  {ms/1000:.3f} s  {tps:12.0f} tok/s", flush=True)
        rows.append(dict(part="fixtures", model=name, precision="bf16", windows=n, window=W, batch=B, perplexity=ppl, hf_reference_ppl=ref,
                         seconds=ms / 1000, tokens_per_s=tps))
        del model
        torch.cuda.empty_cache()


def part_7b(iters):
    cfgs = {
        "llama2-7b-shapes": LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                                        num_key_value_heads=32, max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=10000.0,
                                        tie_word_embeddings=False),
        "qwen2.5-7b-shapes": Qwen2Config(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                                         num_key_value_heads=4, max_position_embeddings=32768, rms_norm_eps=1e-6, rope_theta=1000000.0,
                                         tie_word_embeddings=False, use_sliding_window=False),
    }
    shapes = [(4, 1024), (2, 2048), (1, 4096)]
    for name, cfg in cfgs.items():
        cfg._attn_implementation = "sdpa"
        torch.manual_seed(0)
        with torch.device("cuda"):
            model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16, attn_implementation="sdpa").eval()
        for B, T in shapes:
            g = torch.Generator(device="cuda").manual_seed(1)
            ids = torch.randint(0, cfg.vocab_size, (B, T), device="cuda", generator=g)
            for _ in range(2):
                nll_sum(model, ids)
            ms, out = timed(lambda: nll_sum(model, ids), iters)
            ms /= iters
            tps = B * T / (ms / 1000)
            print(f"{name:22s} hf-bf16  B={B:<3d} T={T:<5d} {ms:10.2f} ms/batch {tps:12.0f} tok/s  (mean nll {out[-1].item()/(B*(T-1)):.3f})", flush=True)
            rows.append(dict(part="7b", model=name, precision="bf16", batch=B, seq_len=T, ms_per_batch=ms, tokens_per_s=tps))
        del model
        torch.cuda.empty_cache()


def part_attention(iters):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    backends = [("default", None), ("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION)]
    for nh, nkv, T, B in [(32, 32, 1024, 4), (32, 32, 4096, 1), (28, 4, 4096, 1)]:
        hd = 128
        g = torch.Generator(device="cuda").manual_seed(7)
        q = torch.rand(B, nh, T, hd, device="cuda", generator=g, dtype=torch.bfloat16) * 2 - 1
        k = torch.rand(B, nkv, T, hd, device="cuda", generator=g, dtype=torch.bfloat16) * 2 - 1
        v = torch.rand(B, nkv, T, hd, device="cuda", generator=g, dtype=torch.bfloat16) * 2 - 1
        flops = 4.0 * B * (T * (T + 1) / 2) * hd * nh  # causal pairs, as bench_cuda_eval counts them
        for name, be in backends:
            def run():
                return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=nkv != nh, scale=0.088388)
            try:
                if be is None:
                    for _ in range(3):
                        run()
                    ms, _ = timed(run, 20 * iters)
                else:
                    with sdpa_kernel([be]):
                        for _ in range(3):
                            run()
                        ms, _ = timed(run, 20 * iters)
            except RuntimeError as e:
                print(f"sdpa {name:8s} nh={nh} nkv={nkv} B={B} T={T}: not available ({str(e).splitlines()[0][:80]})", flush=True)
                continue
            ms /= 20 * iters
            print(f"sdpa {name:8s} nh={nh} nkv={nkv} hd={hd} B={B} T={T}: {ms:.3f} ms  {flops / ms / 1e9:.1f} TFLOP/s", flush=True)
            rows.append(dict(part="attention", kernel="sdpa-" + name, n_heads=nh, n_kv_heads=nkv, batch=B, seq_len=T, ms=ms, tflops=flops / ms / 1e9))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--part", default="all")
    ap.add_argument("--fixtures", default=os.path.join(os.path.dirname(__file__), "..", "..", "tests", "fixtures"))
    ap.add_argument("--json", default="")
    ap.add_argument("--iters", type=int, default=5)
    a = ap.parse_args()
    print(f"device: {torch.cuda.get_device_name(0)}, torch {torch.__version__}, transformers {transformers.__version__}", flush=True)
    if a.part in ("fixtures", "all"):
        part_fixtures(a.fixtures)
    if a.part in ("attention", "all"):
        part_attention(a.iters)
    if a.part in ("7b", "all"):
        part_7b(a.iters)
    if a.json:
        json.dump(dict(device=torch.cuda.get_device_name(0), torch=torch.__version__, transformers=transformers.__version__, rows=rows),
                  open(a.json, "w"), indent=2)


if __name__ == "__main__":
    main()
