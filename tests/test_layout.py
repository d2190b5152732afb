import pytest

from optax8 import layout


@pytest.mark.parametrize("shape,block,expected", [
    ((), 256, (1,)),
    ((1,), 256, (1,)),
    ((256,), 256, (1,)),
    ((257,), 256, (2,)),
    ((1024, 4097), 256, (1024, 17)),
    ((3, 5, 2048), 2048, (3, 5, 1)),
    ((7, 0), 64, (7, 0)),
])
def test_absmax_shape(shape, block, expected):
  assert layout.absmax_shape(shape, block) == expected


@pytest.mark.parametrize("bad", [0, 3, 100, -256, 2**21])
def test_block_size_must_be_a_power_of_two(bad):
  with pytest.raises(ValueError, match="power of two"):
    layout.check_block_size(bad)


@pytest.mark.parametrize("bad", [256.0, "256", True])
def test_block_size_must_be_an_int(bad):
  with pytest.raises(TypeError, match="block_size"):
    layout.check_block_size(bad)


def test_value_dtypes():
  assert layout.check_value_dtype("bfloat16").name == "bfloat16"
  with pytest.raises(TypeError, match="float32, bfloat16 or float16, got int32"):
    layout.check_value_dtype("int32", "x")
