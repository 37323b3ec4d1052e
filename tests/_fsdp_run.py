"""Run by test_fsdp: 2 CPU processes (gloo) train a tiny Llama with LoRA / QLoRA under FSDP2
(``fully_shard``) and FSDP1 (``FullyShardedDataParallel``), each rank checking itself against a
single-process run over the same global batch that it computes locally. Every scenario's outcome
("ok" or the traceback) goes into ``<out>/results.json`` (rank 0), so one start of two processes
serves every test.

usage: python tests/_fsdp_run.py OUT PORT [SCENARIO ...]
"""

import copy
import json
import os
import sys
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP1

sys.path.insert(0, str(Path(__file__).parents[1]))

WORLD, STEPS, LR, SEQ, GLOBAL_BATCH = 2, 3, 0.5, 10, 4
RTOL, ATOL = 1e-4, 1e-5  # fp32; the ranks' gradients are averaged in another order than one sum


def batches(step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(100 + step)
    return torch.randint(0, 96, (GLOBAL_BATCH, SEQ), generator=g)


def local(ids: torch.Tensor) -> torch.Tensor:
    return ids[dist.get_rank()::WORLD]


def build(kind: str, seed: int = 1234):
    from lightning_peft import apply_lora
    from lightning_peft.methods.qlora import apply_qlora
    from tests import _tiny

    model = _tiny.llama(0).train()
    torch.manual_seed(seed)
    if kind == "lora":
        apply_lora(model, r=4, target_modules="all-linear")
    else:
        apply_qlora(model, r=4, target_modules="all-linear", compute_dtype="float32")
    return model


def train(model, steps, start=0):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=LR)
    losses = []
    for step in range(start, start + steps):
        ids = batches(step)
        ids = local(ids) if _sharded(model) else ids
        loss = model(ids, labels=ids).loss
        loss.backward()
        frozen_grads = [n for n, p in model.named_parameters() if not p.requires_grad and p.grad is not None]
        assert not frozen_grads, f"frozen parameters got gradients: {frozen_grads[:3]}"
        if not isinstance(model, FSDP1):  # FSDP1: a parameter with no local elements has no grad
            assert all(p.grad is not None for p in params), "an adapter parameter got no gradient"
        opt.step()
        opt.zero_grad()
        if _sharded(model):
            loss = loss.detach().clone()
            dist.all_reduce(loss)
            loss /= WORLD
        losses.append(loss.item())
    return losses


def _sharded(model):
    from lightning_peft.fsdp import is_sharded

    return is_sharded(model)


def adapters(model):
    """Full adapter tensors by clean name (a collective under FSDP)."""
    from lightning_peft._base import adapter_named_parameters
    from lightning_peft.fsdp import clean_name, full_adapter_tensors

    with full_adapter_tensors(model) as full:
        return {clean_name(n): full(p).detach().clone() for n, p in adapter_named_parameters(model)}


def base_state(model):
    """Every non-adapter tensor, full (FSDP2: gathered), by name."""
    from lightning_peft._base import adapter_named_parameters

    ids = {id(p) for _, p in adapter_named_parameters(model)}
    out = {}
    for n, p in model.named_parameters():
        if id(p) not in ids:
            out[n] = (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
    return out


def close(a, b, what):
    assert a.keys() == b.keys() and a, f"{what}: keys differ: {sorted(a.keys() ^ b.keys())[:4]}"
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=RTOL, atol=ATOL, msg=lambda m, k=k: f"{what} {k}: {m}")


def saved(directory):
    from safetensors.torch import load_file

    return load_file(Path(directory) / "adapter_model.safetensors")


def fsdp2(kind, out):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        set_model_state_dict,
    )

    from lightning_peft import save_adapter
    from lightning_peft._base import adapter_named_parameters
    from lightning_peft.fsdp import fully_shard_peft

    ref = build(kind)
    model = copy.deepcopy(ref)
    fully_shard_peft(model)
    base0 = base_state(model)
    assert any(hasattr(p, "full_tensor") for _, p in adapter_named_parameters(model)), "adapters not sharded"
    ref_losses, losses = train(ref, STEPS), train(model, STEPS)
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=RTOL, atol=ATOL)
    trained = adapters(model)
    close(trained, adapters(ref), "adapters after training")
    assert any(v.count_nonzero() > 0 for k, v in trained.items() if "lora_B" in k), "lora_B still zero"
    after = base_state(model)
    assert all(torch.equal(after[k], base0[k]) for k in base0), "a frozen base tensor changed"

    # save_adapter on every rank: rank 0 writes the full adapter, equal to the single process's
    root = Path(out) / kind
    save_adapter(model, root / "sharded")
    if dist.get_rank() == 0:
        save_adapter(ref, root / "single")
    dist.barrier()
    written, expected = saved(root / "sharded"), saved(root / "single")
    close(written, expected, "saved adapter")
    assert all(v.numel() > 0 for v in written.values())

    # adapter-only state dicts, sharded (DCP) and full, round-trip; training resumes from them
    names = {n for n, _ in adapter_named_parameters(model)}
    sharded = {k: v for k, v in get_model_state_dict(model).items() if k in names}
    assert sharded and all(hasattr(v, "to_local") for v in sharded.values())
    dcp.save(sharded, checkpoint_id=str(root / "dcp"))
    full = {k: v for k, v in get_model_state_dict(
        model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)).items() if k in names}
    if dist.get_rank() == 0:
        close(full, trained, "full state dict")
    for source in ("dcp", "full"):
        fresh = build(kind, seed=99)  # other adapter values: the load must overwrite them
        fully_shard_peft(fresh)
        if source == "dcp":
            target = {k: v for k, v in get_model_state_dict(fresh).items() if k in names}
            dcp.load(target, checkpoint_id=str(root / "dcp"))
            set_model_state_dict(fresh, target, options=StateDictOptions(strict=False))
        else:
            state = full if dist.get_rank() == 0 else {}
            set_model_state_dict(fresh, state, options=StateDictOptions(
                full_state_dict=True, broadcast_from_rank0=True, strict=False))
        close(adapters(fresh), trained, f"adapters loaded from the {source} state dict")
        close({"loss": torch.tensor(train(fresh, 2, start=STEPS))},
              {"loss": torch.tensor(train(copy.deepcopy(ref), 2, start=STEPS))}, f"resumed ({source})")


def nf4_shards(out):
    """QLoRA's 4-bit base splits in half across the 2 ranks and gathers back bit for bit."""
    from lightning_peft.fsdp import ShardableNF4Linear, fully_shard_peft
    from lightning_peft.methods.qlora import NF4Linear

    ref = build("qlora")
    model = copy.deepcopy(ref)
    fully_shard_peft(model)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, ShardableNF4Linear)}
    originals = {n: m for n, m in ref.named_modules() if isinstance(m, NF4Linear)}
    assert layers and layers.keys() == originals.keys()
    held = total = 0
    for name, layer in layers.items():
        q = originals[name].weight
        for pname, full_bytes in (("weight_packed", q.packed.numel()), ("weight_absmax", q.absmax.nbytes)):
            shard = getattr(layer, pname).to_local()
            expect = -(-full_bytes // WORLD)  # torch.chunk: rank 0 takes the ceiling
            mine = expect if dist.get_rank() == 0 else full_bytes - expect
            assert shard.numel() * shard.element_size() == mine, (name, pname, shard.numel(), mine)
        held += layer.storage_nbytes()
        total += q.packed.numel() + q.absmax.nbytes
        gathered = ShardableNF4Linear.from_nf4_linear(originals[name])  # unsharded, for its metadata
        gathered._parameters["weight_packed"] = torch.nn.Parameter(layer.weight_packed.full_tensor(),
                                                                   requires_grad=False)
        gathered._parameters["weight_absmax"] = torch.nn.Parameter(layer.weight_absmax.full_tensor(),
                                                                   requires_grad=False)
        assert torch.equal(gathered.weight.dequantize(torch.float32), q.dequantize(torch.float32)), name
    sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(WORLD)]
    dist.all_gather(sizes, torch.tensor([held]))
    assert sum(int(s) for s in sizes) == total and abs(held - total / WORLD) <= len(layers) * 2, (held, total)
    if dist.get_rank() == 0:
        (Path(out) / "nf4_bytes.json").write_text(json.dumps({"held_per_rank": [int(s) for s in sizes],
                                                              "total": total}))


def fsdp1(kind, out):
    """FSDP1 (``FullyShardedDataParallel``, use_orig_params=True as Lightning sets it) on CPU."""
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    from lightning_peft import save_adapter
    from lightning_peft.fsdp import prepare_nf4_for_fsdp

    ref = build(kind)
    model = copy.deepcopy(ref)
    prepare_nf4_for_fsdp(model, storage_dtype=torch.float32)  # FSDP1: one dtype per unit
    model = FSDP1(model, auto_wrap_policy=ModuleWrapPolicy({LlamaDecoderLayer}), use_orig_params=True,
                 device_id=torch.device("cpu"))
    ref_losses, losses = train(ref, STEPS), train(model, STEPS)
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=RTOL, atol=ATOL)
    root = Path(out) / f"fsdp1_{kind}"
    save_adapter(model, root / "sharded")
    if dist.get_rank() == 0:
        save_adapter(ref, root / "single")
    dist.barrier()
    written = saved(root / "sharded")
    assert not any("_fsdp_wrapped_module" in k for k in written)
    close(written, saved(root / "single"), "FSDP1 saved adapter")


def late_injection(out):
    """Sharding before injecting is refused: FSDP2 would never reduce the adapters' gradients."""
    from torch.distributed.fsdp import fully_shard

    from lightning_peft import apply_lora
    from lightning_peft.callbacks import _check_injected_before_sharding
    from tests import _tiny

    model = _tiny.llama(0)
    fully_shard(model)
    apply_lora(model, r=2)
    try:
        _check_injected_before_sharding(model)
    except RuntimeError as err:
        assert "inject_adapters" in str(err) and "lora_A" in str(err)
    else:
        raise AssertionError("adapters injected after fully_shard were not refused")
    ok = build("lora")
    from lightning_peft.fsdp import fully_shard_peft

    assert _check_injected_before_sharding(fully_shard_peft(ok)) is ok


SCENARIOS = {"fsdp2_lora": lambda out: fsdp2("lora", out), "fsdp2_qlora": lambda out: fsdp2("qlora", out),
             "nf4_shards": nf4_shards, "fsdp1_lora": lambda out: fsdp1("lora", out),
             "fsdp1_qlora": lambda out: fsdp1("qlora", out), "late_injection": late_injection}


def worker(rank, out, port, names):
    import warnings

    warnings.filterwarnings("ignore", message=".*requires_grad.*")  # FSDP1: frozen and trained in one unit
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    results = {}
    for name in names:
        try:
            SCENARIOS[name](out)
            status = "ok"
        except Exception:  # noqa: BLE001 - recorded, reported by the test
            status = traceback.format_exc()
        # a scenario fails if it failed on any rank
        flags = [None] * WORLD
        dist.all_gather_object(flags, status)
        results[name] = next((s for s in flags if s != "ok"), "ok")
    if rank == 0:
        (Path(out) / "results.json").write_text(json.dumps(results, indent=1))
    dist.destroy_process_group()
    # Leave without interpreter finalization: there, gloo's threads may still release tensors that
    # need the GIL, and about one run in eight aborted after every scenario had passed ("terminate
    # called without an active exception"; see pytorch/pytorch#179291). All results are written.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    out, port = sys.argv[1], int(sys.argv[2])
    names = sys.argv[3:] or list(SCENARIOS)
    torch.multiprocessing.spawn(worker, args=(out, port, names), nprocs=WORLD)
