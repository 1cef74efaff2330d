import pytest

from labhelpers import peft_methods
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
    df = compare_methods(["full", "lora", "bottleneck"], profile, adapter_cls=BottleneckAdapter, bottleneck=8,
                         latency=True)
    assert list(df["method"]) == ["full", "lora", "bottleneck"]
    for column in ("trainable_params", "trainable_pct", "peak_mib", "sec_per_step", "final_train_loss",
                   "score_validation", "score_test", "score_heldout", "saved_mib", "forward_ms"):
        assert df[column].notna().all(), column
    full, lora, adapter = df.to_dict("records")
    assert full["trainable_pct"] == 100 and lora["trainable_pct"] < 5
    assert lora["saved_mib"] < full["saved_mib"] / 10 and adapter["saved_mib"] < full["saved_mib"] / 10


def test_compare_methods_trains_on_the_splits_it_is_given(monkeypatch, ci_profile):
    from labhelpers.labs import lab1
    from labhelpers.tasks import load_split

    class Stop(Exception):
        pass

    trained_on = []

    def record(dataset, **_):
        trained_on.append(len(dataset))
        raise Stop

    monkeypatch.setattr(lab1, "train_sft", record)
    for splits in (("train",), ("train", "train_composed", "train_composed")):
        with pytest.raises(Stop):
            lab1.compare_methods(["lora"], ci_profile, train_splits=splits)
    n_train, n_composed = len(load_split("code", "train")), len(load_split("code", "train_composed"))
    assert trained_on == [n_train, n_train + 2 * n_composed]


@pytest.mark.slow
def test_compare_methods_over_seeds_averages_each_method_and_shows_the_seed_spread(ci_profile):
    from labhelpers.labs.lab1 import compare_methods

    profile = ci_profile.with_(max_steps=3, n_eval=8, eval_batch_size=8)
    df = compare_methods(["lora"], profile, seeds=2)
    assert df["seeds"].tolist() == [2] and df["method"].tolist() == ["lora"]
    columns = list(df.columns)
    for split in ("validation", "test", "heldout"):
        assert columns.index(f"score_{split} seed sd") == columns.index(f"score_{split}") + 1
    with pytest.raises(ValueError, match="seeds must be a positive integer"):
        compare_methods(["lora"], profile, seeds=0)


def test_mean_over_seeds_averages_numbers_and_keeps_the_rest_from_the_first_seed():
    from labhelpers.evaluation import mean_over_seeds

    runs = [{"method": "lora", "trainable_params": 100, "score_test": 0.5, "sec_per_step": 1.0, "curve": "a"},
            {"method": "lora", "trainable_params": 100, "score_test": 0.7, "sec_per_step": 3.0, "curve": "b"},
            {"method": "lora", "trainable_params": 100, "score_test": 0.9, "sec_per_step": 2.0, "curve": "c"}]
    row = mean_over_seeds(runs)
    assert row["trainable_params"] == 100 and isinstance(row["trainable_params"], int)
    assert row["score_test"] == pytest.approx(0.7) and row["score_test seed sd"] == pytest.approx(0.2)
    assert row["sec_per_step"] == pytest.approx(2.0) and "sec_per_step seed sd" not in row
    assert row["curve"] == "a" and row["seeds"] == 3 and row["method"] == "lora"
    assert mean_over_seeds(runs[:1])["score_test seed sd"] == 0.0
    chosen = mean_over_seeds(runs, spread=lambda key: key == "sec_per_step")
    assert chosen["sec_per_step seed sd"] == pytest.approx(1.0) and "score_test seed sd" not in chosen


def test_the_ablation_trains_every_rank_and_target_set_on_the_same_examples_capped_by_the_profile(monkeypatch):
    import pandas as pd

    from labhelpers import profiles
    from labhelpers.labs import lab1

    seen = []

    def fake_compare(methods, profile, task="code", splits=()):
        seen.append(profile)
        return pd.DataFrame([{"trainable_pct": profile.lora_r / 10, "score_validation": 0.5, "score_test": 0.4}])

    monkeypatch.setattr(lab1, "compare_methods", fake_compare)
    ci = profiles.get("ci")
    table = lab1.rank_target_ablation(ci, ranks=(1, 8), examples=264)
    assert table[["targets", "rank"]].values.tolist() == [["attention", 1], ["attention", 8],
                                                          ["attention + MLP", 1], ["attention + MLP", 8]]
    assert {p.max_steps for p in seen} == {264 // ci.batch_size}
    assert [p.lora_alpha / p.lora_r for p in seen] == [ci.lora_alpha / ci.lora_r] * 4  # alpha / r held
    assert seen[0].target_modules == lab1.ATTENTION_PROJECTIONS and seen[2].target_modules == ci.target_modules
    assert (table["split"] == "validation").all()
    seen.clear()
    lab1.rank_target_ablation(ci.with_(max_steps=2), ranks=(1,))
    assert {p.max_steps for p in seen} == {2}  # never more than the profile's own budget (rehearsals run 2)


def test_the_decision_table_keeps_methods_as_good_as_the_best_and_picks_each_use_cases_best():
    import pandas as pd

    from labhelpers.labs import lab1

    comparison = pd.DataFrame([
        {"method": "full", "score_validation": 0.95, "score_test": 0.1, "sec_per_step": 0.05, "trainable_pct": 100.0,
         "saved_mib": 4.0, "forward_ms": 40.0},
        {"method": "lora", "score_validation": 0.92, "score_test": 0.2, "sec_per_step": 0.06, "trainable_pct": 4.0,
         "saved_mib": 0.2, "forward_ms": 50.0},
        {"method": "ia3", "score_validation": 0.40, "score_test": 0.99, "sec_per_step": 0.01, "trainable_pct": 0.3,
         "saved_mib": 0.01, "forward_ms": 41.0}])
    estimates = pd.DataFrame({"7B (GB)": [80.0, 20.0, 19.0]}, index=pd.Index(["full", "lora", "ia3"], name="method"))
    table = lab1.decision_table(comparison, n_validation=100, estimates=estimates).set_index("for")
    # ia3 is far below the best on validation (its test score, the best, is never read): never a candidate
    assert (table["candidates"] == "full, lora").all()
    assert table.loc["the best answers", "method"] == "full" and table.loc["the best answers", "next best"] == "lora"
    assert table.loc["training on the smallest GPU", "method"] == "lora"
    assert table.loc["the fastest training", "method"] == "full"
    assert table.loc["one small file per task", "method"] == "lora" and table.loc["one small file per task", "value"] == 0.2
    assert table.loc["serving without merging", "method"] == "full"
    without_estimates = lab1.decision_table(comparison, n_validation=100)
    assert "training on the smallest GPU" not in set(without_estimates["for"])


def test_training_memory_guidance_uses_lab4_estimator_and_picks_the_best_method_that_fits():
    import pandas as pd

    from labhelpers import memory
    from labhelpers.labs import lab1

    assert [lab1.memory_method(m, checkpointing=False) for m in ("full", "lora", "qlora", "dora", "ia3", "bottleneck")] == \
        ["full", "lora", "qlora", "lora", "lora", "lora"]
    assert lab1.memory_method("qlora") == "qlora+gc"  # planned as trained on a consumer GPU
    # test scores in the opposite order: the guidance must follow validation, never test
    comparison = pd.DataFrame([{"method": "full", "trainable_pct": 100.0, "score_validation": 0.9, "score_test": 0.1},
                               {"method": "lora", "trainable_pct": 0.5, "score_validation": 0.8, "score_test": 0.5},
                               {"method": "qlora", "trainable_pct": 0.5, "score_validation": 0.7, "score_test": 0.9}])
    estimates = lab1.memory_estimates(comparison, sizes=("7B",), seq_len=1024)
    plan = memory.plan("7B", 80, methods=("full+gc", "lora+gc", "qlora+gc"), seq_len=1024).set_index("method")
    plan.index = plan.index.str.removesuffix("+gc")
    assert estimates["7B (GB)"].to_dict() == pytest.approx(plan["peak (GB)"].round(1).to_dict())
    gpus = (4, 12, 20, 200)  # none fits; QLoRA only (7B at 1024 tokens, checkpointing); LoRA too; all
    table = lab1.gpu_guidance(comparison, sizes=("7B",), gpus_gb=gpus, seq_len=1024)
    row = table.iloc[0]
    fits = {gpu: plan["peak (GB)"] <= 0.9 * gpu for gpu in gpus}
    assert not fits[4].any() and row["4 GB"] == "none fits"
    assert fits[12]["qlora"] and not fits[12]["lora"] and row["12 GB"].startswith("qlora")
    assert fits[20]["lora"] and not fits[20]["full"] and row["20 GB"].startswith("lora")
    assert row["200 GB"].startswith("full")
    without_validation = comparison.drop(columns="score_validation")
    with pytest.raises(KeyError, match="score_validation"):
        lab1.gpu_guidance(without_validation, sizes=("7B",), gpus_gb=(200,))


def test_one_training_method_record_and_one_learning_rate_policy(ci_profile):
    from labhelpers import memory, peft_methods

    m = peft_methods.parse_method("QLoRA+gc+8bit")
    assert (m.base, m.gradient_checkpointing, m.adam_8bit, m.label) == ("qlora", True, True, "qlora+gc+8bit")
    assert m.optimizer == "adamw_bnb_8bit" and m.peft.quantization == "nf4"
    assert peft_methods.parse_method("dora").optimizer == "adamw_torch"
    with pytest.raises(ValueError, match="use one of full, lora, qlora, optionally"):
        memory.estimate_training_step("1B", "dora", 1, 16)  # the estimator models these three only
    lr = peft_methods.default_learning_rate
    assert lr(None, ci_profile) == ci_profile.full_ft_learning_rate
    assert lr(peft_config("lora", ci_profile), ci_profile) == ci_profile.learning_rate
    assert lr(peft_config("dora", ci_profile), ci_profile) == ci_profile.learning_rate
    assert lr(peft_config("ia3", ci_profile), ci_profile) == 10 * ci_profile.learning_rate
    for name in ("full", "lora", "ia3"):
        prepared_lr = peft_methods.get_method(name).lr(ci_profile)
        assert lr(peft_config(name, ci_profile), ci_profile) == prepared_lr  # prepare() and fine_tune agree


def test_the_qlora_setup_check_accepts_the_course_configs_and_names_each_wrong_field(ci_profile, tmp_path):
    import torch
    from peft import LoraConfig
    from transformers import BitsAndBytesConfig
    from trl import SFTConfig

    from labhelpers import models, training
    from labhelpers.labs import lab1

    ours = (models.quantization_config("nf4", getattr(torch, ci_profile.dtype)), peft_config("qlora", ci_profile),
            training.sft_config(ci_profile, "chat", str(tmp_path)))
    assert lab1.check_qlora_setup(*ours, ci_profile).passed
    # library defaults: FP4 without double quantization, rank 8 on q/v, TRL's own steps, length and precision
    defaults = lab1.check_qlora_setup(BitsAndBytesConfig(load_in_4bit=True), LoraConfig(target_modules=["q_proj", "v_proj"]),
                                      SFTConfig(output_dir=str(tmp_path), use_cpu=True), ci_profile)
    assert not defaults.passed and defaults.cases == 18
    for field in ("bnb_4bit_quant_type: expected 'nf4', got 'fp4'", "bnb_4bit_use_double_quant", "LoraConfig.r:",
                  "LoraConfig.target_modules", "SFTConfig.assistant_only_loss", "SFTConfig.max_length: expected 160",
                  "SFTConfig.activation_checkpointing: expected False, got True"):
        assert any(field in f for f in defaults.failures), (field, defaults.failures)
    assert lab1.check_qlora_setup(None, ours[1], ours[2], ci_profile).failures == ["expected BitsAndBytesConfig, got NoneType"]


def test_describe_methods_shows_the_config_each_method_trains_with():
    from labhelpers import profiles

    profile = profiles.get("ci").with_(max_steps=40)
    table = peft_methods.describe_methods(["full", "lora", "qlora", "dora", "adalora", "ia3", "bottleneck"], profile)
    assert table.loc["lora", "setup"].startswith(f"LoraConfig(r={profile.lora_r}, lora_alpha={profile.lora_alpha},")
    assert "use_dora=True" in table.loc["dora", "setup"] and "use_dora" not in table.loc["lora", "setup"]
    assert "total_step=40" in table.loc["adalora", "setup"] and f"target_r={profile.lora_r}" in table.loc["adalora", "setup"]
    assert "feedforward_modules=['down_proj']" in table.loc["ia3", "setup"]
    assert table.loc["qlora", "base weights"].startswith("NF4") and table.loc["full", "setup"].startswith("no peft config")
    assert table.loc["ia3", "learning rate"] == 10 * profile.learning_rate
    assert table.loc["full", "learning rate"] == profile.full_ft_learning_rate


def test_forward_ms_times_every_repeat_of_a_fast_pass_and_stops_a_slow_one_at_its_budget():
    import time

    import torch

    from labhelpers.labs.lab1 import forward_ms

    class Model:
        def __init__(self, seconds):
            self.seconds, self.calls = seconds, 0

        def __call__(self, input_ids):
            self.calls += 1
            time.sleep(self.seconds)

    fast, slow = Model(0.001), Model(0.05)
    ids = torch.zeros(1, 4, dtype=torch.long)
    assert 1 <= forward_ms(fast, ids) < 50 and fast.calls == 2 + 7
    assert forward_ms(slow, ids, budget_s=0.1) >= 50 and slow.calls == 2 + 3  # min_repeats, then over budget
