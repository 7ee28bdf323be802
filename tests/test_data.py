"""IDX parsing, image folders, minibatches and normalisation, on files the tests write."""
import gzip
import os
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
import PIL.features
from PIL import Image

from minicnn import data, fashion_mnist, image_folder
from minicnn.data import Batches, normalize
from minicnn.fashion_mnist import load_fashion_mnist, read_idx
from minicnn.image_folder import load_image_folder


def idx_bytes(array):
    """The IDX encoding of a uint8 array: magic 0x00000800 + ndim, big-endian sizes, values."""
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_fashion(folder, n_train=6, n_test=4, *, gz=True, corrupt=None):
    rng = np.random.default_rng(0)
    arrays = {"train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28)),
              "train-labels-idx1-ubyte": rng.integers(0, 10, n_train),
              "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28)),
              "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test)}
    for name, array in arrays.items():
        raw = idx_bytes(array)
        if corrupt == name:
            raw = raw[:-7]  # truncated
        if gz:
            with gzip.open(folder / (name + ".gz"), "wb") as f:
                f.write(raw)
        else:
            (folder / name).write_bytes(raw)
    return arrays


@pytest.mark.parametrize("gz", [True, False])
def test_fashion_mnist_reads_idx_values_and_shapes(tmp_path, gz):
    arrays = write_fashion(tmp_path, gz=gz)
    (x_train, y_train), (x_test, y_test), classes = load_fashion_mnist(tmp_path)
    assert x_train.dtype == torch.uint8 and x_train.shape == (6, 1, 28, 28)
    assert y_train.dtype == torch.int64 and len(classes) == 10 and classes[9] == "Ankle boot"
    assert np.array_equal(x_train[:, 0].numpy(), arrays["train-images-idx3-ubyte"])
    assert np.array_equal(y_test.numpy(), arrays["t10k-labels-idx1-ubyte"])
    assert np.array_equal(x_test[:, 0].numpy(), arrays["t10k-images-idx3-ubyte"])


def test_truncated_idx_names_the_file(tmp_path):
    write_fashion(tmp_path, corrupt="t10k-images-idx3-ubyte")
    with pytest.raises(ValueError, match="t10k-images-idx3-ubyte.*bytes"):
        load_fashion_mnist(tmp_path)


def test_bad_magic_and_broken_gzip_are_named(tmp_path):
    (tmp_path / "a").write_bytes(b"\x00\x00\x09\x01\x00\x00\x00\x01\x05")
    with pytest.raises(ValueError, match="a: not an IDX"):
        read_idx(tmp_path / "a")
    (tmp_path / "b.gz").write_bytes(b"this is not gzip")
    with pytest.raises(ValueError, match="b.gz: cannot read"):
        read_idx(tmp_path / "b.gz")


def test_labels_out_of_range_are_refused(tmp_path):
    write_fashion(tmp_path, gz=False)
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(idx_bytes(np.array([0, 1, 2, 3, 4, 12])))
    with pytest.raises(ValueError, match="train-labels-idx1-ubyte.*up to 12"):
        load_fashion_mnist(tmp_path)


def test_missing_data_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setattr(fashion_mnist, "fashion_mnist_folders", lambda root=None: [tmp_path])
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        load_fashion_mnist()


def test_search_order_root_then_environment(tmp_path, monkeypatch):
    # a folder that is named (root=, else $MINICNN_DATA) is the only place looked in
    monkeypatch.setenv("MINICNN_DATA", str(tmp_path / "env"))
    root = tmp_path / "root"
    assert fashion_mnist.fashion_mnist_folders(root) == [root, root / "FashionMNIST" / "raw"]
    assert fashion_mnist.fashion_mnist_folders() == [tmp_path / "env", tmp_path / "env" / "FashionMNIST" / "raw"]
    (tmp_path / "env").mkdir()
    write_fashion(tmp_path / "env", n_train=3)
    assert len(load_fashion_mnist()[0][0]) == 3  # found through $MINICNN_DATA
    root.mkdir()
    write_fashion(root, n_train=5)
    assert len(load_fashion_mnist(root)[0][0]) == 5  # root= before $MINICNN_DATA
    monkeypatch.setenv("MINICNN_DATA", "")  # set but empty counts as unset
    assert fashion_mnist.fashion_mnist_folders()[0] == fashion_mnist.Path(fashion_mnist.DEBIAN_FASHION_MNIST)


@pytest.fixture
def system_copy(tmp_path, monkeypatch):
    """A complete Fashion-MNIST of 7 training images where Debian's would be, and no $MINICNN_DATA."""
    (tmp_path / "system").mkdir()
    write_fashion(tmp_path / "system", n_train=7)
    monkeypatch.setattr(fashion_mnist, "DEBIAN_FASHION_MNIST", str(tmp_path / "system"))
    monkeypatch.delenv("MINICNN_DATA", raising=False)
    assert len(load_fashion_mnist()[0][0]) == 7  # found when nothing is named
    return tmp_path / "system"


def test_an_incomplete_named_folder_is_refused_never_replaced(tmp_path, monkeypatch, system_copy):
    (tmp_path / "mine").mkdir()
    write_fashion(tmp_path / "mine")
    (tmp_path / "mine" / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(FileNotFoundError, match=r"root=.*mine: lacks t10k-labels-idx1-ubyte \("):
        load_fashion_mnist(tmp_path / "mine")
    with pytest.raises(FileNotFoundError, match=r"root=.*nowhere: no such folder"):
        load_fashion_mnist(tmp_path / "nowhere")
    monkeypatch.setenv("MINICNN_DATA", str(tmp_path / "mine"))
    with pytest.raises(FileNotFoundError, match=r"MINICNN_DATA=.*mine: lacks t10k-labels.*unset MINICNN_DATA"):
        load_fashion_mnist()
    (tmp_path / "empty").mkdir()
    monkeypatch.setenv("MINICNN_DATA", str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match="lacks train-images-idx3-ubyte, train-labels-idx1-ubyte, "
                                                "t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte"):
        load_fashion_mnist()


def test_a_named_folder_may_hold_torchvisions_layout(tmp_path):
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    write_fashion(raw, n_train=4, gz=False)
    assert len(load_fashion_mnist(tmp_path)[0][0]) == 4


def test_empty_idx_files_are_refused(tmp_path):
    write_fashion(tmp_path, gz=False)
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(idx_bytes(np.zeros((0, 28, 28))))
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(idx_bytes(np.zeros(0)))
    with pytest.raises(ValueError, match="t10k-images-idx3-ubyte.*N >= 1"):
        load_fashion_mnist(tmp_path)


def test_python_m_minicnn_data_says_found_or_why_not(tmp_path, monkeypatch, capsys):
    # `make data` runs it: exit 0 when the data is there, else a message (no traceback) and exit 1
    write_fashion(tmp_path, n_train=3)
    found = subprocess.run([sys.executable, "-m", "minicnn.fashion_mnist"], capture_output=True, text=True, timeout=120,
                           env={**os.environ, "MINICNN_DATA": str(tmp_path)})
    assert found.returncode == 0 and "3 training and 4 test images" in found.stdout
    monkeypatch.setenv("MINICNN_DATA", str(tmp_path))
    (tmp_path / "t10k-images-idx3-ubyte.gz").unlink()
    with pytest.raises(SystemExit) as missing:
        fashion_mnist.main([])
    assert f"MINICNN_DATA={tmp_path}" in str(missing.value.code) and "t10k-images-idx3-ubyte" in str(missing.value.code)
    with pytest.raises(SystemExit) as misspelt:
        fashion_mnist.main(["--downlaod"])  # a misspelt option is not ignored
    assert misspelt.value.code == 2 and "unrecognized arguments: --downlaod" in capsys.readouterr().err


def save_image(path, mode, size=(12, 8), color=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(len(str(path)))
    channels = {"L": 1, "RGB": 3, "RGBA": 4}[mode]
    array = rng.integers(0, 256, (size[1], size[0], channels), dtype=np.uint8)
    Image.fromarray(array.squeeze(-1) if channels == 1 else array, mode).save(path)


def make_folder(root):
    save_image(root / "train" / "cat" / "a.png", "RGB")
    save_image(root / "train" / "cat" / "b.jpg", "L")
    save_image(root / "train" / "dog" / "c.png", "RGBA", size=(8, 16))
    save_image(root / "valid" / "cat" / "d.jpeg", "RGB")
    save_image(root / "valid" / "dog" / "e.png", "L")


def test_image_folder_rgb_resize_and_crop(tmp_path):
    make_folder(tmp_path)
    folder = load_image_folder(tmp_path, 6)
    x_train, y_train = folder.train
    assert folder.classes == ["cat", "dog"] and folder.test is None
    assert x_train.dtype == torch.uint8 and x_train.shape == (3, 3, 6, 6)  # grey and RGBA made RGB
    assert y_train.tolist() == [0, 0, 1] and folder.valid[1].tolist() == [0, 1]
    grey = x_train[1]  # b.jpg was grayscale: its three channels are equal
    assert torch.equal(grey[0], grey[1]) and torch.equal(grey[1], grey[2])


def test_image_folder_center_crop_keeps_the_middle(tmp_path):
    # a 4x12 image whose middle 4x4 is white: short side 4 -> crop the centre -> all white
    array = np.zeros((4, 12, 3), np.uint8)
    array[:, 4:8] = 255
    for split in ("train", "valid"):
        for label in ("a", "b"):  # two classes: one is refused
            (tmp_path / split / label).mkdir(parents=True)
            Image.fromarray(array).save(tmp_path / split / label / "x.png")
    x_train = load_image_folder(tmp_path, 4).train[0]
    assert int(x_train.min()) == 255


def test_image_folder_errors_name_what_is_wrong(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such folder"):
        load_image_folder(tmp_path / "nowhere", 8)
    make_folder(tmp_path)
    save_image(tmp_path / "valid" / "bird" / "f.png", "RGB")
    with pytest.raises(ValueError, match=r"extra \['bird'\]"):
        load_image_folder(tmp_path, 8)
    (tmp_path / "valid" / "bird" / "f.png").unlink()
    (tmp_path / "valid" / "bird").rmdir()
    (tmp_path / "train" / "dog" / "broken.png").write_bytes(b"not a png at all")
    (tmp_path / "train" / "cat" / "empty.jpg").write_bytes(b"")
    with pytest.raises(ValueError, match="2 image.*cannot be decoded.*empty.jpg.*broken.png"):
        load_image_folder(tmp_path, 8)  # every broken file named at once, not only the first


def test_image_folder_without_images(tmp_path):
    (tmp_path / "train" / "cat").mkdir(parents=True)
    (tmp_path / "train" / "cat" / "notes.txt").write_text("no images here")
    with pytest.raises(ValueError, match="no images"):
        load_image_folder(tmp_path, 8)


def test_image_folder_reads_the_test_split(tmp_path):
    make_folder(tmp_path)
    save_image(tmp_path / "test" / "t1.png", "RGB")
    save_image(tmp_path / "test" / "t2.png", "L")
    assert load_image_folder(tmp_path, 5).test.shape == (2, 3, 5, 5)


def test_a_class_folder_without_images_is_refused_with_what_it_holds(tmp_path):
    make_folder(tmp_path)
    (tmp_path / "train" / "bird").mkdir()
    for name in ("a.tif", "b.TIF", "notes.txt"):
        (tmp_path / "train" / "bird" / name).write_bytes(b"x")
    (tmp_path / "train" / "fish").mkdir()  # empty
    for label in ("bird", "fish"):
        save_image(tmp_path / "valid" / label / "v.png", "RGB")
    with pytest.raises(ValueError) as error:
        load_image_folder(tmp_path, 8)
    message = str(error.value)  # both folders named in the one error, with what each holds
    assert "train/bird: no images (it holds .tif: 2, .txt: 1; supported: .gif, .jpeg, .jpg, .png, .webp)" in message
    assert "train/fish: no images (it holds nothing" in message


def test_an_empty_valid_class_is_refused_by_name(tmp_path):
    make_folder(tmp_path)
    (tmp_path / "valid" / "dog" / "e.png").unlink()  # valid/dog/ is left empty
    with pytest.raises(ValueError, match=r"valid/dog: no images \(it holds nothing"):
        load_image_folder(tmp_path, 8)


def test_a_single_class_is_refused(tmp_path):
    save_image(tmp_path / "train" / "cat" / "a.png", "RGB")
    save_image(tmp_path / "valid" / "cat" / "b.png", "RGB")
    with pytest.raises(ValueError, match=r"train: only the class \['cat'\].*at least 2 classes"):
        load_image_folder(tmp_path, 8)


def test_images_outside_class_folders_are_refused_or_said(tmp_path):
    save_image(tmp_path / "train" / "a.png", "RGB")  # no class folders at all
    save_image(tmp_path / "valid" / "b.png", "RGB")
    with pytest.raises(ValueError, match=r"train: no class folders \(it holds .png: 1\)"):
        load_image_folder(tmp_path, 8)
    make_folder(tmp_path)  # now with class folders, and a.png, b.png, notes left beside them
    (tmp_path / "train" / "cat" / "notes.txt").write_text("x")
    (tmp_path / "train" / "cat" / "more").mkdir()
    with pytest.warns(UserWarning, match=r"skipped what is not an image.*train: .png: 1 outside the class "
                                         r"folders.*train/cat: .txt: 1, folder: 1.*valid: .png: 1"):
        folder = load_image_folder(tmp_path, 8)
    assert folder.train[1].tolist() == [0, 0, 1]  # the images of make_folder, no more


def test_missing_split_folders_are_named_together(tmp_path):
    (tmp_path / "data").mkdir()
    with pytest.raises(ValueError, match=r"(?s)train: no such folder.*valid: no such folder"):
        load_image_folder(tmp_path / "data", 8)


def test_a_test_folder_without_images_is_refused(tmp_path):
    make_folder(tmp_path)
    save_image(tmp_path / "test" / "cat" / "t.png", "RGB")  # labelled layout: test/ holds images directly
    with pytest.raises(ValueError, match=r"test: no images \(it holds folder: 1.*test/ holds unlabelled images"):
        load_image_folder(tmp_path, 8)


def test_a_dangling_symlink_is_named(tmp_path):
    make_folder(tmp_path)
    (tmp_path / "train" / "dog" / "gone.png").symlink_to(tmp_path / "nowhere.png")
    with pytest.raises(ValueError, match=r"1 image.*cannot be decoded.*gone.png \(a symlink to .*nowhere.png, "
                                         r"which does not exist\)"):
        load_image_folder(tmp_path, 8)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads every file")
def test_an_unreadable_file_is_named(tmp_path):
    make_folder(tmp_path)
    (tmp_path / "train" / "dog" / "c.png").chmod(0)
    with pytest.raises(ValueError, match=r"1 image.*cannot be decoded.*c.png \(.*Permission denied"):
        load_image_folder(tmp_path, 8)


def test_a_read_error_is_named_without_torchvisions_source_line(tmp_path, monkeypatch):
    # as root can read every file, the read error torchvision gives for an unreadable one is simulated
    import torchvision.io
    make_folder(tmp_path)
    decode = torchvision.io.decode_image

    def unreadable(path, **kwargs):
        if path.endswith("c.png"):
            raise RuntimeError(f"read_file, /__w/vision/read_write_file.cpp:78, [Errno 13] Permission denied: {path}")
        return decode(path, **kwargs)
    monkeypatch.setattr(torchvision.io, "decode_image", unreadable)
    with pytest.raises(ValueError, match=r"1 image.*cannot be decoded.*c.png \(\[Errno 13\] Permission denied"):
        load_image_folder(tmp_path, 8)


def test_a_folder_that_cannot_be_listed_is_named(tmp_path, monkeypatch):
    make_folder(tmp_path)
    locked, iterdir = tmp_path / "train" / "dog", image_folder.Path.iterdir

    def refuse(self):
        if self == locked:
            raise PermissionError(13, "Permission denied", str(self))
        return iterdir(self)
    monkeypatch.setattr(image_folder.Path, "iterdir", refuse)
    with pytest.raises(ValueError, match=r"train/dog: cannot list it \(Permission denied\)"):
        load_image_folder(tmp_path, 8)


@pytest.mark.parametrize("size", [0, -3])
def test_size_is_checked_before_any_work(tmp_path, size):
    with pytest.raises(ValueError, match=f"size={size}"):
        load_image_folder(tmp_path / "nowhere", size)


def write_png_rgb16(path, array):
    """A 16-bit RGB PNG written by hand (PIL cannot): signature, IHDR, one IDAT, IEND."""
    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    h, w, _ = array.shape
    rows = b"".join(b"\0" + array[i].astype(">u2").tobytes() for i in range(h))  # filter 0 per row
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


def two_class_folder(root, train_images):
    """train/a holds train_images (name -> writer), train/b one plain image; valid one image each."""
    for name, write in train_images.items():
        (root / "train" / "a").mkdir(parents=True, exist_ok=True)
        write(root / "train" / "a" / name)
    for path in (root / "train" / "b" / "z.png", root / "valid" / "a" / "v.png", root / "valid" / "b" / "w.png"):
        save_image(path, "RGB", size=(6, 6))


def test_16_bit_pngs_become_8_bit(tmp_path):
    grey = np.array([[0, 257, 32767, 32768, 65535, 1000]] * 6, dtype=np.uint16)  # (6, 6)
    colour = np.stack([grey, grey[::-1].T, np.full_like(grey, 40000)], -1)  # (6, 6, 3)
    two_class_folder(tmp_path, {"grey.png": lambda p: Image.fromarray(grey).save(p),
                                "colour.png": lambda p: write_png_rgb16(p, colour)})
    assert Image.open(tmp_path / "train" / "a" / "grey.png").mode == "I;16"
    x = load_image_folder(tmp_path, 6).train[0]  # (3, 3, 6, 6): colour.png, grey.png, z.png
    to8 = lambda v: np.round(v.astype(np.float64) * 255 / 65535).astype(np.uint8)  # noqa: E731
    assert np.array_equal(x[1].numpy(), np.stack([to8(grey)] * 3))
    assert np.array_equal(x[0].numpy(), to8(colour).transpose(2, 0, 1))
    assert to8(grey)[0].tolist() == [0, 1, 127, 128, 255, 4]


def test_an_animated_gif_gives_its_first_frame_and_says_so(tmp_path):
    frames = [Image.fromarray(np.full((6, 6, 3), v, np.uint8)) for v in (10, 200, 90)]
    two_class_folder(tmp_path, {"anim.gif": lambda p: frames[0].save(p, save_all=True, append_images=frames[1:])})
    with pytest.warns(UserWarning, match=r"1 animated image.*only the first frame.*anim.gif \(3 frames\)"):
        x = load_image_folder(tmp_path, 6).train[0]
    assert x[0].unique().tolist() == [10]


@pytest.mark.skipif(not PIL.features.check("webp"), reason="this PIL writes no WebP")
def test_an_animated_webp_is_named(tmp_path):
    frames = [Image.fromarray(np.full((6, 6, 3), v, np.uint8)) for v in (10, 200)]
    two_class_folder(tmp_path, {"anim.webp": lambda p: frames[0].save(p, save_all=True, append_images=frames[1:])})
    with pytest.raises(ValueError, match=r"1 image.*cannot be decoded.*anim.webp \(Animated webp files are not supported"):
        load_image_folder(tmp_path, 6)


def test_grey_palette_one_bit_and_alpha_images_become_rgb(tmp_path):
    rng = np.random.default_rng(0)
    rgba = rng.integers(0, 256, (6, 6, 4), dtype=np.uint8)
    grey = rng.integers(0, 256, (6, 6), dtype=np.uint8)
    index = rng.integers(0, 3, (6, 6), dtype=np.uint8)
    palette = np.array([[200, 30, 90], [0, 255, 0], [12, 34, 56]], np.uint8)

    def save_palette(path):
        image = Image.fromarray(index, "P")
        image.putpalette(palette.flatten().tolist())
        image.save(path)
    two_class_folder(tmp_path, {
        "1_rgba.png": lambda p: Image.fromarray(rgba, "RGBA").save(p),
        "2_grey_alpha.png": lambda p: Image.fromarray(np.stack([grey, grey], -1), "LA").save(p),
        "3_palette.png": save_palette, "4_palette.gif": save_palette,
        "5_one_bit.png": lambda p: Image.fromarray(grey > 127).save(p)})
    x = load_image_folder(tmp_path, 6).train[0].numpy()  # (6, 3, 6, 6)
    assert np.array_equal(x[0], rgba[..., :3].transpose(2, 0, 1))  # alpha dropped
    assert np.array_equal(x[1], np.stack([grey] * 3))
    assert np.array_equal(x[2], palette[index].transpose(2, 0, 1))
    assert np.array_equal(x[3], palette[index].transpose(2, 0, 1))
    assert np.array_equal(x[4], np.stack([(grey > 127) * 255] * 3).astype(np.uint8))


def test_batches_cover_every_sample_once_per_epoch_and_repeat_with_the_seed():
    x = torch.arange(10, dtype=torch.uint8).view(10, 1, 1, 1)
    y = torch.arange(10)
    b = Batches(x, y, 3, shuffle=True, generator=torch.Generator().manual_seed(1))
    epochs = [[yb.tolist() for _, yb in b] for _ in range(2)]
    assert len(b) == 4 and [len(batch) for batch in epochs[0]] == [3, 3, 3, 1]
    for epoch in epochs:
        assert sorted(sum(epoch, [])) == list(range(10))
    assert epochs[0] != epochs[1]  # a new order each epoch
    again = Batches(x, y, 3, shuffle=True, generator=torch.Generator().manual_seed(1))
    assert [[yb.tolist() for _, yb in again] for _ in range(2)] == epochs
    # images travel as uint8 and arrive as float in [0, 1], still paired with their labels
    for xb, yb in b.epoch(0):
        assert xb.dtype == torch.float32 and torch.equal(xb.view(-1) * 255, yb.float())


def test_batches_epoch_order_is_pure_and_skip_resumes():
    b = Batches(torch.arange(7).float().view(7, 1), torch.arange(7), 2, shuffle=True,
                generator=torch.Generator().manual_seed(3))
    full = [yb.tolist() for _, yb in b.epoch(5)]
    assert [yb.tolist() for _, yb in b.epoch(5, skip=2)] == full[2:]
    assert [yb.tolist() for _, yb in b.epoch(5)] == full


def test_batches_without_shuffle_and_drop_last():
    b = Batches(torch.zeros(7, 1), torch.arange(7), 3, shuffle=False, drop_last=True)
    assert len(b) == 2 and [yb.tolist() for _, yb in b] == [[0, 1, 2], [3, 4, 5]]
    with pytest.raises(ValueError, match="batch_size"):
        Batches(torch.zeros(7, 1), torch.arange(7), 0, shuffle=False)
    with pytest.raises(ValueError, match=r"y .*\(6,\) for 7 samples"):
        Batches(torch.zeros(7, 1), torch.arange(6), 2, shuffle=False)


@given(n=st.integers(1, 40), batch_size=st.integers(1, 12), shuffle=st.booleans(), drop_last=st.booleans(),
       seed=st.integers(0, 2**31), epoch=st.integers(0, 1000))
def test_batches_epoch_order_is_a_pure_function_of_seed_and_epoch(n, batch_size, shuffle, drop_last, seed, epoch):
    x, y = torch.arange(n, dtype=torch.uint8).view(n, 1), torch.arange(n)
    b = Batches(x, y, batch_size, shuffle=shuffle, drop_last=drop_last, generator=torch.Generator().manual_seed(seed))
    labels = [yb.tolist() for _, yb in b.epoch(epoch)]
    assert len(labels) == len(b) == (n // batch_size if drop_last else -(-n // batch_size))
    seen = sum(labels, [])
    assert len(set(seen)) == len(seen) and (drop_last or sorted(seen) == list(range(n)))  # each sample at most once
    assert all(len(batch) == batch_size for batch in labels[:-1])
    assert [yb.tolist() for _, yb in b.epoch(epoch)] == labels  # asking again gives the same order
    for skip in range(len(b) + 1):  # a resumed epoch is the rest of the same epoch
        assert [yb.tolist() for _, yb in b.epoch(epoch, skip=skip)] == labels[skip:]
    again = Batches(x, y, batch_size, shuffle=shuffle, drop_last=drop_last,
                    generator=torch.Generator().manual_seed(seed))
    assert [yb.tolist() for _, yb in again.epoch(epoch)] == labels  # the same seed, the same order
    if not shuffle:
        assert seen == list(range(len(seen)))


def test_batches_keep_integer_labels_as_int64_and_labels_may_be_absent():
    x = torch.zeros(5, 2)
    for dtype in (torch.uint8, torch.int16, torch.int32, torch.int64):
        _, yb = next(iter(Batches(x, torch.arange(5, dtype=dtype), 5, shuffle=False)))
        assert yb.dtype == torch.int64 and yb.tolist() == [0, 1, 2, 3, 4]
    xb, yb = next(iter(Batches(x, None, 5, shuffle=False)))
    assert yb is None and xb.dtype == torch.float32


@pytest.mark.parametrize("y, match", [
    (torch.arange(6).float(), r"y is torch.float32"),  # .long() would truncate them silently
    (torch.zeros(6, 1, dtype=torch.long), r"y is torch.int64 \(6, 1\)"),  # would broadcast
])
def test_batches_refuse_labels_that_are_not_1d_integers(y, match):
    with pytest.raises(ValueError, match=match):
        Batches(torch.zeros(6, 1), y, 2, shuffle=False)


@pytest.mark.parametrize("x, match", [
    (torch.zeros(6), r"x is torch.float32 \(6,\)"),
    (torch.zeros(0, 1), r"x is torch.float32 \(0, 1\)"),  # no batches at all
    (torch.zeros(6, 1, dtype=torch.int64), r"x is torch.int64"),
    (torch.zeros(6, 1, dtype=torch.float64), r"x is torch.float64"),
])
def test_batches_refuse_samples_they_cannot_serve(x, match):
    with pytest.raises(ValueError, match=match):
        Batches(x, None, 2, shuffle=False)


@pytest.mark.parametrize("kwargs, match", [
    (dict(batch_size=0), r"batch_size=0"),
    (dict(batch_size=-1), r"batch_size=-1"),
    (dict(device="gpu"), r"device 'gpu'"),
])
def test_batches_refuse_bad_arguments_by_name(kwargs, match):
    args = dict(batch_size=2, shuffle=False) | kwargs
    with pytest.raises(ValueError, match=match):
        Batches(torch.zeros(6, 1), torch.arange(6), args.pop("batch_size"), **args)


def test_batches_refuse_cuda_where_there_is_none(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match=r"device 'cuda:1'.*use cpu"):
        Batches(torch.zeros(6, 1), torch.arange(6), 2, shuffle=False, device="cuda:1")


def test_batches_refuse_a_skip_out_of_range():
    b = Batches(torch.zeros(6, 1), torch.arange(6), 2, shuffle=True)
    assert list(b.epoch(0, skip=3)) == []  # the end of the epoch: a resume at its last step
    with pytest.raises(ValueError, match=r"skip=4.*0 to 3"):  # not a silently empty epoch
        next(b.epoch(0, skip=4))
    with pytest.raises(ValueError, match=r"skip=-1"):
        next(b.epoch(0, skip=-1))


def test_train_valid_split_partitions_and_keeps_every_class_in_both_parts():
    y = torch.tensor([0] * 12 + [1] * 6 + [2] * 2)  # class-sorted, as an image folder loads
    x = torch.arange(20).view(20, 1)
    (x_tr, y_tr), (x_va, y_va) = data.train_valid_split(x, y, 5, seed=1)
    assert len(y_va) == 5 and sorted(x_tr.view(-1).tolist() + x_va.view(-1).tolist()) == list(range(20))
    assert torch.equal(y[x_va.view(-1)], y_va) and torch.equal(y[x_tr.view(-1)], y_tr)
    assert torch.bincount(y_va).tolist() == [3, 1, 1]  # 3, 1.5, 0.5 by share; every class at least once
    assert set(y_tr.tolist()) == {0, 1, 2}
    assert y_tr.tolist() != sorted(y_tr.tolist())  # a random order, not class-sorted
    with pytest.raises(ValueError, match="n_valid=20"):
        data.train_valid_split(x, y, 20)
    with pytest.raises(ValueError, match="n_valid=2"):  # 3 classes cannot fit in 2
        data.train_valid_split(x, y, 2)


def test_stratified_subset_keeps_every_class():
    y = torch.tensor([0] * 300 + [1] * 94 + [2] * 3 + [3] * 3)  # the probe's folder, class-sorted
    x = torch.arange(len(y))
    xs, ys = data.stratified_subset(x, y, 40, seed=0)
    assert torch.equal(y[xs], ys) and len(set(xs.tolist())) == 40
    assert set(ys.tolist()) == {0, 1, 2, 3}
    assert data.stratified_subset(x, y, 1000)[1] is y  # more than there is: all of it
    with pytest.raises(ValueError, match="n=3"):
        data.stratified_subset(x, y, 3)


def labels_of(counts, shuffle_seed):
    """Class c repeated counts[c] times, class-sorted (seed None) or in a random order."""
    y = torch.cat([torch.full((n,), c) for c, n in enumerate(counts)])
    return y if shuffle_seed is None else y[torch.randperm(len(y), generator=torch.Generator().manual_seed(shuffle_seed))]


def in_share(take, counts, n):
    """Each class's count is its exact quota n * n_c / N rounded down or up, where no bound binds."""
    total = sum(counts)
    return all(t in (n * c // total, -(-n * c // total)) for t, c in zip(take, counts))


split_cases = st.lists(st.integers(2, 30), min_size=2, max_size=6).flatmap(
    lambda counts: st.tuples(st.just(counts), st.integers(len(counts), sum(counts) - len(counts)),
                             st.integers(0, 2**31), st.one_of(st.none(), st.integers(0, 99))))


@given(split_cases)
def test_train_valid_split_properties(case):
    counts, n_valid, seed, order = case
    y = labels_of(counts, order)
    x = torch.arange(len(y))
    (x_tr, y_tr), (x_va, y_va) = data.train_valid_split(x, y, n_valid, seed=seed)
    assert len(y_va) == n_valid and len(y_tr) == len(y) - n_valid  # sizes exact
    assert sorted(x_tr.tolist() + x_va.tolist()) == x.tolist()  # a partition
    assert torch.equal(y[x_tr], y_tr) and torch.equal(y[x_va], y_va)  # labels stay with their samples
    k = len(counts)
    take = torch.bincount(y_va, minlength=k).tolist()
    assert min(take) >= 1 and min(torch.bincount(y_tr, minlength=k).tolist()) >= 1  # every class in both
    total = sum(counts)
    if all(n_valid * c // total >= 1 and -(-n_valid * c // total) <= c - 1 for c in counts):
        assert in_share(take, counts, n_valid)
    again = data.train_valid_split(x, y, n_valid, seed=seed)
    assert torch.equal(again[0][0], x_tr) and torch.equal(again[1][0], x_va)  # deterministic per seed


@given(split_cases)
def test_stratified_subset_properties(case):
    counts, n, seed, order = case
    y = labels_of(counts, order)
    x = torch.arange(len(y))
    xs, ys = data.stratified_subset(x, y, n, seed=seed)
    assert len(ys) == n and len(set(xs.tolist())) == n and torch.equal(y[xs], ys)
    take = torch.bincount(ys, minlength=len(counts)).tolist()
    assert min(take) >= 1
    if all(n * c // sum(counts) >= 1 for c in counts):
        assert in_share(take, counts, n)
    assert torch.equal(data.stratified_subset(x, y, n, seed=seed)[0], xs)


def test_splits_depend_on_the_seed():
    y = labels_of([20, 20], None)
    x = torch.arange(40)
    assert not torch.equal(data.train_valid_split(x, y, 10, seed=0)[1][0], data.train_valid_split(x, y, 10, seed=1)[1][0])
    assert not torch.equal(data.stratified_subset(x, y, 10, seed=0)[0], data.stratified_subset(x, y, 10, seed=1)[0])


def test_a_class_with_a_single_sample_cannot_be_split():
    y = torch.tensor([0, 0, 0, 1, 1, 2])
    with pytest.raises(ValueError, match=r"\[2\] have a single sample") as error:
        data.train_valid_split(torch.arange(6), y, 3)
    assert "n_valid" not in str(error.value)  # no range of n_valid could help
    assert data.stratified_subset(torch.arange(6), y, 3)[1].sort().values.tolist() == [0, 1, 2]  # a subset can


@pytest.mark.parametrize("call, match", [
    (lambda x, y: data.train_valid_split(x, y, -1), r"n_valid=-1.*2 to 18"),
    (lambda x, y: data.train_valid_split(x, y.float(), 4), r"y is torch.float32"),
    (lambda x, y: data.train_valid_split(x, y.view(20, 1), 4), r"y .*\(20, 1\)"),
    (lambda x, y: data.train_valid_split(x, y[:5], 4), r"y .*\(5,\) for 20 samples"),
    (lambda x, y: data.train_valid_split(x[:0], y[:0], 1), r"n_valid=1.*0 to 0"),
    (lambda x, y: data.stratified_subset(x, y, 1), r"n=1.*2 to 20"),  # 2 classes cannot fit in 1
    (lambda x, y: data.stratified_subset(x, y.float(), 100), r"y is torch.float32"),  # even all of it
])
def test_split_arguments_are_checked_by_name(call, match):
    y = labels_of([10, 10], None)
    with pytest.raises(ValueError, match=match):
        call(torch.arange(20), y)


def test_split_counts_may_be_numpy_or_torch_integers():
    y = labels_of([10, 10], None)
    assert len(data.train_valid_split(torch.arange(20), y, np.int64(4))[1][1]) == 4
    assert len(data.stratified_subset(torch.arange(20), y, torch.tensor(6))[1]) == 6


def test_normalize_matches_torchvision():
    import torchvision.transforms.v2.functional as TF
    x = torch.rand(2, 3, 4, 4)
    mean, std = (0.1, 0.2, 0.3), (0.5, 0.6, 0.7)
    assert torch.allclose(normalize(x, mean, std), TF.normalize(x, mean, std), atol=1e-7)


def test_normalize_broadcasts_one_value_over_the_channels():
    x = torch.rand(2, 3, 4, 4)
    assert torch.allclose(normalize(x, [0.5], 0.25), (x - 0.5) / 0.25)
    assert torch.allclose(normalize(x, torch.tensor([0.1, 0.2, 0.3]), (1, 2, 4)),
                          (x - torch.tensor([0.1, 0.2, 0.3]).view(1, 3, 1, 1)) / torch.tensor([1., 2, 4]).view(1, 3, 1, 1))


@pytest.mark.parametrize("mean, std, match", [
    ((0.1, 0.2, 0.3), (0.5, 0.6, 0.7), r"mean=\[0.1.*1"),  # RGB stats on grey images: would broadcast to 3
    ((0.5,), (0.5, 0.5), r"std=\[0.5, 0.5\]"),
    ((0.5,), (0.0,), r"std=\[0.0\]"),
    ((0.5,), (-0.3,), r"std=\[-0.3"),
    ((0.5,), (float("inf"),), r"std=\[inf\]"),
    ((float("nan"),), (0.5,), r"mean=\[nan\]"),
])
def test_normalize_refuses_statistics_that_do_not_fit(mean, std, match):
    with pytest.raises(ValueError, match=match):
        normalize(torch.rand(2, 1, 4, 4), mean, std)


def test_normalize_refuses_what_is_not_float_images():
    with pytest.raises(ValueError, match=r"x is torch.uint8"):  # would be 255 times too large
        normalize(torch.zeros(2, 1, 4, 4, dtype=torch.uint8), (0.5,), (0.5,))
    with pytest.raises(ValueError, match=r"x is torch.float32 \(1, 4, 4\)"):  # would broadcast
        normalize(torch.rand(1, 4, 4), (0.5,), (0.5,))


@pytest.mark.skipif(not os.path.isdir(fashion_mnist.DEBIAN_FASHION_MNIST), reason="dataset-fashion-mnist not installed")
def test_real_fashion_mnist_statistics():
    (x_train, y_train), (x_test, _), _ = load_fashion_mnist()
    assert len(x_train) == 60_000 and len(x_test) == 10_000
    assert torch.bincount(y_train).tolist() == [6000] * 10
    pixels = x_train.float() / 255
    assert abs(pixels.mean() - fashion_mnist.FASHION_MNIST_MEAN[0]) < 1e-3
    assert abs(pixels.std() - fashion_mnist.FASHION_MNIST_STD[0]) < 1e-3

