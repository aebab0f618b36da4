#!/usr/bin/env python3
"""PyTorch (eager) counterpart of the CUDA fine-tuning step: ONE MLATrainer::step of an
MLA-converted LLaMA-family model with random weights (include/cacheshrink/train/graph.hpp,
trainer.hpp, optim/updates.hpp, manifold/stiefel.hpp), timed with CUDA events.

Model, per layer (separate-method MLA on every layer):
  h = RMSNorm(x);  q = h Wq^T (+bq);  c_k = h Wdk^T, c_v = h Wdv^T;  K = c_k Wuk^T + bk, V = c_v Wuv^T + bv
  RoPE (rotate_half) on q, K; causal (GQA) sdpa; x += o Wo^T;  x += SwiGLU(RMSNorm(x));  logits = RMSNorm(x) Head^T
Loss (graph.hpp): LM = mean CE over predicted tokens; recon = mean over layers of (MSE(K~, K) + MSE(V~, V)) / 2
  with K = h Wk^T (+bk) from the frozen original weights on the same h (no stop-gradient; biases cancel);
  total = (1 - alpha) LM + alpha recon.
Trainable: Wdk, Wdv (torch.optim.AdamW, lr 1e-5, wd 0.01); Wuk, Wuv (RiemannianAdam on the Euclidean
Stiefel manifold, lr 1e-4, written out below since geoopt is not installed). Everything else frozen.
Step (MLATrainer::step): zero_grad, forward, backward, total grad norm of all params, clip_grad_norm_
(max 1.0) of the Euclidean params only, AdamW step, RiemannianAdam step.
Init: normal(0, 0.02) on the device, norms = 1, Wu = Q of a Gaussian (diag R > 0), Wd = Wu^T W (what
the conversion gives: W_down = W_up^T W). Precision:
  float32   everything fp32; TF32 off (matmul and cuDNN), cuDNN sdpa off: sdpa runs mem-efficient / math.
  bfloat16  frozen weights bf16, trainable params + optimizer state fp32 (master weights), forward under
            torch.autocast(bf16): matmuls and sdpa (flash) in bf16, RMSNorm / CE / recon MSE in fp32.
  float64   for CPU checks (--check: finite-difference vs autograd).
projx: "svd" = linalg/polar.hpp (QR, then SVD of the p x p R), faithful but costly on the GPU (H200, llama2-7b
fp32: ~3.3 s of a 3.9 s optimizer step for the 64 SVDs of 1024 x 1024); "ns" = one Newton-Schulz step, equal
to 2nd order on these nearly orthonormal points (optimizer 0.57 s there, mostly the QR retraction).

    python3 benchmarks/python/bench_torch_train.py [--shape llama2-7b|qwen25-7b|tiny] [--dtype float32|bfloat16|float64]
        [--batch 4] [--seq 512] [--d-latent N] [--recon-alpha 0.3] [--warmup 2] [--steps 5] [--projx svd|ns]
        [--gqa repeat|native] [--tf32] [--compile] [--device cuda|cpu] [--check] [--json PATH]
"""
import argparse
import json
import math
import time

import torch
import torch.nn.functional as F

SHAPES = {  # benchmarks/cuda/shapes.hpp; the last entry is the default d_latent divisor of d_kv
    "llama2-7b": (dict(layers=32, hidden=4096, heads=32, kv_heads=32, head_dim=128, inter=11008, vocab=32000, eps=1e-5,
                       theta=1e4, bias=False), 4),
    "qwen25-7b": (dict(layers=28, hidden=3584, heads=28, kv_heads=4, head_dim=128, inter=18944, vocab=152064, eps=1e-6,
                       theta=1e6, bias=True), 2),
    "tiny": (dict(layers=3, hidden=64, heads=4, kv_heads=2, head_dim=16, inter=160, vocab=251, eps=1e-6, theta=1e4,
                  bias=True), 2),  # GQA + biases, for CPU checks
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}


# ---- Euclidean Stiefel manifold (geoopt.Stiefel(canonical=False) == manifold/stiefel.hpp) -------------
def sym(a):
    return 0.5 * (a + a.transpose(-1, -2))


def proju(x, u):  # projection onto T_x: u - x sym(x^T u); also egrad2rgrad and transport by projection
    return u - x @ sym(x.transpose(-1, -2) @ u)


def qr_pos(a):  # thin QR with diag(R) >= 0 (linalg::qr_positive)
    q, r = torch.linalg.qr(a)
    s = torch.sign(torch.diagonal(r, dim1=-2, dim2=-1))
    s = torch.where(s == 0, torch.ones_like(s), s)
    return q * s.unsqueeze(-2), r * s.unsqueeze(-1)


def polar(x, method):
    if method == "svd":  # linalg::polar: x = QR, R = U S V^T, polar = Q U V^T (== U V^T of x's thin SVD)
        q, r = qr_pos(x)
        u, _, vh = torch.linalg.svd(r)
        return q @ (u @ vh)
    # "ns": one Newton-Schulz step x (1.5 I - 0.5 x^T x): exact to 2nd order for a nearly orthonormal x
    eye = torch.eye(x.shape[-1], dtype=x.dtype, device=x.device)
    return x @ (1.5 * eye - 0.5 * (x.transpose(-1, -2) @ x))


class StiefelAdam:
    """geoopt.optim.RiemannianAdam (riemannian_adam_step in updates.hpp, weight_decay 0, no amsgrad) on a
    stack x (..., n, p) of Stiefel points: each matrix has ONE scalar second moment <rg, rg>."""

    def __init__(self, x, lr, betas=(0.9, 0.999), eps=1e-8, projx="svd"):
        self.x, self.lr, self.b1, self.b2, self.eps, self.projx, self.t = x, lr, betas[0], betas[1], eps, projx, 0
        self.m = torch.zeros_like(x)
        self.v = torch.zeros(*x.shape[:-2], 1, 1, dtype=x.dtype, device=x.device)

    @torch.no_grad()
    def step(self):
        self.t += 1
        x = polar(self.x, self.projx)  # x <- projx(x)
        rg = proju(x, self.x.grad)  # egrad2rgrad
        self.m.mul_(self.b1).add_(rg, alpha=1 - self.b1)
        self.v.mul_(self.b2).add_(rg.square().sum((-2, -1), keepdim=True), alpha=1 - self.b2)  # component_inner
        bc1, bc2 = 1 - self.b1 ** self.t, 1 - self.b2 ** self.t
        d = (self.m / bc1) / ((self.v / bc2).sqrt() + self.eps)
        y, _ = qr_pos(x - self.lr * d)  # QR retraction
        self.m.copy_(proju(y, self.m))  # transport of the first moment by projection onto T_y
        self.x.copy_(y)


# ---- model -----------------------------------------------------------------------------------------------
def build(c, d_latent, wdt, pdt, dev, seed):
    """Frozen weights in wdt, trainable in pdt (fp32 masters in bf16 mode), all made on the device."""
    g = torch.Generator(device=dev).manual_seed(seed)
    H, dq, dkv = c["hidden"], c["heads"] * c["head_dim"], c["kv_heads"] * c["head_dim"]

    def w(*shape):
        return torch.randn(*shape, generator=g, device=dev, dtype=wdt).mul_(0.02)

    ones = lambda n: torch.ones(n, device=dev, dtype=wdt)  # noqa: E731
    layers = [dict(n1=ones(H), wq=w(dq, H), wk=w(dkv, H), wv=w(dkv, H), wo=w(H, dq), n2=ones(H), wg=w(c["inter"], H),
                   wu=w(c["inter"], H), wd=w(H, c["inter"]), bq=w(dq) if c["bias"] else None, bk=w(dkv) if c["bias"] else None,
                   bv=w(dkv) if c["bias"] else None) for _ in range(c["layers"])]
    frozen = dict(embed=w(c["vocab"], H), head=w(c["vocab"], H), fn=ones(H), layers=layers)
    # Trainable: U[l, 0] = Wuk, U[l, 1] = Wuv (one stacked tensor so the optimizer math is batched).
    U = qr_pos(torch.randn(c["layers"], 2, dkv, d_latent, generator=g, device=dev, dtype=wdt).to(pdt))[0]
    Wd = [(U[l, i].transpose(0, 1) @ (L["wk"] if i == 0 else L["wv"]).to(pdt)).contiguous()
          for l, L in enumerate(layers) for i in (0, 1)]
    U.requires_grad_(True)
    for p in Wd:
        p.requires_grad_(True)
    return frozen, Wd, U  # Wd[2l] = Wdk of layer l, Wd[2l + 1] = Wdv


def rms(x, w, eps):  # HF LlamaRMSNorm: statistics in (at least) fp32, weight applied in the input dtype
    y = x.to(torch.promote_types(x.dtype, torch.float32))
    return w * (y * torch.rsqrt(y.square().mean(-1, keepdim=True) + eps)).to(x.dtype)


def rope(x, cos, sin):  # x (B, heads, T, hd); half-split rotate_half
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def make_loss(c, frozen, Wd, U, alpha, gqa):
    nh, nkv, hd, eps = c["heads"], c["kv_heads"], c["head_dim"], c["eps"]

    def loss_fn(ids, cos, sin):
        B, T = ids.shape
        cos, sin = cos.to(frozen["embed"].dtype), sin.to(frozen["embed"].dtype)
        x = F.embedding(ids, frozen["embed"])
        acc = torch.promote_types(x.dtype, torch.float32)  # fp32 for bf16, else the working dtype
        recon = 0.0
        # One UnbindBackward stacks the 2L gradients into U.grad at the end (indexing U[l, 0] instead would
        # make 2L SelectBackward nodes, each allocating and adding a zero tensor of U's full size).
        Us = U.flatten(0, 1).unbind(0)
        for l, L in enumerate(frozen["layers"]):
            h = rms(x, L["n1"], eps)
            q = F.linear(h, L["wq"], L["bq"])
            kl = F.linear(F.linear(h, Wd[2 * l]), Us[2 * l])  # c_k Wuk^T (bias added below: it cancels in recon)
            vl = F.linear(F.linear(h, Wd[2 * l + 1]), Us[2 * l + 1])
            if alpha > 0:  # K~ - K, V~ - V against the frozen original projections of the same h
                rk = kl.to(acc) - F.linear(h, L["wk"]).to(acc)
                rv = vl.to(acc) - F.linear(h, L["wv"]).to(acc)
                recon = recon + 0.5 * (rk.square().mean() + rv.square().mean())
            k = kl + L["bk"] if L["bk"] is not None else kl
            v = vl + L["bv"] if L["bv"] is not None else vl
            q = rope(q.view(B, T, nh, hd).transpose(1, 2), cos, sin)
            k = rope(k.view(B, T, nkv, hd).transpose(1, 2), cos, sin)
            v = v.view(B, T, nkv, hd).transpose(1, 2)
            if nkv != nh and gqa == "repeat":  # HF repeat_kv
                k, v = k.repeat_interleave(nh // nkv, dim=1), v.repeat_interleave(nh // nkv, dim=1)
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=nkv != nh and gqa == "native")
            x = x + F.linear(o.transpose(1, 2).reshape(B, T, nh * hd), L["wo"])
            h2 = rms(x, L["n2"], eps)
            x = x + F.linear(F.silu(F.linear(h2, L["wg"])) * F.linear(h2, L["wu"]), L["wd"])
        logits = F.linear(rms(x, frozen["fn"], eps), frozen["head"])  # (B, T, V), all T like graph.hpp
        lm = F.cross_entropy(logits[:, :-1].to(acc).reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        recon = recon / len(frozen["layers"]) if alpha > 0 else torch.zeros((), dtype=acc, device=ids.device)
        return (1 - alpha) * lm + alpha * recon, lm, recon

    return loss_fn


def rope_tables(c, T, dev):
    inv = 1.0 / (c["theta"] ** (torch.arange(0, c["head_dim"], 2, device=dev, dtype=torch.float64) / c["head_dim"]))
    f = torch.outer(torch.arange(T, device=dev, dtype=torch.float64), inv)
    emb = torch.cat((f, f), dim=-1)
    return emb.cos(), emb.sin()  # float64; cast to the working dtype in the forward


class Timer:  # CUDA events on the GPU, perf_counter on the CPU
    def __init__(self, dev):
        self.cuda = dev.type == "cuda"

    def mark(self):
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter()

    def ms(self, a, b):
        if self.cuda:
            b.synchronize()
            return a.elapsed_time(b)
        return (b - a) * 1000.0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="llama2-7b", choices=list(SHAPES))
    ap.add_argument("--dtype", default="float32", choices=list(DTYPES))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--d-latent", type=int, default=0, help="0: d_kv / 4 (llama2), d_kv / 2 (qwen25, tiny)")
    ap.add_argument("--recon-alpha", type=float, default=0.3)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--projx", default="svd", choices=["svd", "ns"], help="polar by QR + SVD of R (faithful) or 1 Newton-Schulz step")
    ap.add_argument("--gqa", default="repeat", choices=["repeat", "native"], help="repeat_interleave K/V, or sdpa enable_gqa")
    ap.add_argument("--tf32", action="store_true", help="float32: forward/backward matmuls in TF32 (the optimizer stays strict fp32)")
    ap.add_argument("--compile", action="store_true", help="torch.compile the forward + loss")
    ap.add_argument("--check", action="store_true", help="finite-difference check of the loss gradient (use --device cpu --dtype float64)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default="")
    a = ap.parse_args()
    dev = torch.device(a.device)
    cuda = dev.type == "cuda"
    c, div = SHAPES[a.shape]
    dkv = c["kv_heads"] * c["head_dim"]
    d_latent = a.d_latent or dkv // div
    wdt = DTYPES[a.dtype]
    pdt = torch.float32 if wdt == torch.bfloat16 else wdt
    torch.backends.cuda.matmul.allow_tf32 = a.tf32  # strict fp32 unless --tf32 (bf16 mode: autocast makes matmuls bf16 anyway)
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cudnn.enabled = False
    if cuda:
        torch.backends.cuda.enable_cudnn_sdp(False)
    torch.manual_seed(a.seed)
    dname = torch.cuda.get_device_name(dev) if cuda else "cpu"
    print(f"device: {dname}, torch {torch.__version__}; {a.shape} {a.dtype} B={a.batch} T={a.seq} d_latent {d_latent} "
          f"alpha {a.recon_alpha} projx {a.projx} gqa {a.gqa}{' compile' if a.compile else ''}{' tf32' if a.tf32 else ''}", flush=True)

    frozen, Wd, U = build(c, d_latent, wdt, pdt, dev, a.seed)
    ids = torch.randint(0, c["vocab"], (a.batch, a.seq), device=dev, generator=torch.Generator(device=dev).manual_seed(a.seed + 1))
    cos, sin = rope_tables(c, a.seq, dev)
    loss_fn = make_loss(c, frozen, Wd, U, a.recon_alpha, a.gqa)
    fwd = torch.compile(loss_fn) if a.compile else loss_fn
    amp = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=wdt == torch.bfloat16)
    adamw = torch.optim.AdamW(Wd, lr=1e-5, weight_decay=0.01)  # foreach on CUDA
    radam = StiefelAdam(U, lr=1e-4, projx=a.projx)
    params = Wd + [U]
    if cuda:
        torch.cuda.synchronize(dev)
        model_bytes = torch.cuda.memory_allocated(dev)
        total_peak = torch.cuda.max_memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)

    def forward():
        with amp:
            return fwd(ids, cos, sin)

    def optimize():
        torch.backends.cuda.matmul.allow_tf32 = False  # the optimizer in strict fp32 (as bench_cuda_train's)
        with torch.no_grad():  # norm of ALL gradients (reported), then clip the Euclidean ones only
            gnorm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params]))
        torch.nn.utils.clip_grad_norm_(Wd, 1.0)
        adamw.step()
        radam.step()
        torch.backends.cuda.matmul.allow_tf32 = a.tf32
        return gnorm

    def step():
        adamw.zero_grad(set_to_none=True)
        U.grad = None
        out = forward()
        out[0].backward()
        return out, optimize()

    if a.check:  # central differences of the total loss vs autograd at a few entries (float64 on the CPU)
        out = forward()
        out[0].backward()
        L = c["layers"]
        # each probe: the entry of largest |grad| in that matrix (so roundoff does not dominate)
        probes = [("Wdk[0]", Wd[0], ()), (f"Wdv[{L - 1}]", Wd[2 * L - 1], ()), ("Wdk[1]", Wd[2], ()), ("Wuk[0]", U, (0, 0)),
                  (f"Wuv[{L - 1}]", U, (L - 1, 1))]
        worst = 0.0
        for name, p, pre in probes:
            h = 1e-4 if pdt == torch.float64 else 1e-2
            gsub = p.grad[pre] if pre else p.grad
            idx = pre + tuple(int(i) for i in torch.unravel_index(gsub.abs().argmax(), gsub.shape))
            with torch.no_grad():
                x0 = p[idx].item()
                p[idx] = x0 + h
                lp = forward()[0].item()
                p[idx] = x0 - h
                lm_ = forward()[0].item()
                p[idx] = x0
            fd, ag = (lp - lm_) / (2 * h), p.grad[idx].item()
            rel = abs(fd - ag) / max(abs(fd), abs(ag), 1e-30)
            worst = max(worst, rel)
            print(f"  check d loss / d {name}{list(idx[-2:])}: autograd {ag:+.10e}  finite diff {fd:+.10e}  rel err {rel:.2e}")
        verdict = ("PASS" if worst < 1e-6 else "FAIL") if pdt == torch.float64 else "no verdict: needs --dtype float64"
        print(f"check: max rel err {worst:.2e} ({verdict})", flush=True)

    U0 = U.detach().clone()
    for _ in range(a.warmup):
        step()
    if cuda:
        torch.cuda.synchronize(dev)
        total_peak = max(total_peak, torch.cuda.max_memory_allocated(dev))
        torch.cuda.reset_peak_memory_stats(dev)
        before_steps = torch.cuda.memory_allocated(dev)
    tm = Timer(dev)
    times = []
    for _ in range(a.steps):
        t0 = tm.mark()
        out, gnorm = step()
        times.append((t0, tm.mark()))
    times = [tm.ms(s, e) for s, e in times]
    peak = torch.cuda.max_memory_allocated(dev) if cuda else None
    # One instrumented step: forward / backward / optimizer (grad norm + clip + AdamW + RiemannianAdam).
    e0 = tm.mark()
    adamw.zero_grad(set_to_none=True)
    U.grad = None
    out = forward()
    e1 = tm.mark()
    out[0].backward()
    e2 = tm.mark()
    gnorm = optimize()
    e3 = tm.mark()
    bd = dict(forward_ms=tm.ms(e0, e1), backward_ms=tm.ms(e1, e2), optimizer_ms=tm.ms(e2, e3))
    if cuda:
        total_peak = max(total_peak, torch.cuda.max_memory_allocated(dev))

    loss, lm, recon = (t.item() for t in out)
    with torch.no_grad():
        Ud = U.double()  # in float64: with --tf32 a float32 U^T U would itself carry TF32's 1e-3 error
        eye = torch.eye(d_latent, dtype=torch.float64, device=dev)
        ortho = torch.linalg.matrix_norm(Ud.transpose(-1, -2) @ Ud - eye).max().item()  # max ||U^T U - I||_F
        moved = (U - U0).abs().max().item()
    ms_mean, ms_min = sum(times) / len(times), min(times)
    tps = a.batch * a.seq / (ms_mean / 1000)
    ok = all(math.isfinite(v) for v in (loss, lm, recon, gnorm.item()))
    print(f"{a.shape} torch-{a.dtype} B={a.batch} T={a.seq} d_latent {d_latent}: step {ms_mean:.2f} ms (min {ms_min:.2f}), "
          f"{tps:.0f} tok/s | fwd {bd['forward_ms']:.2f} bwd {bd['backward_ms']:.2f} opt {bd['optimizer_ms']:.2f} ms"
          + (f" | peak {peak / 2**30:.2f} GiB (step), {total_peak / 2**30:.2f} GiB (total), weights+state {before_steps / 2**30:.2f} GiB"
             if cuda else ""), flush=True)
    print(f"  loss {loss:.5f} (lm {lm:.5f} recon {recon:.6f}) |g| {gnorm.item():.4f} finite {ok}; max ||U^T U - I||_F {ortho:.2e}; "
          f"max |U - U0| {moved:.2e} after {a.warmup + a.steps + 1} steps", flush=True)
    if a.json:
        json.dump(dict(shape=a.shape, dtype=a.dtype, batch=a.batch, seq=a.seq, d_latent=d_latent, recon_alpha=a.recon_alpha,
                       projx=a.projx, gqa=a.gqa, compile=a.compile, tf32=a.tf32, step_ms_mean=ms_mean, step_ms_min=ms_min, step_ms=times,
                       tokens_per_s=tps, peak_bytes=peak, total_peak_bytes=total_peak if cuda else None,
                       model_bytes=model_bytes if cuda else None, resident_bytes_before_steps=before_steps if cuda else None,
                       breakdown=bd, loss=loss, lm=lm, recon=recon, grad_norm=gnorm.item(), ortho_error=ortho, finite=ok,
                       torch=torch.__version__, device=dname), open(a.json, "w"), indent=2)


if __name__ == "__main__":
    main()
