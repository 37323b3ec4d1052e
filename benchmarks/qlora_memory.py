"""Peak memory of one QLoRA training step on a Llama-7B-shaped model built straight into NF4.

    python -m benchmarks.qlora_memory                          # CUDA: the 7B shape, seq 2048
    python -m benchmarks.qlora_memory --layers 2 --seq 256     # CPU: a reduced depth, peak RSS

The model (``LlamaConfig``: hidden 4096, 32 layers, 32 heads, intermediate 11008, vocab 32000 by
default) is built on the meta device, so nothing is allocated; :func:`lightning_peft.apply_qlora`
turns its linears into NF4 placeholders (still on meta) with LoRA beside them; ``to_empty``
materialises the embeddings, norms, head and adapters (bf16 on CUDA, fp32 on CPU, ``--dtype``)
and the 4-bit placeholders; then each ``NF4Linear`` is filled from a random weight drawn on the
device and quantized, one at a time, so the only full-precision weight ever alive is one layer's.
No hub, no download.

One training step follows: batch 1, gradient checkpointing (non-reentrant) on every decoder
layer, ``labels = input_ids``, forward + backward + optimizer step on the adapters (AdamW, or
bitsandbytes' paged/8-bit AdamW with ``--optimizer``). Reported: on CUDA the peak allocated (and
reserved) GPU memory during the step, which includes the model (target: under 10 GiB for the 7B
shape at sequence 2048); on CPU the peak resident set size (``VmHWM``, reset before the step
where Linux allows it) and the resident size before the step. ``--json`` appends the result to a
file.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import resource
import time
from pathlib import Path

import torch
from torch import nn

from lightning_peft import LoRALinear, NF4Linear, apply_qlora, trainable_parameters
from lightning_peft.tasks import positive_float, positive_int

GiB = 1024**3


def _rss() -> tuple[int, int]:
    """(current, peak) resident set size of this process in bytes (Linux ``/proc``)."""
    fields = {}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                fields[key] = int(value.split()[0]) * 1024
    except OSError:
        pass
    peak = fields.get("VmHWM", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return fields.get("VmRSS", 0), peak


def _reset_peak_rss() -> bool:
    """Return freed heap to the OS (glibc ``malloc_trim``), then reset the kernel's peak RSS
    (``VmHWM``) of this process; False where the reset is not allowed."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def build(args: argparse.Namespace, device: torch.device) -> nn.Module:
    """The QLoRA model, built layer by layer into NF4 on ``device`` (see the module docstring)."""
    import transformers

    cfg = transformers.LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads,
        num_key_value_heads=args.heads, max_position_embeddings=max(args.seq, 2048),
        tie_word_embeddings=False)
    dtype = getattr(torch, args.dtype)
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(cfg).to(dtype)
    apply_qlora(model, r=args.r, alpha=args.alpha, target_modules="all-linear",
                compute_dtype=dtype, blocksize=64, double_quant=True)
    model.to_empty(device=device)
    g = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, NF4Linear):  # one dense weight at a time, then only its NF4
                w = torch.empty(module.out_features, module.in_features, dtype=dtype, device=device)
                module.quantize_(w.normal_(0.0, 0.02, generator=g))
                del w
            elif isinstance(module, LoRALinear):
                module.reset_parameters()
            elif isinstance(module, nn.Embedding) or name == "lm_head":
                module.weight.normal_(0.0, 0.02, generator=g)
            elif hasattr(module, "variance_epsilon"):  # RMSNorm
                module.weight.fill_(1.0)
        rotary = model.model.rotary_emb  # buffers computed at init, which meta skipped
        model.model.rotary_emb = type(rotary)(config=cfg).to(device)
    return model


def _optimizer(name: str, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    if name == "adamw":
        return torch.optim.AdamW(params, lr=1e-4)
    import bitsandbytes as bnb

    return {"paged_adamw": bnb.optim.PagedAdamW, "paged_adamw8bit": bnb.optim.PagedAdamW8bit,
            "adamw8bit": bnb.optim.AdamW8bit}[name](params, lr=1e-4)


def run(args: argparse.Namespace) -> dict:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = device.type == "cuda"
    args.dtype = args.dtype or ("bfloat16" if cuda else "float32")
    torch.manual_seed(0)
    start = time.perf_counter()
    model = build(args, device)
    build_s = time.perf_counter() - start
    nf4 = [m for m in model.modules() if isinstance(m, NF4Linear)]
    nf4_bytes = sum(m.weight.nbytes for m in nf4)
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    counts = trainable_parameters(model)
    model.train()
    model.config.use_cache = False
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x
        model.activation_checkpointing_enable({"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    optimizer = _optimizer(args.optimizer, [p for p in model.parameters() if p.requires_grad])
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), device=device)

    if cuda:
        torch.cuda.synchronize(device)
        build_peak = torch.cuda.max_memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    build_peak_rss = _rss()[1]
    reset = _reset_peak_rss()
    rss_before = _rss()[0]
    start = time.perf_counter()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if cuda:
        torch.cuda.synchronize(device)
    step_s = time.perf_counter() - start
    result = {
        "device": torch.cuda.get_device_name(device) if cuda else "cpu",
        "shape": {k: getattr(args, k) for k in ("hidden", "layers", "heads", "intermediate", "vocab")},
        "seq": args.seq, "batch": args.batch, "r": args.r, "dtype": args.dtype,
        "optimizer": args.optimizer,
        "gradient_checkpointing": True, "loss": round(loss.item(), 4),
        "nf4_linear_layers": len(nf4), "nf4_gib": nf4_bytes / GiB,
        "bits_per_nf4_weight": 8.0 * nf4_bytes / sum(m.weight.numel() for m in nf4),
        "dense_param_gib": param_bytes / GiB, "trainable_params": counts.trainable,
        "total_params": counts.total, "build_s": round(build_s, 2), "step_s": round(step_s, 2),
    }
    if cuda:
        result.update(build_peak_gib=build_peak / GiB,
                      step_peak_allocated_gib=torch.cuda.max_memory_allocated(device) / GiB,
                      step_peak_reserved_gib=torch.cuda.max_memory_reserved(device) / GiB)
        result["under_10_gib"] = result["step_peak_allocated_gib"] < 10.0
    else:
        result.update(rss_before_step_gib=rss_before / GiB, peak_rss_gib=_rss()[1] / GiB,
                      peak_rss_reset_before_step=reset, peak_rss_before_step_gib=build_peak_rss / GiB)
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=positive_int, default=4096)
    parser.add_argument("--layers", type=positive_int, default=32)
    parser.add_argument("--heads", type=positive_int, default=32)
    parser.add_argument("--intermediate", type=positive_int, default=11008)
    parser.add_argument("--vocab", type=positive_int, default=32000)
    parser.add_argument("--seq", type=positive_int, default=2048)
    parser.add_argument("--batch", type=positive_int, default=1)
    parser.add_argument("--r", type=positive_int, default=64, help="LoRA rank (all linear layers)")
    parser.add_argument("--alpha", type=positive_float, default=16.0)
    parser.add_argument("--optimizer", default="adamw",
                        choices=["adamw", "paged_adamw", "paged_adamw8bit", "adamw8bit"])
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"],
                        help="compute dtype and dtype of the dense weights and adapters; default "
                             "bfloat16 on CUDA, float32 on CPU (CPUs without AVX512-BF16 run bf16 "
                             "matmuls very slowly)")
    parser.add_argument("--json", default=None, help="append the result as one JSON line here")
    args = parser.parse_args(argv)
    if args.hidden % args.heads or (args.hidden // args.heads) % 2:  # (rotary needs an even head dim)
        parser.error(f"--heads {args.heads} must divide --hidden {args.hidden} into even head sizes")
    if args.device is not None:
        try:
            torch.device(args.device)
        except RuntimeError as err:
            parser.error(f"--device: {err}")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    result = run(args)
    line = json.dumps(result)
    print(line)
    if args.json:
        with open(args.json, "a") as f:
            f.write(line + "\n")
    return result


if __name__ == "__main__":
    main()
