"""Lab 4's memory accounting: the estimate agrees with the measurement, and the planner is sane."""

import json
import time
import warnings

import pytest
import torch

from labhelpers import memory, profiles
from labhelpers.labs import lab4
from labhelpers.paths import accelerate_config
from labhelpers.units import MiB

METHODS = ("full", "lora", "qlora", "full+gc", "lora+8bit", "qlora+gc+8bit")


@pytest.fixture(scope="module")
def grid(ci_profile):
    return lab4.breakdown_grid(ci_profile, methods=METHODS, batch_sizes=(2, 16), seq_lens=(32, 160))


def test_estimate_agrees_with_measurement_within_10_percent(grid):
    assert len(grid) == len(METHODS) * 4
    for part in ("weights", "gradients", "optimizer", "activations", "total"):
        measured, estimated = grid[f"measured {part} (MiB)"], grid[f"estimated {part} (MiB)"]
        error = ((estimated - measured).abs() / measured).max()
        assert error <= 0.10, (part, grid.loc[((estimated - measured).abs() / measured).idxmax()].to_dict())
    # the peak adds what is alive but not saved (logits and their gradient, the recomputed layer)
    assert grid["peak error (%)"].abs().max() <= 15


def test_gradient_checkpointing_cuts_activations_at_least_2x(ci_profile):
    sweep = lab4.checkpointing_sweep(ci_profile, seq_lens=(64, 160), batch_size=8, steps=2)
    acts = sweep.pivot(index="seq_len", columns="checkpointing", values="activations (MiB)")
    assert (acts[False] / acts[True] >= 2).all(), acts


def test_qlora_peak_below_lora_below_full(ci_profile):
    arch = memory.profile_architecture(ci_profile)
    batch = memory.make_batch(arch.vocab, ci_profile.batch_size, ci_profile.max_seq_length)
    peaks = {}
    for method in ("full", "lora", "qlora"):
        model, optimizer = lab4.setup_training(method, ci_profile)
        peaks[method] = memory.measure_training_step(model, batch, optimizer).peak
    assert peaks["qlora"] < peaks["lora"] < peaks["full"], peaks


def test_saved_activations_skip_parameters_and_count_storages_once():
    layer = torch.nn.Linear(64, 64)
    x = torch.randn(8, 64, requires_grad=True)
    with memory.saved_activations(layer) as saved:
        y = layer(x)
        z = (y * y).sum()  # y saved twice by mul: counted once
    assert saved.bytes == x.numel() * 4 + y.numel() * 4
    view = x[:4]
    assert memory.tensor_bytes([x, view, layer.weight]) == x.numel() * 4 + layer.weight.numel() * 4
    z.backward()


def test_accumulation_and_autocast_shrink_activations(ci_profile):
    table = lab4.accumulation_table(ci_profile, effective_batch=8, micro_batches=(8, 2), seq_len=64,
                                      precisions=(None, "bfloat16"))
    fp32 = table[table["precision"] == "float32"].set_index("micro-batch")
    bf16 = table[table["precision"] == "bfloat16"].set_index("micro-batch")
    assert fp32.loc[2, "activations (MiB)"] == pytest.approx(fp32.loc[8, "activations (MiB)"] / 4, rel=0.02)
    assert fp32.loc[2, "peak (MiB)"] < fp32.loc[8, "peak (MiB)"]
    assert bf16.loc[8, "activations (MiB)"] < fp32.loc[8, "activations (MiB)"]


def test_eight_bit_adam_states_are_about_a_quarter(ci_profile):
    table = lab4.optimizer_memory(ci_profile, optimizers=("adamw_torch", "adamw_bnb_8bit"), batch_size=2, seq_len=32)
    states = table.set_index("optimizer")["bytes per trainable parameter"]
    assert states["adamw_torch"] == pytest.approx(8, abs=0.01) and 2 <= states["adamw_bnb_8bit"] < 2.2


def test_shipped_architectures_have_their_published_sizes():
    published = {"llama-3.2-1b": 1.236, "llama-3.2-3b": 3.213, "llama-2-7b": 6.738, "llama-2-13b": 13.016,
                 "llama-3.1-70b": 70.554, "qwen2.5-coder-0.5b": 0.494, "qwen2.5-coder-1.5b": 1.544,
                 "codellama-7b": 6.739}
    assert set(memory.list_architectures()) == set(published)
    for name, billions in published.items():
        assert memory.architecture(name).billions == pytest.approx(billions, abs=0.002), name
    assert memory.architecture("7B") == memory.architecture("llama-2-7b")


def test_planner_orders_methods_and_sizes():
    plan = memory.plan_grid(sizes=("1B", "7B", "70B"), gpus=(16, 80))
    peak = plan.pivot(index="method", columns="size", values="peak (GB)")
    assert (peak["1B"] < peak["7B"]).all() and (peak["7B"] < peak["70B"]).all()
    assert (peak.loc["qlora+gc+8bit"] < peak.loc["qlora"]).all() and (peak.loc["qlora"] < peak.loc["full"]).all()
    seven = plan[plan["size"] == "7B"].set_index("method")
    assert seven.loc["qlora+gc+8bit", "fits 16 GB"] and not seven.loc["full", "fits 80 GB"]
    # 7B full fine-tuning in bf16 with AdamW: 2 + 2 + 8 bytes per parameter before activations
    assert seven.loc["full", "weights (GB)"] + seven.loc["full", "gradients (GB)"] + seven.loc["full", "optimizer (GB)"] \
        == pytest.approx(6.738 * 12, rel=0.01)


def test_zero_formulas():
    psi, n = 7.5e9, 64  # the ZeRO paper's example: 7.5B parameters on 64 GPUs, K = 12
    per_gpu = {stage: sum(memory.zero_per_gpu(psi, n, stage).values()) / 1e9 for stage in range(4)}
    assert per_gpu[0] == pytest.approx(120) and per_gpu[1] == pytest.approx(31.4, abs=0.1)
    assert per_gpu[2] == pytest.approx(16.6, abs=0.1) and per_gpu[3] == pytest.approx(1.9, abs=0.1)


@pytest.mark.parametrize("call, message", [
    (lambda: memory.plan("7B", -8), "gpu_memory_gb must be a positive number"),
    (lambda: memory.plan("7B", 0), "gpu_memory_gb must be a positive number"),
    (lambda: memory.plan("7B", 24, methods=["magic"]), "unknown method 'magic'"),
    (lambda: memory.plan("7B", 24, methods=["lora+fast"]), "unknown method"),
    (lambda: memory.plan("9B", 24), "unknown model '9B'.*size label"),
    (lambda: memory.plan("7B", 24, batch_size=0), "batch_size must be a positive number"),
    (lambda: memory.plan("7B", 24, seq_len=-1), "seq_len must be a positive number"),
    (lambda: memory.plan("7B", 24, headroom=1.5), "headroom"),
    (lambda: memory.estimate_training_step("7B", "lora", 1, 128, dtype="int3"), "unknown dtype"),
    (lambda: memory.estimate_training_step("7B", "lora", 1, 128, lora_r=0), "lora_r must be a positive"),
    (lambda: memory.zero_per_gpu(1e9, 8, 4), "ZeRO stage must be one of"),
    (lambda: memory.architecture(42), "expected a name"),
])
def test_planner_rejects_nonsense(call, message):
    with pytest.raises((ValueError, TypeError), match=message):
        call()


def test_check_fits_warns_only_when_it_does_not_fit():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        memory.check_fits("7B", "full", 1, 2048, "cpu", "bfloat16", available=24 * 2**30)
        memory.check_fits("1B", "qlora+gc+8bit", 1, 512, "cpu", "bfloat16", available=24 * 2**30)
    assert len(caught) == 1 and issubclass(caught[0].category, memory.DoesNotFitWarning)
    assert "will not fit" in str(caught[0].message) and "gradient checkpointing" in str(caught[0].message)


def test_training_warns_before_a_run_that_cannot_fit(ci_profile, monkeypatch):
    from labhelpers.models import load_model
    from labhelpers.tasks import task_rows
    from labhelpers.training import fine_tune

    model, tokenizer = load_model(ci_profile)
    monkeypatch.setattr(memory.planner, "available_bytes", lambda device: 1 * MiB)
    with pytest.warns(memory.DoesNotFitWarning, match="will not fit"):
        fine_tune(model, tokenizer, task_rows("code", "train", 8), ci_profile, steps=1)


def test_accelerate_configs_load():
    from accelerate.commands.config.config_args import load_config_from_file

    folder = accelerate_config("fsdp").parent
    kinds = {p.stem: load_config_from_file(str(p)) for p in folder.glob("*.yaml")}
    assert {"fsdp", "fsdp_qlora", "deepspeed_zero2", "deepspeed_zero3", "fsdp_cpu_2proc"} <= set(kinds)
    assert kinds["deepspeed_zero2"].deepspeed_config["zero_stage"] == 2
    assert kinds["deepspeed_zero3"].deepspeed_config["zero_stage"] == 3
    assert kinds["fsdp_qlora"].fsdp_config["fsdp_cpu_ram_efficient_loading"] is True
    assert str(kinds["fsdp"].distributed_type) == "DistributedType.FSDP"


def test_loss_gap_compares_every_sharded_run_step_by_step():
    """The ranks' byte counts against the formulas, and the real launches (FSDP, ZeRO-2, ZeRO-3 over gloo),
    are checked by Lab 4's run in ci (tests/test_notebooks.py: its shares, formula gap and loss gap)."""
    from labhelpers.labs.sharding_demo import loss_gap

    single = [{"losses": [2.0, 1.5]}]
    fsdp = [{"losses": [2.0, 1.5]}, {"losses": [2.2, 1.6]}]
    zero3 = [{"losses": [2.0, 1.5]}, {"losses": [2.2, 1.6 * (1 + 1e-6)]}]
    assert loss_gap(single, {"fsdp": fsdp, "zero3": zero3}) == pytest.approx(1e-6)
    assert loss_gap([{"losses": [2.02]}], {"fsdp": fsdp}) == pytest.approx(0.02 / 2.02)
    with pytest.raises(ValueError, match="ran other ranks or steps than fsdp"):
        loss_gap(single, {"fsdp": fsdp, "zero2": fsdp[:1]})
    with pytest.raises(ValueError, match="no sharded run"):
        loss_gap(single, {})


def test_deepspeed_config_comes_from_accelerates_launch_settings(monkeypatch):
    """What `accelerate launch` exports for deepspeed_zero3.yaml becomes the ZeRO stage, clipping and
    precision of the DeepSpeed config, with the batch sizes filled in (no "auto" left)."""
    from labhelpers.labs import sharding_demo

    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    monkeypatch.setenv("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "2")
    monkeypatch.setenv("ACCELERATE_GRADIENT_CLIPPING", "1.0")
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    config = sharding_demo.deepspeed_config(micro_batch=4, world_size=2)
    assert config["zero_optimization"]["stage"] == 3 and config["bf16"]["enabled"] is True
    assert config["train_micro_batch_size_per_gpu"] == 4 and config["train_batch_size"] == 4 * 2 * 2
    assert config["gradient_clipping"] == 1.0 and "auto" not in json.dumps(config)


def test_launch_takes_the_mixed_precision_of_the_profile_and_refuses_offload_without_deepspeed(tmp_path, monkeypatch):
    from labhelpers.labs import sharding_demo

    assert sharding_demo.mixed_precision(profiles.get("ci")) == "no"
    assert sharding_demo.mixed_precision(profiles.get("t4-rehearsal")) == "no"  # a GPU profile rehearsed on the CPU
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert sharding_demo.mixed_precision(profiles.get("t4")) == "fp16"  # a T4 has no bf16
    assert sharding_demo.mixed_precision(profiles.get("gpu-24gb")) == "bf16"
    with pytest.raises(ValueError, match="offload_optimizer is a DeepSpeed setting"):
        sharding_demo.launch(2, tmp_path / "out.json", offload_optimizer=True)


def test_formula_bytes_names_each_runs_stage():
    from labhelpers.labs.sharding_demo import formula_bytes

    run = {"params": 1000, "world_size": 2, "bytes_per_weight": 4}
    assert formula_bytes({**run, "sharding": "none", "zero_stage": 0}) == {"weights": 4000, "gradients": 4000,
                                                                          "optimizer": 8000}
    assert formula_bytes({**run, "sharding": "fsdp", "zero_stage": 3}) == {"weights": 2000, "gradients": 2000,
                                                                          "optimizer": 4000}
    assert formula_bytes({**run, "sharding": "deepspeed", "zero_stage": 2}) == {"weights": 4000, "gradients": 2000,
                                                                               "optimizer": 6000}
    assert formula_bytes({**run, "bytes_per_weight": 2, "sharding": "deepspeed", "zero_stage": 3}) == {
        "weights": 1000, "gradients": 1000, "optimizer": 6000}


def test_make_optimizer_builds_each_named_class_and_rejects_others():
    import bitsandbytes as bnb

    expected = {"adamw_torch": torch.optim.AdamW, "adamw_bnb_8bit": bnb.optim.AdamW8bit,
                "paged_adamw_8bit": bnb.optim.PagedAdamW8bit, "paged_adamw_32bit": bnb.optim.PagedAdamW32bit}
    assert set(lab4.OPTIMIZERS) == set(expected)
    for name, cls in expected.items():
        optimizer = lab4.make_optimizer(name, [torch.nn.Parameter(torch.zeros(64, 64))], lr=1e-3)
        assert type(optimizer) is cls and optimizer.param_groups[0]["lr"] == 1e-3
    with pytest.raises(ValueError, match="unknown optimizer 'sgd'; valid: adamw_torch"):
        lab4.make_optimizer("sgd", [torch.nn.Parameter(torch.zeros(2))])


def test_peak_memory_sees_a_large_allocation():
    with memory.measure_peak_memory("cpu") as small:
        torch.ones(1024)
    with memory.measure_peak_memory("cpu") as big:
        x = torch.ones(64, 2**20)  # 256 MiB
        x.add_(1)
        del x
    assert big.peak_mib > 200 and big.peak_mib > small.peak_mib + 150


class FakeCudaAllocator:
    """torch.cuda's allocator counters as torch keeps them: one running peak per device."""

    def __init__(self):
        self.allocated = self.peak = 0

    def alloc(self, n):
        self.allocated += n
        self.peak = max(self.peak, self.allocated)

    def install(self, monkeypatch):
        from labhelpers.memory import measure as measure_module

        cuda = measure_module.torch.cuda
        monkeypatch.setattr(cuda, "synchronize", lambda *a: None)
        monkeypatch.setattr(cuda, "memory_allocated", lambda *a: self.allocated)
        monkeypatch.setattr(cuda, "max_memory_allocated", lambda *a: self.peak)
        monkeypatch.setattr(cuda, "reset_peak_memory_stats", lambda *a: setattr(self, "peak", self.allocated))


def test_nested_cuda_peaks_survive_an_inner_reset(monkeypatch):
    """A measurement inside another (a training step inside a smoke run's block) resets torch's one
    peak counter; the outer block still reports its own peak."""
    fake = FakeCudaAllocator()
    fake.install(monkeypatch)
    fake.alloc(1000)  # held before the outer block: not counted
    with memory.measure_peak_memory("cuda") as outer:
        fake.alloc(5 * MiB)
        fake.alloc(-5 * MiB)
        with memory.measure_peak_memory("cuda") as inner:
            fake.alloc(2 * MiB)
            fake.alloc(-2 * MiB)
    assert outer.peak_mib == pytest.approx(5) and inner.peak_mib == pytest.approx(2)


def test_step_time_is_measured_without_the_tensor_tracker(ci_profile, monkeypatch):
    """The dispatch mode that follows every tensor on the CPU costs Python time per operation; the
    seconds reported come from a step that ran without it."""
    from labhelpers.memory import measure as measure_module

    real_mode = measure_module._live_tensor_mode()

    class SlowMode(real_mode):
        def __enter__(self):
            time.sleep(0.5)
            return super().__enter__()

    monkeypatch.setattr(measure_module, "_live_tensor_mode", lambda: SlowMode)
    model, optimizer = lab4.setup_training("lora", ci_profile)
    batch = memory.make_batch(model.config.vocab_size, 2, 32)
    assert memory.measure_training_step(model, batch, optimizer, steps=2).details["seconds"] < 0.5
    assert memory.measure_training_step(model, batch, optimizer, steps=1).details["seconds"] >= 0.5


def test_lab4_grids_are_derived_from_the_profile(ci_profile):
    """In ci (batch 8, length 160) the derived sizes; a smaller profile shrinks them."""
    sizes = lab4.grid_sizes(ci_profile)
    assert sizes["breakdown"] == {"batch_sizes": (2, 8), "seq_lens": (64, 160)}
    assert sizes["checkpointing"] == {"batch_size": 4, "seq_lens": (64, 128, 256, 512)}
    assert sizes["activations"] == {"batch_size": 4, "seq_len": 256}
    assert sizes["optimizers"] == {"batch_size": 4, "seq_len": 128}
    assert sizes["accumulation"] == {"effective_batch": 16, "seq_len": 128, "micro_batches": (16, 8, 4, 2)}
    small = lab4.grid_sizes(ci_profile.with_(batch_size=2, max_seq_length=80))
    assert small["breakdown"] == {"batch_sizes": (1, 2), "seq_lens": (32, 80)}
    assert small["accumulation"]["micro_batches"] == (4, 2, 1)


@pytest.mark.parametrize("gpu", ["t4", "gpu-24gb"])
def test_every_labs_largest_step_fits_the_profiles_gpu(gpu):
    """The planner table per lab and GPU profile, on the real architectures (not the stand-ins)."""
    from labhelpers import profiles

    profile = profiles.get(gpu)
    plan = lab4.lab_plan(profile)
    assert set(plan["lab"]) == {"lab1_peft", "lab2_domain", "lab2b_hyperparameters", "lab3_merging", "lab4_memory"}
    assert plan["fits"].all(), plan[~plan["fits"]].to_string()
    assert (plan["estimated peak (GB)"] <= lab4.HEADROOM * plan["GPU (GB)"]).all()
    assert profile.base_model.split("/")[-1].lower().startswith(plan["model"].iloc[0])
    large = plan[plan["step"] == "QLoRA on the large model"]  # Lab 1's 7B run, on a 4-bit base
    assert list(large["model"]) == ["codellama-7b"] and large["method"].iloc[0].startswith("qlora")
    # the lab's grids were fitted: the unfitted largest step would not fit
    assert not lab4.step_fits(profile, "full", profile.batch_size, profile.max_seq_length,
                              memory.hub_architecture(profile.base_model))


def test_fp16_full_fine_tuning_is_estimated_with_fp32_master_weights():
    fp16 = memory.estimate_training_step("qwen2.5-coder-0.5b", "full", 1, 128, dtype="float16")
    bf16 = memory.estimate_training_step("qwen2.5-coder-0.5b", "full", 1, 128, dtype="bfloat16")
    params = memory.architecture("qwen2.5-coder-0.5b").params
    assert fp16.weights == fp16.gradients == 4 * params and bf16.weights == 2 * params


def test_package_names_load_lazily_and_match_the_type_checking_imports():
    import ast
    import subprocess
    import sys

    tree = ast.parse(open(memory.__file__).read())
    guarded = next(node for node in tree.body
                   if isinstance(node, ast.If) and getattr(node.test, "id", "") == "TYPE_CHECKING")
    eager = {(imp.module.rsplit(".", 1)[1], alias.name) for imp in guarded.body for alias in imp.names}
    assert eager == {(module, name) for name, module in memory._SUBMODULE_OF.items()}
    assert all(getattr(memory, name) is not None for name in memory.__all__)
    # a worker that only measures (merges, FSDP) does not import transformers or peft
    probe = ("import sys; from labhelpers.memory import measure_peak_memory; "
             "print(sorted(m for m in ('transformers', 'peft', 'trl') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    with pytest.raises(AttributeError, match="no attribute 'nonsense'"):
        memory.nonsense


def test_gradient_tolerance_follows_the_trained_weights_dtype():
    assert lab4.gradient_tolerance(profiles.get("ci")) == 1e-3 and lab4.gradient_tolerance(profiles.get("gpu-24gb")) == 5e-2


def test_memory_split_puts_the_parts_measured_here_beside_the_real_models_estimate():
    profile = profiles.get("ci").with_(batch_size=2, max_seq_length=32)
    split = lab4.memory_split(profile, methods=("lora", "qlora"))
    assert split.index.get_level_values("source").unique().tolist() == ["measured here", "estimated, real model"]
    here, real = split.xs("measured here", level="source"), split.xs("estimated, real model", level="source")
    assert here["model"].iloc[0] == "tiny, 2 x 32, float32"
    assert real["model"].iloc[0].startswith("qwen2.5-coder-0.5b, 8 x 384, float16, checkpointing")
    for part in (here, real):
        assert part.loc["qlora", "weights (MiB)"] < part.loc["lora", "weights (MiB)"]
        assert (part["peak (MiB)"] >= part["weights (MiB)"] + part["activations (MiB)"]).all()
    # the real model's weights dwarf this one's: NF4 saves hundreds of MiB there (its fp32 embedding stays)
    assert real.loc["lora", "weights (MiB)"] - real.loc["qlora", "weights (MiB)"] > 200


@pytest.fixture(scope="module")
def mixed_precision_qwen(tmp_path_factory, ci_profile):
    """A small Qwen2 (the t4 profile's family: GQA, tied embeddings) trained as the t4 profile trains:
    fp16 weights, fp16 autocast, LoRA dropout, on this CPU."""
    from dataclasses import replace

    from labhelpers.course import rehearsal

    spec = replace(rehearsal.MODELS[profiles.get("t4").base_model], vocab_size=4096,
                   shape=dict(hidden_size=128, intermediate_size=384, num_hidden_layers=3,
                              num_attention_heads=4, num_key_value_heads=2))
    folder = tmp_path_factory.mktemp("qwen-fp16")
    tokenizer = rehearsal.build_tokenizer(spec)
    rehearsal.build_model(spec, tokenizer).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return profiles.get("t4").with_(base_model=str(folder), device="cpu", batch_size=4, max_seq_length=128, lora_dropout=0.05)


@pytest.mark.parametrize("method", ["lora", "qlora", "qlora+gc"])
def test_estimate_counts_the_copies_mixed_precision_makes(mixed_precision_qwen, method):
    """Under fp16 autocast with dropout, LoRA saves each target's input twice over (a dropout mask and the
    16-bit copy A multiplies), and QLoRA's residual stream and MLP are fp32: the estimate's activations
    match the bytes autograd saved (before these were modelled, QLoRA's estimate was 0.63 of them)."""
    profile = mixed_precision_qwen
    arch = memory.profile_architecture(profile)
    model, optimizer = lab4.setup_training(method, profile)
    measured = memory.measure_training_step(model, memory.make_batch(arch.vocab, 4, 128), optimizer,
                                            autocast_dtype=lab4.step_precision(profile))
    estimated = memory.estimate_for_profile(profile, method)
    assert estimated.activations == pytest.approx(measured.activations, rel=0.05), (estimated.mib(), measured.mib())
