"""What the benchmark scripts share: result placement (forced runs beside, never over, the
machine's own files), one-round quartiles, exact token counts, the CPU recorded in every JSON,
argument errors before any work, and the GPU suite's summary of this run's results only."""

from __future__ import annotations

import json

import pytest

from benchmarks import cpu_info, gpu_summary, ia3_layer, lora_layer, quartiles, result_stem


def test_result_stem_keeps_forced_runs_apart(monkeypatch, unforced):
    assert result_stem("nf4", cpu_info()) == "nf4"
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx2")
    monkeypatch.setenv("LIGHTNING_PEFT_NF4_MARCH", "x86-64-v3")
    assert result_stem("nf4", cpu_info()) == "nf4_forced_avx2"  # the committed files' names


@pytest.mark.parametrize("flags, slug", [("fma avx2 avx512f avx512bw", "cpu-amd-epyc-avx512"),
                                         ("fma avx2", "cpu-amd-epyc-avx2"), ("sse2", "cpu-amd-epyc")])
def test_cpus_sold_under_one_name_get_a_folder_per_vector_width(monkeypatch, flags, slug):
    """A virtual machine names a Zen 2 and a Zen 5 alike ("AMD EPYC"): the folder says which
    vector instructions ran, and the JSON the family and model numbers."""
    import pathlib

    text = (f"processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 26\nmodel\t\t: 2\n"
            f"model name\t: AMD EPYC\nflags\t\t: {flags}\n\nprocessor\t: 1\nmodel\t\t: 9\n")
    read = pathlib.Path.read_text
    monkeypatch.setattr(pathlib.Path, "read_text",
                        lambda self, *a, **k: text if str(self) == "/proc/cpuinfo" else read(self, *a, **k))
    info = cpu_info()
    assert info["slug"] == slug and info["vendor"] == "AMD" and info["model"] == "AMD EPYC"
    assert (info["family"], info["model_number"]) == ("26", "2")
    assert info["avx512"] == ("avx512f" in flags) and info["avx2"] == ("avx2" in flags)


def test_one_round_has_its_value_as_every_quartile():
    assert quartiles([1.5]) == [1.5, 1.5, 1.5]
    assert quartiles([1.0, 2.0, 3.0, 4.0, 5.0]) == [1.5, 3.0, 4.5]


def test_layer_benchmarks_take_one_round_and_exact_token_counts(tmp_path, monkeypatch):
    """``--repeats 1`` crashed after the timing (no quartiles of one value); ``--tokens 300``
    timed 256 tokens; the IA3 JSON now records the CPU and threads as the others do."""
    seen, step = [], lora_layer._step

    def recording(module, x, grads):
        seen.append(x.shape)
        return step(module, x, grads)

    monkeypatch.setattr(lora_layer, "_step", recording)
    out = tmp_path / "layer.json"
    assert lora_layer.main(["--tokens", "300", "--features", "16", "--r", "2", "--repeats", "1",
                            "--threads", "1", "--json", str(out)]) == 0
    assert {s[0] * s[1] for s in seen} == {300}
    assert all(len(set(r["ratio_quartiles"])) == 1 for r in json.loads(out.read_text()))
    ia3 = tmp_path / "ia3.json"
    assert ia3_layer.main(["--tokens", "130", "--features", "16", "--repeats", "1", "--threads", "1",
                           "--json", str(ia3)]) == 0
    rows = json.loads(ia3.read_text())
    assert all(r["cpu"] and r["threads"] == 1 and "avx512" in r and "cpu_family" in r for r in rows)


@pytest.mark.parametrize(("module", "argv", "named"), [
    ("benchmarks.kernels", ["lora", "--shapes", "abc"], "--shapes"),
    ("benchmarks.kernels", ["lora", "--dropout", "2"], "--dropout"),
    ("benchmarks.kernels", ["lora", "--m", "0"], "--m"),
    ("benchmarks.kernels", ["nf4", "--repeats", "-1"], "--repeats"),
    ("benchmarks.kernels", ["nf4", "--repeats", "0"], "--repeats"),
    ("benchmarks.qlora_memory", ["--heads", "3", "--hidden", "64"], "--heads"),
    ("benchmarks.qlora_memory", ["--seq", "0"], "--seq"),
    ("benchmarks.intrinsic_dimension", ["--step-cost", "--rounds", "0"], "--rounds"),
    ("benchmarks.intrinsic_dimension", ["--step-cost", "--threads", "0"], "--threads"),
    ("benchmarks.intrinsic_dimension", ["--step-cost", "--batch-size", "-1"], "--batch-size"),
    ("benchmarks.step", ["--model", "/no/such/model"], "--model"),
    ("benchmarks.adapter_latency", ["--model", "/no/such/model"], "--model"),
    ("benchmarks.prefix_generation", ["--model", "/no/such/model"], "--model"),
])
def test_bad_arguments_are_usage_errors_before_any_work(module, argv, named, capsys):
    import importlib

    main = importlib.import_module(module).main
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    assert named in capsys.readouterr().err


def test_summary_reads_only_this_runs_results(tmp_path):
    """The NF4 benchmark's targets are rows as the LoRA one's (the summary crashed on its dict);
    a step that did not run in this run reads "not run", whatever an earlier run left in OUTDIR."""
    from benchmarks.kernels_nf4 import _targets

    nf4 = {"dequantize": [{"impl": "ours", "ratio_vs_bitsandbytes": 0.8, "pct_copy_bw": 90.0}],
           "matmul": [{"impl": "ours", "m": 1, "speedup_vs_bf16": 3.0}]}
    (tmp_path / "kernels").mkdir()
    (tmp_path / "kernels" / "nf4.json").write_text(json.dumps({"targets": _targets(nf4, cpu=False)}))
    (tmp_path / "kernels" / "lora.json").write_text(json.dumps({"targets": [
        {"target": "fused fwd", "ratio": 1.1, "met": True}]}))
    (tmp_path / "qlora_memory.jsonl").write_text(json.dumps({"step_peak_allocated_gib": 9.2}) + "\n")
    header = "step\tstatus\tlimit_s\tseconds\tcommand\n"
    (tmp_path / "steps.tsv").write_text(header + "kernels_nf4\tok\t60\t30\tx\n"
                                        "kernels_lora\tskipped (no CUDA device)\t80\t0\ty\n"
                                        "qlora_memory\ttimed out after 70 s\t70\t70\tz\n")
    summary = gpu_summary.write(tmp_path).read_text()
    assert "| kernels_nf4: dequantize >= 2x bitsandbytes | not met |" in summary
    assert "| kernels_nf4: M = 1 nf4_linear >= 2.5x the bf16 GEMV | met |" in summary
    assert "| kernels_lora: its targets | not run | skipped (no CUDA device) |" in summary
    assert "| qlora_memory: 7B step < 10 GiB | not run | timed out after 70 s |" in summary
