#!/usr/bin/env python3
"""HF transformers decode baseline for bench_cuda_decode (issue #9).

Random-weight LLaMA-2-7B and Qwen2.5-7B shapes in bf16 with sdpa attention; the KV cache
(DynamicCache) is filled with random keys/values of `context - 1` tokens, then one token per
sequence is decoded per step at a fixed context (the cache is cropped back after each step),
timed with CUDA events. Same cells as bench_cuda_decode; a cell whose cache does not fit is
reported as such.

    python3 benchmarks/python/bench_hf_decode.py [--json PATH] [--steps N] [--batches 1,16,64]
                                                 [--contexts 1024,4096,16384,32768]
"""
import argparse
import json

import torch
import transformers
from transformers import AutoModelForCausalLM, DynamicCache, LlamaConfig, Qwen2Config


def configs():
    return {
        "llama2": LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                              num_key_value_heads=32, max_position_embeddings=40000, rms_norm_eps=1e-5, rope_theta=10000.0,
                              tie_word_embeddings=False),
        "qwen25": Qwen2Config(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                              num_key_value_heads=4, max_position_embeddings=40000, rms_norm_eps=1e-6, rope_theta=1000000.0,
                              tie_word_embeddings=False, use_sliding_window=False),
    }


def run_cell(model, cfg, B, ctx, steps):
    L, nkv, hd = cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads
    need = 2 * L * B * ctx * nkv * hd * 2 * 2  # cache + one concatenated copy per step
    free, _ = torch.cuda.mem_get_info()
    if need + (4 << 30) > free:
        return None, need
    g = torch.Generator(device="cuda").manual_seed(3)
    cache = DynamicCache()
    for layer in range(L):
        k = torch.rand((B, nkv, ctx - 1, hd), device="cuda", dtype=torch.bfloat16, generator=g) * 2 - 1
        v = torch.rand((B, nkv, ctx - 1, hd), device="cuda", dtype=torch.bfloat16, generator=g) * 2 - 1
        cache.update(k, v, layer)
    tok = (torch.arange(B, device="cuda") * 31 + 17).remainder(cfg.vocab_size).view(B, 1)
    pos = torch.full((B, 1), ctx - 1, device="cuda", dtype=torch.long)
    mask = torch.ones((B, ctx), device="cuda", dtype=torch.long)

    def step():
        model(input_ids=tok, position_ids=pos, attention_mask=mask, past_key_values=cache, use_cache=True)
        cache.crop(ctx - 1)

    with torch.inference_mode():
        step()
        step()
        torch.cuda.synchronize()
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        step()
        e1.record()
        e1.synchronize()
        first = e0.elapsed_time(e1)
        n = max(2, min(steps, int(1500 / max(first, 0.01))))
        e0.record()
        for _ in range(n):
            step()
        e1.record()
        e1.synchronize()
        ms = e0.elapsed_time(e1) / n
    del cache
    torch.cuda.empty_cache()
    return ms, need


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--batches", default="1,16,64")
    ap.add_argument("--contexts", default="1024,4096,16384,32768")
    ap.add_argument("--shapes", default="llama2,qwen25")
    a = ap.parse_args()
    batches = [int(x) for x in a.batches.split(",")]
    contexts = [int(x) for x in a.contexts.split(",")]
    print(f"device: {torch.cuda.get_device_name(0)}, torch {torch.__version__}, transformers {transformers.__version__}", flush=True)
    rows = []
    for name in a.shapes.split(","):
        cfg = configs()[name]
        torch.manual_seed(0)
        with torch.device("cuda"):
            model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16, attn_implementation="sdpa").eval()
        for B in batches:
            for ctx in contexts:
                try:
                    ms, need = run_cell(model, cfg, B, ctx, a.steps)
                except torch.cuda.OutOfMemoryError:
                    torch.cuda.empty_cache()
                    ms, need = None, -1
                if ms is None:
                    print(f"{name:8s} hf-bf16 B={B:<3d} ctx={ctx:<6d}  does not fit", flush=True)
                    rows.append(dict(shape=name, path="hf", batch=B, context=ctx, fits=False))
                    continue
                print(f"{name:8s} hf-bf16 B={B:<3d} ctx={ctx:<6d}  {ms:9.3f} ms/step  {B / (ms / 1000):10.1f} tok/s", flush=True)
                rows.append(dict(shape=name, path="hf", batch=B, context=ctx, fits=True, ms_per_step=ms, tokens_per_s=B / (ms / 1000)))
        del model
        torch.cuda.empty_cache()
    if a.json:
        with open(a.json, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(0), torch=torch.__version__, transformers=transformers.__version__, rows=rows), f,
                      indent=1)


if __name__ == "__main__":
    main()
