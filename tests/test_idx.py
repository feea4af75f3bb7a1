"""IDX folders (the MNIST family's files) as datasets, and the pixel-hash provenance of a teacher's training images."""

import gzip

import numpy as np
import pytest

from rrm_hub import RRMError, load_image_data, make_loader
from rrm_hub.data import idx as idx_files
from rrm_hub.data import provenance


def write_idx(path, array, gz=False):
    """`array` (uint8) as an IDX file: magic (0, 0, 8, dims), big-endian sizes, bytes."""
    array = np.asarray(array, dtype=np.uint8)
    raw = bytes([0, 0, 8, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape) + array.tobytes()
    (gzip.open(path, "wb") if gz else open(path, "wb")).write(raw)


def idx_folder(root, n_train=12, n_test=6, size=8, gz=False, prefix="", parts=("train", "t10k"), classes=10,
               transpose=False):
    """A folder of IDX files whose image i of each split has every pixel = label * 20 + i (i < 20)."""
    root.mkdir(parents=True, exist_ok=True)
    made = {}
    for part, n in zip(parts, (n_train, n_test), strict=True):
        labels = np.arange(n) % classes
        images = np.stack([np.full((size, size), (lab * 20 + i) % 256) for i, lab in enumerate(labels)])
        images[:, 0, 1] = 255  # one bright pixel off the diagonal: transposed images put it at (1, 0)
        stored = images.transpose(0, 2, 1) if transpose else images
        suffix = ".gz" if gz else ""
        write_idx(root / f"{prefix}{part}-images-idx3-ubyte{suffix}", stored, gz)
        write_idx(root / f"{prefix}{part}-labels-idx1-ubyte{suffix}", labels, gz)
        made[part] = (images, labels)
    return made


@pytest.mark.parametrize("gz", [False, True])
def test_an_idx_folder_loads_as_train_and_test_in_file_order(tmp_path, gz):
    made = idx_folder(tmp_path / "digits", gz=gz)
    data = load_image_data(str(tmp_path / "digits"))
    assert (len(data.train), len(data.test)) == (12, 6)
    assert data.train["label"] == made["train"][1].tolist() and data.test["label"] == made["t10k"][1].tolist()
    assert np.array_equal(np.asarray(data.train[5]["image"]), made["train"][0][5])
    assert data.image_mode == "L" and data.image_size == (8, 8) and data.class_names == [str(i) for i in range(10)]
    sliced = load_image_data(str(tmp_path / "digits"), train_split="train[4:]")
    assert sliced.train["label"] == made["train"][1][4:].tolist()
    x, y = next(iter(make_loader(sliced, "test", 6)))
    assert x.shape == (6, 1, 8, 8) and y.tolist() == made["t10k"][1].tolist()


def test_emnist_files_are_read_transposed_with_their_classes(tmp_path):
    made = idx_folder(tmp_path / "emnist", prefix="emnist-letters-", parts=("train", "test"), classes=27,
                      transpose=True, n_train=30)
    data = load_image_data(str(tmp_path / "emnist"))
    assert np.array_equal(np.asarray(data.train[3]["image"]), made["train"][0][3])  # upright again
    assert data.class_names[:3] == ["N/A", "a", "b"] and len(data.class_names) == 27
    idx_folder(tmp_path / "emnist", prefix="emnist-digits-", parts=("train", "test"), transpose=True)
    with pytest.raises(RRMError, match="EMNIST splits digits, letters: name one with --dataset-config"):
        load_image_data(str(tmp_path / "emnist"))
    assert load_image_data(str(tmp_path / "emnist"), config="digits").num_classes == 10
    with pytest.raises(RRMError, match="no EMNIST split 'byclass'.*--dataset-config"):
        load_image_data(str(tmp_path / "emnist"), config="byclass")


def test_kmnist_by_its_folder_name_gets_its_class_names(tmp_path):
    idx_folder(tmp_path / "kmnist")
    assert load_image_data(str(tmp_path / "kmnist")).class_names[:3] == ["o", "ki", "su"]


def test_known_sets_are_recognised_by_their_test_labels(tmp_path, monkeypatch):
    idx_folder(tmp_path / "clothes", n_train=13)  # content of its own: not built (and cached) by another test
    labels = (tmp_path / "clothes" / "t10k-labels-idx1-ubyte").read_bytes()
    import hashlib

    known = idx_files.KnownSet("fashion_mnist", "zalando-datasets/fashion_mnist", idx_files.FASHION)
    monkeypatch.setitem(idx_files.KNOWN, hashlib.sha256(labels).hexdigest(), known)
    assert load_image_data(str(tmp_path / "clothes")).class_names[7] == "Sneaker"


def test_broken_idx_folders_are_one_line_errors(tmp_path):
    idx_folder(tmp_path / "cut")
    images = tmp_path / "cut" / "train-images-idx3-ubyte"
    images.write_bytes(images.read_bytes()[:-10])
    with pytest.raises(RRMError, match="truncated or padded.*download it again"):
        load_image_data(str(tmp_path / "cut"))

    idx_folder(tmp_path / "swapped")
    labels = tmp_path / "swapped" / "t10k-labels-idx1-ubyte"
    images = tmp_path / "swapped" / "t10k-images-idx3-ubyte"
    content = labels.read_bytes()
    labels.write_bytes(images.read_bytes())
    images.write_bytes(content)
    with pytest.raises(RRMError, match="not an IDX file of images.*which file is which"):
        load_image_data(str(tmp_path / "swapped"))

    idx_folder(tmp_path / "counts")
    write_idx(tmp_path / "counts" / "train-labels-idx1-ubyte", np.zeros(5))
    with pytest.raises(RRMError, match="12 images but .* 5 labels"):
        load_image_data(str(tmp_path / "counts"))

    idx_folder(tmp_path / "kmnist")
    write_idx(tmp_path / "kmnist" / "t10k-labels-idx1-ubyte", np.arange(6) + 7)  # labels up to 12 of 10 classes
    with pytest.raises(RRMError, match="go up to 12 but the set has 10 classes"):
        load_image_data(str(tmp_path / "kmnist"))

    idx_folder(tmp_path / "half")
    (tmp_path / "half" / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(RRMError, match="lacks its t10k-labels file"):
        load_image_data(str(tmp_path / "half"))


def test_pixel_hashes_find_shared_images_whatever_file_they_came_in(tmp_path, mnist):
    made = idx_folder(tmp_path / "digits")
    data = load_image_data(str(tmp_path / "digits"))
    from PIL import Image

    train = provenance.hashes(data.train, "image")
    decoded_elsewhere = Image.fromarray(made["train"][0][2].astype(np.uint8))
    assert train[2] == provenance.pixel_hash(decoded_elsewhere)
    assert len(set(train.tolist())) == 12
    provenance.check_disjoint(train, provenance.dataset_hashes("mnist-5k"), "mnist-5k")
    with pytest.raises(RRMError, match="1 training images are also in other's test split"):
        provenance.check_disjoint(train, {"test": train[3:4]}, "other")
    provenance.save_hashes(train, tmp_path, {"dataset": "digits"})
    saved, metadata = provenance.load_hashes(tmp_path)
    assert sorted(saved.tolist()) == sorted(train.tolist()) and metadata["dataset"] == "digits"


def test_the_bundled_teachers_never_saw_a_digit_of_the_embedded_set():
    """The bundled MNIST teachers (L-inf and L2) learned from MNIST training digits the embedded 5,000 do not hold;
    each ships its training images' pixel hashes, checked here against the embedded digits (no MNIST download)."""
    from rrm_hub.teachers.load import DEFAULT_TEACHER, L2_TEACHER

    embedded = provenance.dataset_hashes("mnist-5k")
    assert sum(len(h) for h in embedded.values()) == 5000
    for teacher in (DEFAULT_TEACHER, L2_TEACHER):
        shipped, metadata = provenance.load_hashes(teacher)
        assert len(shipped) == 54152 and metadata["split"] == "train[5848:]"
        assert metadata["disjoint_from"] == "mnist-5k"
        provenance.check_disjoint(shipped, embedded, "mnist-5k")  # raises on any shared digit
    with pytest.raises(RRMError, match="mnist-5k"):  # and the check can fail: the embedded digits against themselves
        provenance.check_disjoint(np.concatenate(list(embedded.values())), embedded, "mnist-5k")
