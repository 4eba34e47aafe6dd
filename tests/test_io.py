import numpy as np

from cfg_jax import io


def test_uint8_round_trip_and_clipping():
  x = np.array([-1.5, -1.0, 0.0, 1.0, 2.0], np.float32)
  np.testing.assert_array_equal(io.to_uint8(x), [0, 0, 128, 255, 255])
  np.testing.assert_allclose(io.from_uint8(io.to_uint8(x[1:4])), [-1, 0.0039, 1], atol=1e-3)


def test_grid_is_row_major_with_padding():
  tiles = np.arange(6 * 2 * 2).reshape(6, 2, 2, 1).astype(np.uint8)
  picture = io.grid(tiles, num_rows=2)[..., 0]
  assert picture.shape == (7, 10)
  np.testing.assert_array_equal(picture[1:3, 4:6], tiles[1, ..., 0])  # row 0, column 1
  np.testing.assert_array_equal(picture[4:6, 1:3], tiles[3, ..., 0])  # row 1, column 0
  assert (picture[0] == 255).all() and (picture[:, 3] == 255).all()
