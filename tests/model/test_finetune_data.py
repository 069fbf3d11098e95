"""Datasets for fine-tuning: image folders, CSV files, the errors that name the problem, the split, digits."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from model.config import ViTConfig
from model.datasets import (
    DatasetError,
    decode_image,
    load_images,
    read_csv_dataset,
    scan_dataset,
    scan_image_folder,
    stratified_split,
)
from model.finetune import FinetuneOptions, finetune
from model.native import save_native
from model.vit import VisionTransformer
from scripts.digits_data import digits_split, render_digit
from service.core.metadata import Preprocessing

P32 = Preprocessing(32, 32, "shortest", "bilinear", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


def write_image(path: Path, colour=(200, 30, 30), size=(40, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


def folder(root: Path, layout: dict[str, int]) -> Path:
    for name, count in layout.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            write_image(root / name / f"{i}.png", colour=(20 * i, 100, 200))
    return root


def test_image_folder_scan_orders_classes_and_ignores_non_images(tmp_path):
    root = folder(tmp_path / "d", {"cat": 2, "dog": 3})
    (root / "cat" / "notes.txt").write_text("not an image")
    write_image(root / "dog" / "nested" / "deep.JPG")
    (root / ".hidden").mkdir()
    files = scan_image_folder(root)
    assert files.classes == ("cat", "dog")
    assert len(files) == 6 and files.targets.count(0) == 2 and files.targets.count(1) == 4


def test_integer_class_names_sort_numerically(tmp_path):
    files = scan_image_folder(folder(tmp_path / "d", {"2": 1, "10": 1, "1": 1}))
    assert files.classes == ("1", "2", "10")


def test_empty_class_folders_are_named(tmp_path):
    root = folder(tmp_path / "d", {"cat": 2, "dog": 0, "eel": 0})
    (root / "eel" / "readme.txt").write_text("no images here")
    with pytest.raises(DatasetError, match=r"2 empty class folder\(s\).*: dog, eel"):
        scan_image_folder(root)


def test_single_class_and_no_class_are_errors(tmp_path):
    with pytest.raises(DatasetError, match=r"only one class \('cat'\)"):
        scan_image_folder(folder(tmp_path / "one", {"cat": 3}))
    write_image(tmp_path / "flat" / "a.png")
    with pytest.raises(DatasetError, match="no class folders"):
        scan_image_folder(tmp_path / "flat")
    with pytest.raises(DatasetError, match="no such dataset"):
        scan_dataset(tmp_path / "missing")


def test_csv_dataset_relative_paths_header_and_errors(tmp_path):
    write_image(tmp_path / "img" / "a.png")
    write_image(tmp_path / "img" / "b.png")
    csv_path = tmp_path / "labels.csv"
    csv_path.write_text("path,label\nimg/a.png,yes\n\nimg/b.png,no\n" + f"{tmp_path / 'img' / 'a.png'},no\n")
    files = scan_dataset(csv_path)
    assert files.classes == ("no", "yes")
    assert files.paths[0] == tmp_path / "img" / "a.png" and files.targets == (1, 0, 0)

    bad = tmp_path / "bad.csv"
    bad.write_text("img/a.png,yes\nimg/b.png\n")
    with pytest.raises(DatasetError, match=r"bad.csv:2: expected 'path,label'"):
        read_csv_dataset(bad)
    single = tmp_path / "single.csv"
    single.write_text("img/a.png,yes\nimg/b.png,yes\n")
    with pytest.raises(DatasetError, match="only one class"):
        read_csv_dataset(single)


@pytest.mark.parametrize("budget", [2**40, 0], ids=["preloaded", "streamed"])
def test_unreadable_images_are_skipped_counted_and_listed(tmp_path, budget):
    root = folder(tmp_path / "d", {"cat": 3, "dog": 3})
    (root / "cat" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (root / "dog" / "empty.jpg").write_bytes(b"")
    files = scan_image_folder(root)
    dataset, kept, report = load_images(files, P32, preload_budget_bytes=budget)
    assert len(kept) == len(dataset) == 6
    assert sorted(p.name for p, _ in report.skipped) == ["broken.png", "empty.jpg"]
    text = report.describe()
    assert text.startswith("skipped 2 unreadable image(s):") and "broken.png" in text and "empty.jpg" in text
    pixels, target = dataset[0]
    assert pixels.shape == (3, 32, 32) and pixels.dtype == torch.float32 and int(target) == 0


def test_finetune_reports_skipped_images_and_class_count_mismatch(tmp_path):
    config = ViTConfig(
        image_size=32,
        patch_size=8,
        embed_dim=16,
        depth=1,
        num_heads=2,
        mlp_dim=32,
        num_classes=2,
        name="vit_test_patch8_32",
    )
    base = save_native(tmp_path / "base", VisionTransformer(config), config, ["x", "y"], P32)
    root = folder(tmp_path / "d", {"cat": 4, "dog": 4})
    (root / "dog" / "corrupt.png").write_bytes(b"garbage")
    lines: list[str] = []
    result = finetune(
        str(base), root, tmp_path / "out", FinetuneOptions(mode="linear", val_split=0.0), log=lines.append
    )
    assert [Path(p).name for p, _ in result.skipped] == ["corrupt.png"]
    assert any("skipped 1 unreadable image(s)" in line and "corrupt.png" in line for line in lines)
    with pytest.raises(DatasetError, match=r"--num-classes is 3 but the dataset has 2 classes: cat, dog"):
        finetune(str(base), root, tmp_path / "out2", FinetuneOptions(mode="linear"), num_classes=3)

    (root / "cat").rename(tmp_path / "cat_moved")
    folder(root, {"cat": 0})
    for i in range(2):
        (root / "cat" / f"{i}.png").write_bytes(b"not a png")
    with pytest.raises(DatasetError, match="no readable images left for class.*cat"):
        finetune(str(base), root, tmp_path / "out3", FinetuneOptions(mode="linear"), log=lambda line: None)


def test_stratified_split_is_deterministic_and_keeps_every_class_on_both_sides():
    targets = [0] * 50 + [1] * 20 + [2] * 3
    train, held = stratified_split(targets, 0.2, seed=7)
    assert (train, held) == stratified_split(targets, 0.2, seed=7)
    assert (train, held) != stratified_split(targets, 0.2, seed=8)
    assert sorted(train + held) == list(range(len(targets)))
    counts = np.bincount([targets[i] for i in held])
    assert counts.tolist() == [10, 4, 1]
    assert stratified_split(targets, 0.0, seed=0) == (list(range(len(targets))), [])


def test_digits_are_dark_ink_on_white_and_the_split_holds_out_a_fifth():
    images, targets, train, held = digits_split()
    assert len(images) == 1797 and not set(train) & set(held)
    assert len(held) in (359, 360) and sorted(train + held) == list(range(1797))
    rendered = np.asarray(render_digit(images[0]))
    assert rendered.shape == (32, 32, 3)
    assert rendered[0, 0].tolist() == [255, 255, 255]  # the corner of a digit is paper
    assert rendered.min() < 40  # and there is dark ink


def test_decode_uses_the_service_preprocessing(tmp_path):
    """Training pixels are exactly the service's: same bytes in, same array out."""
    from service.runtime.preprocess import load_pixels

    path = write_image(tmp_path / "a.png", size=(64, 48))
    expected = load_pixels(path.read_bytes(), P32, max_pixels=10_000)
    np.testing.assert_array_equal(decode_image(path, P32), expected)


def test_finetune_reads_a_csv_dataset(tmp_path):
    config = ViTConfig(
        image_size=32,
        patch_size=8,
        embed_dim=16,
        depth=1,
        num_heads=2,
        mlp_dim=32,
        num_classes=2,
        name="vit_test_patch8_32",
    )
    base = save_native(tmp_path / "base", VisionTransformer(config), config, ["x", "y"], P32)
    rows = ["path,label"]
    for i in range(6):
        write_image(tmp_path / "imgs" / f"{i}.png", colour=(250, 250, 250) if i % 2 else (10, 10, 10))
        rows.append(f"imgs/{i}.png,{'light' if i % 2 else 'dark'}")
    (tmp_path / "data.csv").write_text("\n".join(rows) + "\n")
    result = finetune(
        str(base),
        tmp_path / "data.csv",
        tmp_path / "out",
        FinetuneOptions(mode="linear", val_split=0.0),
        log=lambda line: None,
    )
    assert result.classes == ("dark", "light") and result.num_train == 6
    assert result.history[0]["train_accuracy"] == 1.0
