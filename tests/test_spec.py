import json

import pytest

from zsq_plugins import QuantSpec, ZSQError
from zsq_plugins.spec import Granularity, Symmetry


def test_defaults_are_the_standard_setting():
    spec = QuantSpec()
    assert (spec.weight_bits, spec.act_bits) == (8, 8)
    assert spec.weight_granularity is Granularity.PER_CHANNEL
    assert spec.act_granularity is Granularity.PER_TENSOR
    assert spec.weight_symmetry is Symmetry.SYMMETRIC
    assert spec.act_symmetry is Symmetry.ASYMMETRIC
    assert spec.keep_first_last_8bit and spec.fold_batchnorm
    assert not spec.weight_narrow_range


def test_narrow_range_is_a_flag_and_sets_the_reference_grid():
    from zsq_plugins.quant.fakequant import integer_range

    with pytest.raises(ValueError, match="weight_narrow_range"):
        QuantSpec(weight_narrow_range="yes")
    assert integer_range(2, signed=True) == (-2, 1)
    assert integer_range(2, signed=True, narrow=True) == (-1, 1)  # ternary
    assert integer_range(4, signed=False, narrow=True) == (0, 15)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_valid_bits(bits):
    assert QuantSpec(weight_bits=bits, act_bits=bits).label == f"W{bits}A{bits}"


@pytest.mark.parametrize("field", ["weight_bits", "act_bits"])
@pytest.mark.parametrize("value", [1, 9, 0, -4, 4.0, "4", True])
def test_invalid_bits_raise_value_error_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        QuantSpec(**{field: value})


def test_enum_fields_accept_strings_and_reject_unknown():
    spec = QuantSpec(weight_granularity="per_tensor", act_symmetry="symmetric")
    assert spec.weight_granularity is Granularity.PER_TENSOR
    assert spec.act_symmetry is Symmetry.SYMMETRIC
    with pytest.raises(ValueError, match="per_channel"):
        QuantSpec(weight_granularity="per_group")


def test_keep_8bit_must_be_names():
    assert QuantSpec(keep_8bit=["stem.0"]).keep_8bit == ("stem.0",)
    with pytest.raises(ValueError, match="keep_8bit"):
        QuantSpec(keep_8bit="stem.0")


def test_frozen_and_keyword_only():
    spec = QuantSpec()
    with pytest.raises(AttributeError):
        spec.weight_bits = 4  # type: ignore[misc]
    with pytest.raises(TypeError):
        QuantSpec(4, 4)  # type: ignore[misc]


def test_json_round_trip():
    spec = QuantSpec(
        weight_bits=3,
        act_bits=4,
        weight_symmetry="asymmetric",
        keep_8bit=("blocks.0",),
        keep_first_last_8bit=False,
        weight_narrow_range=True,
    )
    text = spec.to_json()
    assert json.loads(text)["weight_symmetry"] == "asymmetric"
    assert QuantSpec.from_json(text) == spec


def test_from_dict_rejects_unknown_fields_and_bad_json():
    with pytest.raises(ValueError, match="wbits"):
        QuantSpec.from_dict({"wbits": 4})
    with pytest.raises(ZSQError, match="not valid JSON"):
        QuantSpec.from_json("{weight_bits: 4")
    with pytest.raises(ZSQError, match="object"):
        QuantSpec.from_json("[4, 4]")


def test_parse_labels():
    assert QuantSpec.parse("w4a8") == QuantSpec(weight_bits=4, act_bits=8)
    assert QuantSpec.parse("W2A4", fold_batchnorm=False).fold_batchnorm is False
    for bad in ("4/4", "W4", "WxA4"):
        with pytest.raises(ValueError, match="W4A4"):
            QuantSpec.parse(bad)
