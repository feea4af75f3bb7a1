import datasets
import pytest
import torch
from PIL import Image

from rrm_hub import EMBEDDED_MNIST, RRMError, load_image_data, make_loader
from rrm_hub.data import cache_dir


def test_embedded_mnist_split_is_fixed_and_stratified(mnist):
    assert mnist.name == EMBEDDED_MNIST
    assert (len(mnist.train), len(mnist.test)) == (4000, 1000)
    assert mnist.num_classes == 10 and mnist.image_mode == "L" and mnist.image_size == (28, 28)
    counts = torch.bincount(torch.tensor(mnist.train["label"]), minlength=10)
    assert counts.tolist() == [400] * 10
    assert (cache_dir() / "datasets" / EMBEDDED_MNIST / "dataset_dict.json").exists()
    again = load_image_data()  # from the cache: the same split
    assert again.test["label"] == mnist.test["label"]


def test_a_slice_of_the_training_split_trains_on_part_of_it(mnist):
    first = load_image_data(train_split="train[:1000]")
    assert len(first.train) == 1000 and first.train["label"] == mnist.train["label"][:1000]
    assert first.test["label"] == mnist.test["label"]  # the test split is the same
    assert load_image_data(train_split="train[:10%]").train["label"] == mnist.train["label"][:400]
    assert load_image_data(train_split="train[3900:]").train["label"] == mnist.train["label"][3900:]
    for bad, message in (("train[a]", "not a split or a slice of one"), ("tran[:5]", "no split 'tran'"),
                         ("train[9000:]", "selects no images of the 4000")):
        with pytest.raises(RRMError, match=message):
            load_image_data(train_split=bad)


def test_loader_gives_pixels_in_unit_range(mnist):
    x, y = next(iter(make_loader(mnist, "train", 64, augment=True)))
    assert x.shape == (64, 1, 28, 28) and x.dtype == torch.float32
    assert x.min() >= 0 and x.max() <= 1 and x.max() > 0.9
    assert y.dtype == torch.int64 and 0 <= int(y.min()) and int(y.max()) <= 9
    first = next(iter(make_loader(mnist, "test", 5)))[0]
    assert torch.equal(first, next(iter(make_loader(mnist, "test", 5)))[0])  # eval transform is deterministic


def _write_imagefolder(root, classes=("cat", "dog"), n=3, size=12, mode="RGB"):
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(n):
            Image.new(mode, (size, size), color=(40 * c + i) if mode == "L" else (40 * c, i, 0)).save(
                root / name / f"{i}.png")


def test_imagefolder_and_saved_dataset(tmp_path):
    _write_imagefolder(tmp_path / "folder", n=5)
    data = load_image_data(str(tmp_path / "folder"), image_size=16)
    assert data.class_names == ["cat", "dog"] and data.image_mode == "RGB"
    assert len(data.train) + len(data.test) == 10  # no test split: 20% held out
    x, _ = next(iter(make_loader(data, "test", 4)))
    assert x.shape[1:] == (3, 16, 16)

    ds = datasets.Dataset.from_dict({"picture": [Image.new("L", (8, 8))] * 4, "target": [0, 1, 2, 1]})
    ds.save_to_disk(str(tmp_path / "saved"))
    data = load_image_data(str(tmp_path / "saved"), image_column="picture", label_column="target")
    assert data.num_classes == 3 and data.image_column == "picture"


def test_unlabeled_passes_start_anywhere_with_the_images_a_stream_from_0_gives_there(mnist):
    from itertools import islice

    from rrm_hub.data.loaders import ShuffledPasses

    data = load_image_data(train_split="train[:1000]", unlabeled_split="train[:10%]")  # 400 unlabeled images
    passes = ShuffledPasses(make_loader(data, "unlabeled", 64, augment=True, seed=3, pad=2), seed=3)
    whole = torch.cat(list(islice(passes.batches(), 16)))  # two passes of 7 batches (6 of 64, one of 16), and two more
    assert whole.shape == (928, 1, 28, 28)
    order = passes.order(0)
    assert sorted(sum(order, [])) == list(range(400)) and [len(b) for b in order] == [64] * 6 + [16]
    assert order != passes.order(1) and not torch.equal(whole[:400], whole[400:800])  # each pass its own order
    for start in (0, 5, 64, 390, 400, 530):  # inside a batch, at a batch, across the end of a pass
        later = torch.cat(list(islice(passes.batches(start), 3)))
        assert torch.equal(later, whole[start:start + len(later)]), start


def test_unlabeled_images_of_another_dataset_a_folder_of_images_none_of_them_a_test_image(mnist, tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(6):  # training digits as a folder of files, no classes; one larger and in colour
        mnist.train[i]["image"].save(folder / f"{i}.png")
    Image.new("RGB", (40, 40), (200, 10, 10)).save(folder / "big.png")
    data = load_image_data(train_split="train[:1000]", unlabeled_dataset=str(folder))
    assert len(data.unlabeled) == 7 and data.unlabeled.column_names == ["image"]
    images, labels = next(iter(make_loader(data, "unlabeled", 7, augment=True)))
    assert images.shape == (7, 1, 28, 28) and labels.tolist() == [-1] * 7  # seen as the training images are
    mnist.test[3]["image"].save(folder / "leak.png")  # (a file named test.* would make a split of its own)
    with pytest.raises(RRMError, match="1 images of --unlabeled-dataset .* are also test images"):
        load_image_data(unlabeled_dataset=str(folder))
    with pytest.raises(RRMError, match="name a split of --unlabeled-dataset"):
        load_image_data(unlabeled_dataset=str(folder), unlabeled_split="rest")
    with pytest.raises(RRMError, match="no split 'unlabeled'.*fix --unlabeled-split"):
        load_image_data(unlabeled_dataset=str(folder), unlabeled_split="unlabeled")
    (folder / "leak.png").write_bytes(b"\x89PNG broken")  # unreadable: skipped by the check, as by the loaders
    assert len(load_image_data(unlabeled_dataset=str(folder)).unlabeled) == 8

    # a dataset of other columns and splits: its image column renamed, its labels dropped
    rows = datasets.Dataset.from_dict({"img": [mnist.train[i]["image"] for i in range(4)], "label": [9, 9, 9, 9]})
    rows = rows.cast_column("img", datasets.Image())
    datasets.DatasetDict({"a": rows, "b": rows}).save_to_disk(str(tmp_path / "other"))
    with pytest.raises(RRMError, match="has no train split: name one of its splits \\(a, b\\) with"):
        load_image_data(unlabeled_dataset=str(tmp_path / "other"))
    other = load_image_data(unlabeled_dataset=str(tmp_path / "other"), unlabeled_split="b").unlabeled
    assert other.column_names == ["image"] and len(other) == 4
    with pytest.raises(RRMError, match="'b\\[4:\\]' selects no images"):
        load_image_data(unlabeled_dataset=str(tmp_path / "other"), unlabeled_split="b[4:]")


def test_missing_columns_and_sources_are_one_line_errors(tmp_path):
    ds = datasets.Dataset.from_dict({"text": ["a", "b", "c", "d", "e"], "label": [0, 1, 0, 1, 0]})
    ds.save_to_disk(str(tmp_path / "text"))
    with pytest.raises(RRMError, match="no image column.*--image-column"):
        load_image_data(str(tmp_path / "text"))
    with pytest.raises(RRMError, match="no column 'img'"):
        load_image_data(str(tmp_path / "text"), image_column="img")
    images = datasets.Dataset.from_dict({"image": [Image.new("L", (8, 8))] * 5})
    images.save_to_disk(str(tmp_path / "unlabeled"))
    with pytest.raises(RRMError, match="no label column.*--label-column"):
        load_image_data(str(tmp_path / "unlabeled"))
    with pytest.raises(RRMError, match="could not load dataset 'no-such/dataset-xyz'"):
        load_image_data("no-such/dataset-xyz")


def test_unlabeled_images_are_the_split_named_or_the_rest_of_the_training_split(mnist):
    data = load_image_data(train_split="train[:1000]", unlabeled_split="rest")
    assert len(data.unlabeled) == 3000 and data.unlabeled["label"] == mnist.train["label"][1000:]
    middle = load_image_data(train_split="train[1000:3000]", unlabeled_split="rest")
    assert middle.unlabeled["label"] == mnist.train["label"][:1000] + mnist.train["label"][3000:]
    assert len(load_image_data(unlabeled_split="train[:10%]").unlabeled) == 400
    images, labels = next(iter(make_loader(data, "unlabeled", 8, augment=True)))
    assert images.shape == (8, 1, 28, 28) and 0 <= images.min() and images.max() <= 1
    for spec, message in (("rest", "takes every image of 'train'"), ("test", "where the test images come from"),
                          ("test[:10]", "where the test images come from")):
        with pytest.raises(RRMError, match=message):
            load_image_data(unlabeled_split=spec)
    with pytest.raises(RRMError, match="leaves none"):
        load_image_data(train_split="train[:100%]", unlabeled_split="rest")
