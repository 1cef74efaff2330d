import pytest

from labhelpers.peft_methods import METHODS, peft_config


def test_registry_configs(ci_profile):
    assert peft_config("full", ci_profile) is None
    lora = peft_config("lora", ci_profile)
    assert lora.r == ci_profile.lora_r and set(lora.target_modules) == set(ci_profile.target_modules)
    assert peft_config("dora", ci_profile).use_dora
    assert peft_config("lora", ci_profile, r=4).r == 4
    assert set(METHODS) >= {"full", "lora", "dora", "ia3"}


def test_errors_name_the_problem(ci_profile):
    with pytest.raises(ValueError, match="unknown PEFT method 'lorax'; valid methods: full, lora"):
        peft_config("lorax", ci_profile)
    with pytest.raises(ValueError, match="positive"):
        peft_config("lora", ci_profile, r=0)
