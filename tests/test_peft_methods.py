import pytest

from labhelpers.peft_methods import METHODS, peft_config


def test_registry_configs(ci_profile):
    assert peft_config("full", ci_profile) is None
    lora = peft_config("lora", ci_profile)
    assert lora.r == ci_profile.lora_r and set(lora.target_modules) == set(ci_profile.target_modules)
    assert peft_config("dora", ci_profile).use_dora
    assert peft_config("lora", ci_profile, r=4).r == 4
    assert set(METHODS) == {"full", "lora", "qlora", "dora", "adalora", "ia3", "bottleneck"}
    assert peft_config("adalora", ci_profile).total_step == ci_profile.max_steps
    assert peft_config("bottleneck", ci_profile) is None


def test_errors_name_the_problem(ci_profile):
    with pytest.raises(ValueError, match="unknown PEFT method 'lorax'; valid methods: full, lora"):
        peft_config("lorax", ci_profile)
    with pytest.raises(ValueError, match="positive"):
        peft_config("lora", ci_profile, r=0)


def test_target_module_not_in_model(base):
    from labhelpers.peft_methods import check_target_modules

    check_target_modules(base[0], ["q_proj", "down_proj"])
    with pytest.raises(ValueError, match=r"\['query'\] are not in the model; valid linear layers"):
        check_target_modules(base[0], ["q_proj", "query"])


@pytest.mark.slow
@pytest.mark.parametrize("method", ["full", "lora", "qlora", "dora", "adalora", "ia3", "bottleneck"])
def test_every_method_trains(method, ci_profile):
    import math

    from labhelpers.peft_methods import prepare
    from labhelpers.tasks import load_split
    from labhelpers.training import train_sft
    from reference_solutions import BottleneckAdapter

    profile = ci_profile.with_(max_steps=4)
    setup = prepare(method, profile, adapter_cls=BottleneckAdapter, bottleneck=8)
    result = train_sft(dataset=load_split("code", "train", 64), profile=profile, **setup)
    assert result.steps == 4 and all(math.isfinite(x) for x in result.loss_curve["loss"])
    if method == "full":
        assert result.trainable_params == result.total_params
    else:
        assert 0 < result.trainable_params < 0.2 * result.total_params


def test_bottleneck_needs_the_adapter_class(ci_profile):
    from labhelpers.peft_methods import prepare

    with pytest.raises(ValueError, match="adapter_cls"):
        prepare("bottleneck", ci_profile)


@pytest.mark.slow
def test_compare_methods_measures_every_column(ci_profile):
    from labhelpers.labs.lab1 import compare_methods
    from reference_solutions import BottleneckAdapter

    profile = ci_profile.with_(max_steps=3, n_eval=8, eval_batch_size=8)
    df = compare_methods(["full", "lora", "bottleneck"], profile, adapter_cls=BottleneckAdapter, bottleneck=8)
    assert list(df["method"]) == ["full", "lora", "bottleneck"]
    for column in ("trainable_params", "trainable_pct", "peak_mib", "sec_per_step", "final_train_loss",
                   "score_test", "score_heldout", "saved_mib"):
        assert df[column].notna().all(), column
    full, lora, adapter = df.to_dict("records")
    assert full["trainable_pct"] == 100 and lora["trainable_pct"] < 5
    assert lora["saved_mib"] < full["saved_mib"] / 10 and adapter["saved_mib"] < full["saved_mib"] / 10


def test_training_memory_guidance_uses_lab4_bytes_and_picks_the_best_method_that_fits():
    import pandas as pd

    from labhelpers import memory
    from labhelpers.labs import lab1

    n = 7e9
    full = lab1.estimate_training_gib(n, 1.0, None)
    assert full == pytest.approx(n * (2 + 16) / 2**30, rel=1e-6)  # bf16 weights + fp32 copy, gradient, 2 moments
    qlora = lab1.estimate_training_gib(n, 0.005, "nf4")
    assert qlora == pytest.approx((memory.nf4_bytes(int(n)) + 16 * n * 0.005) / 2**30, rel=1e-6)
    assert 0.51 < memory.nf4_bytes(int(n)) / n < 0.52  # 4 bits + one byte per 64 + one fp32 per 16384
    comparison = pd.DataFrame([{"method": "full", "trainable_pct": 100.0, "score_test": 0.9},
                               {"method": "lora", "trainable_pct": 0.5, "score_test": 0.8},
                               {"method": "qlora", "trainable_pct": 0.5, "score_test": 0.7}])
    table = lab1.gpu_guidance(comparison, model_sizes_b=(7.0,), gpus_gib=(8, 16, 24, 200))
    row = table.iloc[0]
    assert row["8GB"].startswith("qlora") and row["16GB"].startswith("qlora")  # LoRA needs 13.6 GiB > 0.7 x 16
    assert row["24GB"].startswith("lora") and row["200GB"].startswith("full")
