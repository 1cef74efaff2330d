"""NF4, double quantization and storage formats: the lab's reference against bitsandbytes itself."""

import bitsandbytes.functional as F
import pytest
import torch

import reference_solutions as ref
from labhelpers import quantization as Q


def test_code_books_are_bitsandbytes_own():
    assert torch.equal(Q.NF4_CODE, F.get_4bit_type("nf4", device="cpu"))
    assert torch.equal(Q.dynamic_map(), F.create_dynamic_map())


@pytest.mark.parametrize("fn", [Q.quantize_nf4, ref.quantize_nf4], ids=["library", "reference"])
def test_nf4_quantization_is_bit_exact(fn):
    report = Q.check_quantize_nf4(fn)
    assert report.passed and report.cases >= 6, str(report)


def test_nf4_check_catches_swapped_nibbles():
    report = Q.check_quantize_nf4(ref.quantize_nf4_nearest_by_argmin_low_nibble_first)
    assert not report.passed and "packed bytes differ" in str(report)


def test_nf4_dequantization_matches_and_catches_a_wrong_scale():
    assert Q.check_dequantize_nf4(lambda p, a, s, b: Q.dequantize_nf4(p, a, s, b)).passed
    assert Q.check_dequantize_nf4(ref.dequantize_nf4).passed
    assert not Q.check_dequantize_nf4(ref.dequantize_nf4_one_scale).passed


def test_double_quantization_matches_bitsandbytes():
    assert Q.check_double_quantize(Q.double_quantize).passed
    assert Q.check_double_quantize(ref.double_quantize).passed
    bad = Q.check_double_quantize(ref.double_quantize_without_offset)
    assert not bad.passed and "offset" in str(bad)


def test_double_quantization_round_trip_is_close():
    absmax = Q.blockwise_absmax(torch.randn(64 * 1000), 64)
    dq = Q.double_quantize(absmax)
    assert (Q.double_dequantize(dq) - absmax).abs().max() < 0.02 * absmax.max()
    assert dq.codes.dtype == torch.uint8 and dq.absmax2.numel() == 4


def test_storage_formats_measured_bits_and_errors():
    report = Q.storage_report(torch.randn(4096, 4096, generator=torch.Generator().manual_seed(0)) * 0.02)
    assert report.loc["fp32", "bits per parameter"] == 32 and report.loc["bf16", "bits per parameter"] == 16
    assert report.loc["NF4", "bits per parameter"] == pytest.approx(4.5, abs=1e-3)
    # the bound: NF4 with double quantization at most 0.53 bytes per parameter
    assert report.loc["NF4 + double quant", "bytes per parameter"] <= 0.53
    errors = report["relative RMS error"]
    assert errors["fp32"] == 0 and errors["bf16"] < errors["int8 (row-wise)"] < errors["NF4"] < 0.12
    assert errors["NF4 + double quant"] == pytest.approx(errors["NF4"], rel=0.01)


@pytest.mark.parametrize("call, message", [
    (lambda: Q.quantize_nf4(torch.arange(10)), "float32, float16 or bfloat16"),
    (lambda: Q.quantize_nf4(torch.zeros(0)), "empty"),
    (lambda: Q.quantize_nf4(torch.zeros(8), blocksize=48), "blocksize must be one of"),
    (lambda: Q.dequantize_nf4(torch.zeros(3, dtype=torch.uint8), torch.ones(1), (10,)), "do not fit shape"),
    (lambda: Q.dequantize_nf4(torch.zeros(5), torch.ones(1), (10,)), "must be uint8"),
    (lambda: Q.storage_report(torch.zeros(4, 4, 4)), "2-D weight"),
])
def test_bad_input_is_named(call, message):
    with pytest.raises((ValueError, TypeError), match=message):
        call()
