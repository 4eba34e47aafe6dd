import numpy as np
import pytest

from cfg_jax import errors, images, paths
from cfg_jax.app import files, locking


def test_uint8_round_trip_and_clipping():
  x = np.array([-1.5, -1.0, 0.0, 1.0, 2.0], np.float32)
  np.testing.assert_array_equal(images.to_uint8(x), [0, 0, 128, 255, 255])
  np.testing.assert_allclose(images.from_uint8(images.to_uint8(x[1:4])), [-1, 0.0039, 1], atol=1e-3)


def test_grid_is_row_major_with_padding():
  tiles = np.arange(6 * 2 * 2).reshape(6, 2, 2, 1).astype(np.uint8)
  picture = images.grid(tiles, num_rows=2)[..., 0]
  assert picture.shape == (7, 10)
  np.testing.assert_array_equal(picture[1:3, 4:6], tiles[1, ..., 0])  # row 0, column 1
  np.testing.assert_array_equal(picture[4:6, 1:3], tiles[3, ..., 0])  # row 1, column 0
  assert (picture[0] == 255).all() and (picture[:, 3] == 255).all()


def test_non_finite_images_are_an_error_not_black_pixels():
  with pytest.raises(errors.NonFiniteError, match="1 of 2 images hold NaN"):
    images.to_uint8(np.array([[0.0, 0.5], [np.nan, 0.0]], np.float32))


def test_read_npz_checks_dtype_shape_and_labels(tmp_path):
  images = np.zeros((4, 8, 8, 1), np.uint8)
  np.savez(tmp_path / "ok.npz", arr_0=images, arr_1=np.arange(4))
  got, labels = files.read_npz(str(tmp_path / "ok.npz"), (8, 8, 1), 10)
  assert got.dtype == np.uint8 and labels.dtype == np.int64
  np.savez(tmp_path / "f.npz", arr_0=images.astype(np.float32), arr_1=np.arange(4))
  with pytest.raises(errors.InputError, match="must be uint8"):
    files.read_npz(str(tmp_path / "f.npz"))
  with pytest.raises(errors.InputError, match="label 3 is out of range"):
    files.read_npz(str(tmp_path / "ok.npz"), num_classes=3)
  with pytest.raises(errors.InputError, match="images have shape"):
    files.read_npz(str(tmp_path / "ok.npz"), image_shape=(28, 28, 1))


def test_grid_beside_is_capped(tmp_path):
  from PIL import Image

  samples = np.zeros((500, 2, 2, 1), np.uint8)
  path = files.save_grid_beside(str(tmp_path / "s.npz"), samples, np.arange(500) % 10)
  assert Image.open(path).size == ((10 * 3 + 1) * 4,) * 2  # 100 images: 10 × 10


def test_an_output_under_a_file_is_one_user_error_before_anything_is_written(tmp_path):
  blocker = tmp_path / "notes.txt"
  blocker.write_text("precious")
  for check in (lambda: files.check_output_free(str(blocker / "x.npz"), overwrite=False),
                lambda: files.check_output_free(str(blocker / "deeper" / "x.npz"), overwrite=True),
                lambda: paths.check_folder_usable(str(blocker / "run"), "the workdir", "fix it")):
    with pytest.raises(paths.UnusablePathError, match="notes.txt is not a folder"):
      check()
  with pytest.raises(paths.UnusablePathError, match="is a folder"):
    files.check_output_free(str(tmp_path), overwrite=True)
  files.check_output_free(str(tmp_path / "new" / "folder" / "x.npz"), overwrite=False)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]  # the checks create nothing


def test_writes_and_locks_under_a_file_raise_user_errors_not_os_errors(tmp_path):
  blocker = tmp_path / "notes.txt"
  blocker.write_text("precious")
  with pytest.raises(paths.UnusablePathError, match="cannot create the folder"):
    with paths.atomic_path(str(blocker / "x.png")):
      pass
  with pytest.raises(paths.UnusablePathError, match="cannot create the folder"):
    with locking.exclusive(str(blocker / "train.lock")):
      pass
  (tmp_path / "train.lock").mkdir()  # a folder where the lock file belongs
  with pytest.raises(paths.UnusablePathError, match="cannot create the lock file"):
    with locking.exclusive(str(tmp_path / "train.lock")):
      pass
  assert issubclass(paths.UnusablePathError, errors.UserError)
  assert blocker.read_text() == "precious"
