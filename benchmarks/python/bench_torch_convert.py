#!/usr/bin/env python3
"""PyTorch counterpart of benchmarks/cuda/bench_cuda_convert.cu: the same conversion algorithm
(calibration Grams of every layer's attention input in float64, then per layer or per xKV group
S = W G W^T, torch.linalg.eigh in float64, W_up = top-k eigenvectors, W_down = W_up^T W) on an
HF transformers model with random weights (bf16, made on the device, so no upload is timed),
calibration forward in bf16 with sdpa, hooks on each attention module's input.

    python3 benchmarks/python/bench_torch_convert.py [--shapes llama2,qwen25] [--seqs 128] [--len 512] [--batch 8] [--json PATH]
"""
import argparse
import json
import time

import torch
import transformers
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config


def configs():
    return {
        "llama2": (LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                               num_key_value_heads=32, max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=10000.0,
                               tie_word_embeddings=False), 4.0, "separate"),
        "qwen25": (Qwen2Config(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                               num_key_value_heads=4, max_position_embeddings=32768, rms_norm_eps=1e-6, rope_theta=1000000.0,
                               tie_word_embeddings=False, use_sliding_window=False), 2.0, "xkv"),
    }


def top_basis(s, k):
    vals, vecs = torch.linalg.eigh(s)  # ascending
    return vecs[:, -k:].flip(-1), vals.flip(-1)


@torch.inference_mode()
def convert(model, calib, batch, ratio, method, warmup=False):
    layers = model.model.layers
    H = model.config.hidden_size
    grams = [torch.zeros(H, H, dtype=torch.float64, device="cuda") for _ in layers]
    handles = []
    for i, layer in enumerate(layers):
        def hook(mod, args, kwargs, i=i):
            hs = kwargs.get("hidden_states", args[0] if args else None)
            x = hs.reshape(-1, H).double()
            grams[i].addmm_(x.T, x)
        handles.append(layer.self_attn.register_forward_pre_hook(hook, with_kwargs=True))
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for b in range(0, calib.shape[0], batch):
        model.model(input_ids=calib[b:b + batch])  # the decoder stack only (no LM head)
    torch.cuda.synchronize()
    t1 = time.perf_counter()
    for h in handles:
        h.remove()
    d_kv = layers[0].self_attn.k_proj.weight.shape[0]
    k = int(d_kv / ratio)
    out = []
    if method == "separate":
        for i, layer in enumerate(layers):
            for proj in (layer.self_attn.k_proj, layer.self_attn.v_proj):
                w = proj.weight.double()
                u, _ = top_basis(w @ grams[i] @ w.T, k)
                out.append((u, u.T @ w))
            if warmup:
                break
    else:  # xkv, groups of 4 layers, statistics normalised by their trace
        for g in range(0, len(layers), 4):
            group = list(range(g, min(len(layers), g + 4)))
            for name in ("k_proj", "v_proj"):
                ws = [getattr(layers[i].self_attn, name).weight.double() for i in group]
                s = sum((w @ grams[i] @ w.T) / torch.trace(w @ grams[i] @ w.T) for i, w in zip(group, ws))
                u, _ = top_basis(s, k)
                out.extend((u, u.T @ w) for w in ws)
            if warmup:
                break
    torch.cuda.synchronize()
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1, k, len(out)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="llama2,qwen25")
    ap.add_argument("--seqs", type=int, default=128)
    ap.add_argument("--len", type=int, default=512)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--json", default="")
    a = ap.parse_args()
    print(f"device: {torch.cuda.get_device_name(0)}, torch {torch.__version__}, transformers {transformers.__version__}", flush=True)
    rows = []
    for name in a.shapes.split(","):
        cfg, ratio, method = configs()[name]
        torch.manual_seed(0)
        with torch.device("cuda"):
            model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16, attn_implementation="sdpa").eval()
        g = torch.Generator(device="cuda").manual_seed(1)
        calib = torch.randint(0, cfg.vocab_size, (a.seqs, a.len), device="cuda", generator=g)
        convert(model, calib[: a.batch], a.batch, ratio, method, warmup=True)  # kernels, cuSOLVER handles
        cal_s, init_s, k, n = convert(model, calib, a.batch, ratio, method)
        tok = a.seqs * a.len
        print(f"{name:8s} torch-bf16 {method} d_latent {k}: calibration {cal_s:.2f} s ({tok / cal_s:.0f} tok/s) + init {init_s:.2f} s = "
              f"{cal_s + init_s:.2f} s ({n} projections)", flush=True)
        rows.append(dict(shape=name, precision="bf16", method=method, d_latent=k, calibration_tokens=tok, calibration_s=cal_s, init_s=init_s,
                         total_s=cal_s + init_s))
        del model
        torch.cuda.empty_cache()
    if a.json:
        json.dump(dict(device=torch.cuda.get_device_name(0), torch=torch.__version__, transformers=transformers.__version__, rows=rows),
                  open(a.json, "w"), indent=2)


if __name__ == "__main__":
    main()
