"""The GPU suite's correctness stage: every fused op x every backend at the exact MAE shapes.

    records = run_correctness(device, models, batch, dtypes)      # benchmarks/gpu_suite.py calls this

For each op of `fastmask.ops` and each registered backend (and, for attention, each SDPA backend
forced alone through `torch.nn.attention.sdpa_kernel`), on random inputs at the shapes the MAE step
feeds it (encoder and decoder of ViT-B/16, L/16, H/14 at 224 px, mask ratio 0.75):

- the forward output and the gradient of every differentiable input are compared with the `torch`
  reference run in fp32 on the same (upcast) inputs; errors are reported as max absolute error and
  judged against the backend record's own (atol, rtol) for the dtype (`fastmask.ops.backends`);
- memory is poisoned first: blocks of the caching allocator are filled with NaN bytes and freed,
  so an output element a kernel never writes reads as NaN and is counted (`nan_out`). On the CPU
  (dry run) the allocator does not cache, so poisoning is best effort there;
- attention runs on the strided q/k/v views the model makes from one qkv projection
  ([B, N, 3, H, hd] permuted, not contiguous), plus one-query class attention (Nq = 1 against
  1 + L keys), plus adversarial log-sum-exp inputs (logits of magnitude ~1e4, all-equal rows, one
  dominant key) where the NaN/inf counts of output and gradients are the result.

A backend that declines the inputs (`BackendUnavailable`, or SDPA's "no kernel") is recorded as
"declined" with its reason; an exception is recorded as "error". Calls only the public op functions
(`fastmask.ops.<op>(..., backend=name)`) and `backends_for(op)`, so kernel changes need no change here
as long as those signatures hold.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import torch
import torch.nn.functional as F

# name: (patch, encoder dim, encoder heads); decoder 512 wide, 16 heads for all (MAE's).
MAE_MODELS = {"vit_b": (16, 768, 12), "vit_l": (16, 1024, 16), "vit_h": (14, 1280, 16)}
TINY_MODELS = {"tiny": (8, 64, 4)}     # the dry run: 32 px, decoder 32 wide, 4 heads
IMG, TINY_IMG, MASK_RATIO = 224, 32, 0.75
DECODER = (512, 16)
TINY_DECODER = (32, 4)
POISON_BYTES = 256 * 2 ** 20
BAD = ("mismatch", "error", "nan_or_inf")  # statuses that are findings; "declined" is a backend's own choice


def _poison(device: torch.device) -> None:
    """Fill freed allocator blocks with 0xFF bytes (NaN in fp32, fp16 and bf16), large and small pools."""
    if device.type != "cuda":
        return
    torch.cuda.empty_cache()
    big = torch.full((POISON_BYTES,), 255, dtype=torch.uint8, device=device)
    small = [torch.full((256 * 1024,), 255, dtype=torch.uint8, device=device) for _ in range(32)]
    del big, small  # back to the caching allocator, NaN bytes and all


def _masks(B: int, L: int, K: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    shuffle = torch.rand(B, L, device=device).argsort(dim=1)
    restore = shuffle.argsort(dim=1)
    mask = torch.ones(B, L, device=device)
    mask[:, :K] = 0
    return shuffle[:, :K].contiguous(), restore, torch.gather(mask, 1, restore)


def _qkv_views(B: int, N: int, H: int, hd: int, dtype, device, scale: float = 1.0):
    """q, k, v [B, H, N, hd] as the model makes them: strided views of one [B, N, 3, H, hd] projection."""
    qkv = (torch.randn(B, N, 3, H, hd, device=device) * scale).to(dtype).permute(2, 0, 3, 1, 4)
    return qkv[0], qkv[1], qkv[2]


def cases(model: str, dims: tuple[int, int, int], B: int, img: int, decoder: tuple[int, int], dtype,
          device) -> list[dict]:
    """[{op, part, inputs: {name: tensor or value}, grad: [names]}] for one model's MAE shapes."""
    p, D, H = dims
    L = (img // p) ** 2
    K = int(L * (1 - MASK_RATIO))
    Dd, Hd = decoder
    P = p * p * 3

    def t(*shape, scale=1.0):
        return (torch.randn(*shape, device=device) * scale).to(dtype)

    imgs = t(B, 3, img, img)
    ids_keep, ids_restore, mask = _masks(B, L, K, device)
    out = [
        dict(op="patch_gather", part="encoder", inputs=dict(imgs=imgs, ids_keep=ids_keep, patch_size=p),
             grad=["imgs"]),
        dict(op="patch_embed_visible", part="encoder",
             inputs=dict(imgs=imgs, ids_keep=ids_keep, weight=t(D, 3, p, p, scale=0.02), bias=t(D),
                         pos_embed=t(L, D, scale=0.02)), grad=["weight", "bias", "pos_embed"]),
        dict(op="patch_scatter", part="decoder", inputs=dict(tokens=t(B, K, Dd), ids_restore=ids_restore,
                                                             mask_token=t(Dd)),
             grad=["tokens", "mask_token"]),
        dict(op="decoder_unshuffle", part="decoder input",
             inputs=dict(x=t(B, 1 + K, Dd), ids_restore=ids_restore, mask_token=t(Dd),
                         pos_embed=t(1 + L, Dd)),
             grad=["x", "mask_token", "pos_embed"]),
        dict(op="norm_pix_loss", part="loss", inputs=dict(pred=t(B, L, P), imgs=imgs, mask=mask,
                                                          patch_size=p),
             grad=["pred"]),
    ]
    for part, N, width, heads in (("encoder", 1 + K, D, H), ("decoder", 1 + L, Dd, Hd)):
        q, k, v = _qkv_views(B, N, heads, width // heads, dtype, device)
        out.append(dict(op="attention", part=f"{part} (strided qkv views)", inputs=dict(q=q, k=k, v=v),
                        grad=["q", "k", "v"]))
        x = t(B, N, width)
        out.append(dict(op="add_layer_norm", part=part, inputs=dict(x=x, residual=t(B, N, width),
                                                                    weight=t(width), bias=t(width)),
                        grad=["x", "residual", "weight", "bias"]))
        out.append(dict(op="bias_gelu", part=f"{part} mlp", inputs=dict(x=t(B, N, 4 * width),
                                                                        bias=t(4 * width)),
                        grad=["x", "bias"]))
    hd = D // H
    _, k, v = _qkv_views(B, 1 + L, H, hd, dtype, device)
    out.append(dict(op="attention", part="class attention (1 query)", inputs=dict(q=t(B, H, 1, hd), k=k, v=v),
                    grad=["q", "k", "v"]))
    for c in out:
        c["model"] = model
    return out


def adversarial_attention(B: int, H: int, N: int, hd: int, dtype, device) -> list[dict]:
    """Inputs whose softmax overflows without the max-subtraction (log-sum-exp) trick."""
    q, k, v = _qkv_views(B, N, H, hd, dtype, device, scale=64.0)     # logits ~ 64*64 = 4096 in size
    big = dict(q=q, k=k, v=v)
    kc = torch.full((B, H, N, hd), 8.0, device=device, dtype=dtype)  # every key equal: every row uniform
    equal = dict(q=_qkv_views(B, N, H, hd, dtype, device, scale=100.0)[0].contiguous(), k=kc,
                 v=torch.randn(B, H, N, hd, device=device).to(dtype))
    ko = torch.randn(B, H, N, hd, device=device)
    ko[:, :, 0] = 200.0                                              # key 0 dominates every row
    dominant = dict(q=torch.full((B, H, N, hd), 1.0, device=device, dtype=dtype), k=ko.to(dtype),
                    v=torch.randn(B, H, N, hd, device=device).to(dtype))
    return [dict(op="attention", part=f"adversarial lse: {name}", inputs=inp, grad=["q", "k", "v"],
                 adversarial=True)
            for name, inp in (("logits ~1e4", big), ("all-equal rows", equal),
                              ("one dominant key", dominant))]


def _sdpa_impls() -> dict[str, Callable]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def forced(backend):
        def run(q, k, v, **_):
            with sdpa_kernel([backend]):
                return F.scaled_dot_product_attention(q, k, v)
        return run

    names = ("CUDNN_ATTENTION", "FLASH_ATTENTION", "EFFICIENT_ATTENTION", "MATH")
    return {f"sdpa:{n.lower()}": forced(getattr(SDPBackend, n)) for n in names if hasattr(SDPBackend, n)}


def _run(fn: Callable, inputs: dict, grad: list[str], seed: int = 0):
    """-> (outputs as a tuple of tensors, {name: grad}) for fn(**inputs) with a fixed random upstream grad."""
    leaves = {k: (v.detach().clone().requires_grad_(True) if k in grad else v) for k, v in inputs.items()}
    out = fn(**leaves)
    outs = out if isinstance(out, tuple) else (out,)
    g = torch.Generator(device="cpu").manual_seed(seed)
    ups = [torch.randn(o.shape, generator=g).to(o.device, o.dtype) for o in outs]
    torch.autograd.backward(outs, ups)
    return tuple(o.detach() for o in outs), {k: leaves[k].grad for k in grad}


def _upcast(inputs: dict) -> dict:
    return {k: (v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
            for k, v in inputs.items()}


def _compare(got: torch.Tensor | None, ref: torch.Tensor, atol: float, rtol: float) -> dict[str, Any]:
    if got is None:
        return {"missing": True, "ok": False}
    got_f = got.float()
    nan, inf = int(torch.isnan(got_f).sum()), int(torch.isinf(got_f).sum())
    finite = torch.isfinite(got_f) & torch.isfinite(ref)
    err = (got_f - ref).abs()
    max_err = float(err[finite].max()) if finite.any() else math.inf
    ok = nan == 0 and inf == 0 and bool(torch.all(err[finite] <= atol + rtol * ref.abs()[finite]))
    return {"max_abs_err": max_err, "nan": nan, "inf": inf, "ok": ok}


def check_case(case: dict, impls: dict[str, Callable], device: torch.device) -> list[dict]:
    """One case against every implementation in `impls` (name -> fn(**inputs))."""
    from fastmask import ops
    from fastmask.ops.backends import BackendUnavailable

    op = case["op"]
    ref_out, ref_grads = _run(getattr(ops, op), {**_upcast(case["inputs"]), "backend": "torch"}, case["grad"])
    dtype = next(v.dtype for v in case["inputs"].values()
                 if isinstance(v, torch.Tensor) and v.is_floating_point())
    records = []
    for name, fn in impls.items():
        rec: dict[str, Any] = {"op": op, "model": case["model"], "part": case["part"], "impl": name,
                               "dtype": str(dtype).replace("torch.", ""),
                               "shapes": {k: list(v.shape) for k, v in case["inputs"].items()
                                          if isinstance(v, torch.Tensor)}}
        table = ops.backends_for(op)
        atol, rtol = table.get(name.split(":")[0], table["torch"]).tolerances.get(dtype, (2e-2, 2e-2))
        rec["tolerance"] = [atol, rtol]
        try:
            _poison(device)
            outs, grads = _run(fn, case["inputs"], case["grad"])
        except BackendUnavailable as e:
            records.append({**rec, "status": "declined", "reason": str(e)})
            continue
        except RuntimeError as e:
            # SDPA forced onto one backend raises RuntimeError when that kernel cannot take the inputs.
            no_kernel = any(m in str(e) for m in ("No available kernel", "No viable backend"))
            status = "declined" if name.startswith("sdpa:") and no_kernel else "error"
            records.append({**rec, "status": status, "reason": f"{type(e).__name__}: {str(e)[:300]}"})
            continue
        out_cmp = [_compare(o, r, atol, rtol) for o, r in zip(outs, ref_out)]
        grad_cmp = {k: _compare(grads[k], ref_grads[k], atol, rtol) for k in case["grad"]}
        nan_total = sum(c.get("nan", 0) + c.get("inf", 0) for c in [*out_cmp, *grad_cmp.values()])
        if case.get("adversarial"):
            # Low-precision logits of size ~1e4 legitimately differ from fp32 ones; what must hold is
            # that nothing overflows: the NaN/inf count is the result.
            status = "ok" if nan_total == 0 else "nan_or_inf"
        else:
            status = "ok" if all(c["ok"] for c in [*out_cmp, *grad_cmp.values()]) else "mismatch"
        records.append({**rec, "status": status, "outputs": out_cmp, "grads": grad_cmp,
                        "nan_inf_total": nan_total, "adversarial": bool(case.get("adversarial"))})
    return records


def implementations(op: str) -> dict[str, Callable]:
    """Every registered backend of `op` through the public op (and, for attention, each SDPA kernel)."""
    from fastmask import ops

    fn = getattr(ops, op)
    out = {name: (lambda name=name, **kw: fn(**kw, backend=name)) for name in ops.backends_for(op)}
    if op == "attention":
        out.update(_sdpa_impls())
    return out


def run_correctness(device: torch.device, dry_run: bool, batch: int, dtypes: tuple[torch.dtype, ...],
                    log: Callable[[str], None] = print) -> dict[str, Any]:
    """Every case x implementation x dtype -> {"records": [...], "counts": {status: n}, "nan_inf": ...}."""
    models = TINY_MODELS if dry_run else MAE_MODELS
    img, decoder = (TINY_IMG, TINY_DECODER) if dry_run else (IMG, DECODER)
    records: list[dict] = []
    for dtype in dtypes:
        for model, dims in models.items():
            torch.manual_seed(0)
            all_cases = cases(model, dims, batch, img, decoder, dtype, device)
            p, D, H = dims
            for c in adversarial_attention(batch, H, 1 + (img // p) ** 2, D // H, dtype, device):
                all_cases.append({**c, "model": model})
            for case in all_cases:
                new = check_case(case, implementations(case["op"]), device)
                records.extend(new)
                bad = [r for r in new if r["status"] in BAD]
                log(f"[correctness] {str(dtype)[6:]:8s} {model:6s} {case['op']:20s} {case['part']:34s} "
                    f"{len(new) - len(bad)}/{len(new)} ok or declined"
                    + (f"; {', '.join(r['impl'] + ':' + r['status'] for r in bad)}" if bad else ""))
            if device.type == "cuda":
                torch.cuda.empty_cache()
    counts: dict[str, int] = {}
    for r in records:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    adversarial = [{"impl": r["impl"], "model": r["model"], "part": r["part"], "dtype": r["dtype"],
                    "nan_inf_total": r.get("nan_inf_total"), "status": r["status"]}
                   for r in records if r.get("adversarial")]
    return {"records": records, "counts": counts, "adversarial_lse": adversarial,
            "poisoning": "caching-allocator blocks filled with NaN bytes before each call"
            if device.type == "cuda" else "none effective (CPU allocator does not cache)"}
