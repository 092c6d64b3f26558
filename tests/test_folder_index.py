"""Building an image-folder dataset opens no image file: the listing comes from an index, rebuilt when the folder
changes (engine/data/folder_index.py)."""

import logging
import sys
import threading
import time

import numpy as np
import pytest
from PIL import Image

from engine.data import folder_index
from engine.data.datasets import ImageFolderDataset, build_dataset

_events: list[tuple[str, str]] = []
_recording = threading.local()


def _audit(event: str, args: tuple) -> None:
    if getattr(_recording, "on", False) and event in ("open", "os.scandir") and args and args[0] is not None:
        _events.append((event, str(args[0])))


sys.addaudithook(_audit)  # hooks cannot be removed: this one records only inside `_recorded`


def _recorded(build):
    """Runs `build()`; returns its result and the (event, path) pairs it opened or listed."""
    _events.clear()
    _recording.on = True
    try:
        result = build()
    finally:
        _recording.on = False
    return result, list(_events)


def _image_opens(events, root) -> list[str]:
    return [path for event, path in events if event == "open" and path.startswith(str(root))
            and folder_index.INDEX_DIR not in path]


@pytest.mark.slow
def test_fifty_thousand_files_zero_opens_on_first_and_second_build(tmp_path):
    root = tmp_path / "train"
    for label in range(100):
        folder = root / f"n{label:08d}"
        folder.mkdir(parents=True)
        for index in range(500):
            (folder / f"{index:05d}.JPEG").touch()  # never opened, so they need not be images
    dataset, first = _recorded(lambda: build_dataset(tmp_path, "train"))
    assert len(dataset) == 50_000 and len(dataset.classes) == 100 and dataset.targets[-1] == 99
    assert _image_opens(first, root) == []
    again, second = _recorded(lambda: build_dataset(tmp_path, "train"))
    assert _image_opens(second, root) == [] and again.samples == dataset.samples
    # read from the index: the class folders are not listed (build_dataset looks into data_path for IDX files)
    assert [path for event, path in second if event == "os.scandir" and path.startswith(str(root))] == []


def _save(path, colour):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), colour).save(path)


def test_a_changed_folder_is_listed_again(tmp_path):
    for name in ("a0", "a1"):
        _save(tmp_path / "cat" / f"{name}.png", (200, 0, 0))
    _save(tmp_path / "dog" / "d0.png", (0, 0, 200))
    assert len(ImageFolderDataset(tmp_path)) == 3
    time.sleep(0.01)  # a distinct directory time on coarse clocks
    _save(tmp_path / "dog" / "deeper" / "d1.png", (0, 0, 200))  # a new subfolder inside a class
    dataset, events = _recorded(lambda: ImageFolderDataset(tmp_path))
    assert [path.rsplit("/", 1)[1] for path, _ in dataset.samples] == ["a0.png", "a1.png", "d0.png", "d1.png"]
    assert any(event == "os.scandir" for event, _ in events)
    (tmp_path / "cat" / "a1.png").unlink()
    assert dataset.targets != ImageFolderDataset(tmp_path).targets == [0, 1, 1]
    (tmp_path / "bird").mkdir()
    _save(tmp_path / "bird" / "b0.png", (0, 200, 0))
    assert ImageFolderDataset(tmp_path).classes == ["bird", "cat", "dog"]


def test_read_only_folder_keeps_its_index_in_the_cache(tmp_path, monkeypatch):
    _save(tmp_path / "data" / "x.png", (1, 2, 3))
    monkeypatch.setattr(folder_index, "CACHE_DIR", tmp_path / "cache")
    monkeypatch.setattr(folder_index.os, "access", lambda path, mode: False)
    assert len(ImageFolderDataset(tmp_path / "data")) == 1
    assert not (tmp_path / "data" / folder_index.INDEX_DIR).exists()
    assert len(list((tmp_path / "cache").glob("*.gz"))) == 1
    _, events = _recorded(lambda: ImageFolderDataset(tmp_path / "data"))
    assert [path for event, path in events if event == "os.scandir"] == []


def test_other_ranks_of_a_node_wait_for_the_first_ranks_index(tmp_path, monkeypatch):
    _save(tmp_path / "img.png", (1, 2, 3))
    root = tmp_path.resolve()
    writer = threading.Timer(0.3, folder_index.folder_listing, args=(root,))  # local rank 0, a little later
    writer.start()
    listing, events = _recorded(lambda: folder_index.folder_listing(root, local_rank=1))
    writer.join()
    assert [name for name, _ in listing.samples] == ["img.png"]
    assert [path for event, path in events if event == "os.scandir"] == []  # rank 1 read rank 0's index
    monkeypatch.setattr(folder_index, "INDEX_WAIT_S", 0.0)
    (root / folder_index.INDEX_DIR / folder_index.INDEX_NAME).unlink()
    assert len(folder_index.folder_listing(root, local_rank=1).samples) == 1  # no rank 0: lists itself


def test_an_undecodable_file_is_replaced_when_read_without_a_header_check(tmp_path, caplog):
    _save(tmp_path / "cat" / "c0.png", (200, 0, 0))
    (tmp_path / "cat" / "c1.jpg").write_bytes(b"not a jpeg")
    _save(tmp_path / "dog" / "d0.png", (0, 0, 200))
    dataset = ImageFolderDataset(tmp_path)
    assert len(dataset) == 3 and dataset.num_skipped == 0
    with caplog.at_level(logging.WARNING):
        image, label = dataset[1]
    assert label == 0 and tuple(image[0, 0]) == (200, 0, 0) and dataset.num_skipped == 1
    assert "cannot decode" in caplog.text


def test_index_of_another_folder_or_layout_is_not_used(tmp_path):
    _save(tmp_path / "a" / "x.png", (1, 2, 3))
    _save(tmp_path / "a" / "y.png", (1, 2, 3))
    assert ImageFolderDataset(tmp_path).layout == "classes"
    with pytest.raises(Exception, match="no readable image"):
        ImageFolderDataset(tmp_path, layout="flat")  # root holds no image itself: not the classes index
    copy = tmp_path.parent / (tmp_path.name + "-moved")
    tmp_path.rename(copy)
    dataset = ImageFolderDataset(copy)  # the index names the old path: listed again, paths under the new one
    assert all(path.startswith(str(copy)) for path, _ in dataset.samples)
    assert np.array_equal(dataset.targets, [0, 0])


def test_samples_are_a_table_of_arrays_not_a_list_of_objects():
    """ImageNet-22k's 14 M samples as a list of tuples would be copied into every DataLoader worker (reference counts
    un-share the pages); the table keeps them in a few arrays, and reads like the list it replaces."""
    from engine.data.datasets import SampleTable

    names = [f"n{i % 100:08d}/{i:08d}.JPEG" for i in range(50_000)]
    table = SampleTable("/data/train", names, [i % 100 for i in range(50_000)])
    assert {type(value) for value in vars(table).values()} <= {str, np.ndarray}
    assert len(table) == 50_000 and table[12345] == ("/data/train/n00000045/00012345.JPEG", 45)
    assert table[-1] == table[49_999] and table[:2] == [("/data/train/n00000000/00000000.JPEG", 0),
                                                        ("/data/train/n00000001/00000001.JPEG", 1)]
    with pytest.raises(IndexError):
        table[50_000]
    kept = table.keep(table.labels == 3)
    assert len(kept) == 500 and kept[1] == ("/data/train/n00000003/00000103.JPEG", 3)
    assert kept == list(kept) and kept != table
