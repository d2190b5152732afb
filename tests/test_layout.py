import numpy as np
import pytest

from optax8 import layout


@pytest.mark.parametrize("shape,block,expected", [
    ((), 256, (1,)),
    ((1,), 256, (1,)),
    ((256,), 256, (1,)),
    ((257,), 256, (2,)),
    ((1024, 4097), 256, (64, 257)),     # 16 x 16 tiles; a short column of tiles ends each band
    ((8, 40), 256, (1, 3)),             # fewer rows than a tile: tiles of 8 x 16
    ((3, 5, 2048), 2048, (3, 1, 32)),   # 32 x 64 tiles, per leading index
    ((7, 0), 64, (1, 0)),
    ((7, 0), 2, (7, 0)),                # blocks of 1 x 2: runs along the last axis
])
def test_absmax_shape(shape, block, expected):
  assert layout.absmax_shape(shape, block) == expected


@pytest.mark.parametrize("block,tile", [(1, (1, 1)), (2, (1, 2)), (4, (2, 2)), (8, (2, 4)), (128, (8, 16)),
                                        (256, (16, 16)), (4096, (64, 64)), (2**20, (1024, 1024))])
def test_a_block_of_a_matrix_is_a_tile_at_most_as_tall_as_wide(block, tile):
  assert layout.tile(block) == tile
  assert layout.block_shape((100, 100), block) == tile
  assert layout.block_shape((3, 100, 100), block) == (1,) + tile
  assert layout.block_shape((100,), block) == (block,)


def test_blocks_fit_shards_of_sixteen_on_either_matrix_axis_at_the_default_block_size():
  rows, cols = layout.tile(layout.DEFAULT_BLOCK_SIZE)
  for n in (16, 32, 48, 256):
    assert n % rows == 0 and n % cols == 0


def test_absmax_of_a_batch_keeps_the_layout_of_its_examples():
  # a batch of vectors (vmap) keeps runs; a batch of matrices keeps tiles
  assert layout.absmax_shape((8, 1000), 256, rows=1) == (8, 4)
  assert layout.absmax_shape((8, 40, 40), 256, rows=16) == (8, 3, 3)
  assert layout.absmax_shape((8, 40, 40), 256) == (8, 3, 3)
  np.testing.assert_array_equal(layout.extents(3, 256, 16), (1, 16, 16))


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
