"""The task modules' AdamW: torch's fused kernel where it applies (plain float tensors on one CPU or
CUDA device), the per-tensor loop elsewhere, and the same update either way."""

import torch
from torch import nn

from lightning_peft.tasks import _fusable


def test_fused_only_for_plain_float_tensors_on_one_device():
    assert _fusable([nn.Parameter(torch.zeros(3, 4)), nn.Parameter(torch.zeros(5, dtype=torch.bfloat16))])
    assert not _fusable([nn.Parameter(torch.zeros(3, dtype=torch.float32, device="meta"))])

    class Wrapped(torch.Tensor):  # a tensor subclass (as FSDP's DTensor) keeps the loop
        pass

    assert not _fusable([nn.Parameter(torch.zeros(2).as_subclass(Wrapped))])


def test_fused_adamw_matches_the_loop_on_lora_shaped_tensors():
    g = torch.Generator().manual_seed(0)
    shapes = [(16, 37), (37, 16), (16, 101), (101, 16), (7,)]
    start = [torch.randn(s, generator=g) for s in shapes]
    grads = [[torch.randn(s, generator=g) for s in shapes] for _ in range(4)]
    results = []
    for fused in (None, True):
        params = [nn.Parameter(t.clone()) for t in start]
        assert _fusable(params)
        opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1, fused=fused)
        for step in grads:
            for p, gr in zip(params, step):
                p.grad = gr.clone()
            opt.step()
        results.append([p.detach() for p in params])
    for loop, fused, before in zip(*results, start):
        assert not torch.equal(loop, before)  # the steps moved every tensor
        torch.testing.assert_close(fused, loop, rtol=1e-6, atol=1e-7)


def test_causal_lm_module_uses_the_fused_kernel_on_cpu():
    import lightning as L

    from lightning_peft import CausalLMModule, apply_lora
    from tests import _tiny

    module = CausalLMModule(model=apply_lora(_tiny.llama(0), r=2))
    module.trainer = L.Trainer(max_steps=5, logger=False, enable_checkpointing=False)
    optimizer = module.configure_optimizers()["optimizer"]
    assert optimizer.defaults["fused"] is True
    assert {id(p) for g in optimizer.param_groups for p in g["params"]} == \
        {id(p) for p in module.parameters() if p.requires_grad}


def test_result_helpers_work_where_the_os_lacks_them(monkeypatch, tmp_path):
    """The examples' result files: no load average on Windows (``None``, not an AttributeError),
    and a data path on another drive is written absolute (relpath raises ValueError there)."""
    import os

    from lightning_peft.tasks import idle_cpu_threads, load_average, shown_path

    assert isinstance(load_average(), float)
    monkeypatch.delattr(os, "getloadavg")
    assert load_average() is None and idle_cpu_threads() >= 1
    assert shown_path(tmp_path / "a.jsonl") == os.path.relpath(tmp_path / "a.jsonl")

    def other_drive(path, start=None):
        raise ValueError("path is on mount 'D:', start on mount 'C:'")

    monkeypatch.setattr(os.path, "relpath", other_drive)
    assert shown_path(tmp_path / "a.jsonl") == str(tmp_path / "a.jsonl")
