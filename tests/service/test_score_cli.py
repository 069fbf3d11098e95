"""`vitserve score` gives the service's answers for the same images, from every kind of input and output."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from service.cli import main
from service.scoring.offline import read_results, score
from service.scoring.sources import ArchiveLimits

PHOTO_NAMES = ("astronaut", "coffee", "chelsea", "rocket")
TOP_K = 3


def photo(name: str, fmt: str, width: int = 128) -> bytes:
    import skimage.data

    image = Image.fromarray(getattr(skimage.data, name)()).convert("RGB")
    image.thumbnail((width, width))
    buf = io.BytesIO()
    image.save(buf, fmt)
    return buf.getvalue()


@pytest.fixture(scope="module")
def image_files() -> dict[str, bytes]:
    """Relative name -> bytes: photos in two formats and folders, one unreadable file."""
    files = {f"{name}.jpg": photo(name, "JPEG") for name in PHOTO_NAMES[:2]}
    files |= {f"more/{name}.png": photo(name, "PNG") for name in PHOTO_NAMES[2:]}
    files["more/broken.jpg"] = b"\xff\xd8\xff\xe0 truncated JPEG"
    return files


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, image_files) -> Path:
    folder = tmp_path_factory.mktemp("score") / "images"
    for name, data in image_files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    (folder / "more" / "notes.txt").write_text("not an image: folders skip it")
    return folder


@pytest.fixture(scope="module")
def classify(tiny_onnx, tmp_path_factory):
    """bytes -> the service's /v1/classify predictions (the in-process app, same model file)."""
    from fastapi.testclient import TestClient

    from service.core.settings import Settings
    from service.http.app import create_app

    settings = Settings(model=tiny_onnx, data_dir=tmp_path_factory.mktemp("score-data"))
    with TestClient(create_app(settings)) as client:
        while client.get("/readyz").status_code != 200:
            time.sleep(0.02)

        def answer(data: bytes) -> list[dict] | str:
            response = client.post(
                f"/v1/classify?top_k={TOP_K}", content=data, headers={"content-type": "application/octet-stream"}
            )
            return response.json()["predictions"] if response.status_code == 200 else response.json()["error"]["code"]

        yield answer


def assert_rows_match_service(rows: list[dict], bytes_of: dict[str, bytes], classify) -> None:
    assert sorted(r["path"] for r in rows) == sorted(bytes_of)  # every input once, none dropped
    for row in rows:
        expected = classify(bytes_of[row["path"]])
        if isinstance(expected, str):
            assert row["error"]["code"] == expected, row
        else:
            assert row["labels"] == [p["label"] for p in expected], row["path"]
            np.testing.assert_allclose(row["scores"], [p["probability"] for p in expected], rtol=1e-5, atol=1e-7)


def run_cli(*args: str) -> int:
    return main(["score", *args, "--top-k", str(TOP_K), "--quiet"])


def test_folder_glob_archive_and_manifest_give_the_service_answers(tiny_onnx, dataset, image_files, classify, tmp_path):
    # folder: names relative to it; the unreadable image is listed with the service's error code
    assert run_cli(str(dataset), "-o", str(tmp_path / "folder.jsonl"), "--model", str(tiny_onnx), "--workers", "0") == 0
    assert_rows_match_service(read_results(tmp_path / "folder.jsonl"), image_files, classify)

    # glob: names as matched
    pattern = str(dataset / "**" / "*.png")
    assert run_cli(pattern, "-o", str(tmp_path / "glob.csv"), "--model", str(tiny_onnx), "--workers", "0") == 0
    pngs = {str(dataset / n): d for n, d in image_files.items() if n.endswith(".png")}
    assert_rows_match_service(read_results(tmp_path / "glob.csv"), pngs, classify)

    # archives: member names
    with zipfile.ZipFile(tmp_path / "images.zip", "w") as archive:
        for name, data in image_files.items():
            archive.writestr(f"z/{name}", data)
    with tarfile.open(tmp_path / "images.tar.gz", "w:gz") as archive:
        archive.add(dataset, arcname="t")
    for archive, prefix in ((tmp_path / "images.zip", "z/"), (tmp_path / "images.tar.gz", "t/")):
        out = tmp_path / f"{archive.name}.jsonl"
        assert run_cli(str(archive), "-o", str(out), "--model", str(tiny_onnx), "--workers", "0") == 0
        assert_rows_match_service(read_results(out), {prefix + n: d for n, d in image_files.items()}, classify)

    # manifest: paths relative to the manifest, names as written (a missing file is listed, not dropped)
    manifest = dataset.parent / "list.jsonl"
    names = [f"images/{n}" for n in image_files] + ["images/gone.jpg"]
    manifest.write_text("".join(json.dumps({"path": n}) + "\n" for n in names))
    assert (
        run_cli(str(manifest), "-o", str(tmp_path / "manifest.parquet"), "--model", str(tiny_onnx), "--workers", "0")
        == 0
    )
    rows = read_results(tmp_path / "manifest.parquet")
    assert [r["path"] for r in rows] == names  # input order is kept
    assert rows[-1]["error"]["code"] == "unreadable"
    assert_rows_match_service(rows[:-1], {f"images/{n}": d for n, d in image_files.items()}, classify)


def test_the_command_with_worker_processes_and_a_progress_bar(tiny_onnx, dataset, tmp_path):
    reference = tmp_path / "threads.jsonl"
    score(str(dataset), reference, model=tiny_onnx, workers=0, top_k=TOP_K, progress_stream=None)
    out = tmp_path / "processes.jsonl"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "service.cli",
            "score",
            str(dataset),
            "-o",
            str(out),
            "--model",
            str(tiny_onnx),
            "--workers",
            "2",
            "--batch-size",
            "2",
            "--top-k",
            str(TOP_K),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "img/s" in done.stderr and "ETA" in done.stderr
    assert "4 scored, 1 unreadable" in done.stderr
    assert read_results(out) == read_results(reference)


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".parquet"])
def test_resume_skips_what_the_output_holds(tiny_onnx, dataset, tmp_path, suffix):
    full = tmp_path / f"full{suffix}"
    summary = score(str(dataset), full, model=tiny_onnx, top_k=TOP_K, progress_stream=None)
    assert (summary.total, summary.scored, summary.failed, summary.skipped) == (5, 4, 1, 0)
    expected = read_results(full)

    partial = tmp_path / f"partial{suffix}"
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        pq.write_table(pq.read_table(full).slice(0, 2), partial)
    else:
        lines = full.read_text().splitlines(keepends=True)
        keep = 3 if suffix == ".csv" else 2  # the CSV header + two rows
        partial.write_text("".join(lines[:keep]) + lines[keep][:25])  # and a line cut short by a crash
    summary = score(str(dataset), partial, model=tiny_onnx, top_k=TOP_K, resume=True, progress_stream=None)
    assert (summary.skipped, summary.scored + summary.failed) == (2, 3)
    assert read_results(partial) == expected  # every image once; the torn line was scored again

    again = score(str(dataset), partial, model=tiny_onnx, top_k=TOP_K, resume=True, progress_stream=None)
    assert (again.skipped, again.scored, again.failed) == (5, 0, 0)
    assert read_results(partial) == expected


def test_bad_inputs_are_reported_not_crashed(tiny_onnx, dataset, tmp_path, capsys):
    with zipfile.ZipFile(tmp_path / "evil.zip", "w") as archive:
        archive.writestr("../../evil.jpg", b"x")
    assert run_cli(str(tmp_path / "evil.zip"), "-o", str(tmp_path / "o.jsonl"), "--model", str(tiny_onnx)) == 2
    assert "outside the archive" in capsys.readouterr().err
    assert run_cli(str(tmp_path / "nothing-here"), "-o", str(tmp_path / "o.jsonl"), "--model", str(tiny_onnx)) == 2
    assert run_cli(str(tmp_path), "-o", str(tmp_path / "o.txt"), "--model", str(tiny_onnx)) == 2
    csv_out = tmp_path / "topk.csv"
    csv_out.write_text("path,label_1,score_1,error_code,error\n")
    assert run_cli(str(dataset), "-o", str(csv_out), "--model", str(tiny_onnx), "--resume") == 2
    assert "--top-k" in capsys.readouterr().err


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".parquet"])
def test_rows_name_their_model_and_resume_with_another_model_is_refused(tiny_onnx, dataset, tmp_path, suffix, capsys):
    import hashlib
    import shutil

    from service.runtime.engine import Engine

    meta = Engine(tiny_onnx, providers="cpu", log_placement=False).metadata
    # The test export records no source hash, so the file's own is the weights hash.
    weights = meta.weights_sha256 or hashlib.sha256(tiny_onnx.read_bytes()).hexdigest()
    out = tmp_path / f"rows{suffix}"
    assert run_cli(str(dataset), "-o", str(out), "--model", str(tiny_onnx), "--workers", "0") == 0
    assert f"model '{meta.served_name}' (weights {weights[:12]}): 4 scored" in capsys.readouterr().err
    rows = read_results(out)
    assert {(r["model"], r["weights_sha256"]) for r in rows} == {(meta.served_name, weights)}

    # The same weights served under another name (a sidecar names the copy) are another model here.
    other = tmp_path / "other.onnx"
    shutil.copy(tiny_onnx, other)
    (tmp_path / "other.onnx.json").write_text('{"name": "tiny-finetune"}')
    before = out.read_bytes()
    assert run_cli(str(dataset), "-o", str(out), "--model", str(other), "--resume", "--workers", "0") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert f"holds results of model '{meta.served_name}'" in err and "'tiny-finetune'" in err
    assert out.read_bytes() == before  # nothing appended, nothing truncated


def test_resume_refuses_a_file_that_does_not_name_its_model(tiny_onnx, dataset, tmp_path, capsys):
    old = tmp_path / "old.jsonl"
    old.write_text(json.dumps({"path": "coffee.jpg", "labels": ["a"], "scores": [1.0]}) + "\n")
    assert run_cli(str(dataset), "-o", str(old), "--model", str(tiny_onnx), "--resume", "--workers", "0") == 2
    assert "holds results that do not name their model" in capsys.readouterr().err


def test_an_empty_folder_and_an_unmatched_glob_exit_non_zero(tiny_onnx, tmp_path, capsys):
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "sub" / "notes.txt").write_text("no images here")
    assert run_cli(str(empty), "-o", str(tmp_path / "o.jsonl"), "--model", str(tiny_onnx)) == 2
    err = capsys.readouterr().err
    assert "no images in this folder (image files end in " in err and ".jpg" in err
    assert not (tmp_path / "o.jsonl").exists()
    assert run_cli(str(empty / "*.jpg"), "-o", str(tmp_path / "o.jsonl"), "--model", str(tiny_onnx)) == 2
    assert "no file matches this pattern" in capsys.readouterr().err


def test_a_plain_text_manifest_and_a_dot_tarball(tiny_onnx, dataset, image_files, classify, tmp_path):
    manifest = dataset.parent / "list.txt"
    manifest.write_text("".join(f"images/{n}\n" for n in image_files))
    out = tmp_path / "manifest.jsonl"
    assert run_cli(str(manifest), "-o", str(out), "--model", str(tiny_onnx), "--workers", "0") == 0
    assert_rows_match_service(read_results(out), {f"images/{n}": d for n, d in image_files.items()}, classify)

    tarball = tmp_path / "photos.tgz"
    subprocess.run(["tar", "-czf", str(tarball), "-C", str(dataset), "."], check=True, timeout=60)
    out = tmp_path / "tarball.jsonl"
    assert run_cli(str(tarball), "-o", str(out), "--model", str(tiny_onnx), "--workers", "0") == 0
    assert_rows_match_service(read_results(out), image_files, classify)  # names without "./"


def test_finetune_score_and_jobs_take_the_same_image_files(tmp_path):
    from model.datasets import scan_image_folder
    from service.core.image_files import IMAGE_SUFFIXES
    from service.scoring.offline import resolve_inputs
    from service.scoring.sources import extract_archive, list_archive

    names = sorted(f"x{suffix}" for suffix in IMAGE_SUFFIXES) + ["X.JPG"]
    for label in ("cat", "dog"):  # fine-tuning needs two classes
        (tmp_path / "data" / label).mkdir(parents=True)
        for name in [*names, "notes.txt", ".hidden.jpg"]:
            (tmp_path / "data" / label / name).write_bytes(b"pixels are not read here")
    with tarfile.open(tmp_path / "data.tar", "w") as archive:
        archive.add(tmp_path / "data", arcname=".")
    expected = sorted(f"{label}/{n}" for label in ("cat", "dog") for n in names)
    assert sorted(p.relative_to(tmp_path / "data").as_posix() for p in scan_image_folder(tmp_path / "data").paths) == (
        expected
    )
    assert sorted(resolve_inputs(str(tmp_path / "data")).names) == expected
    assert sorted(list_archive(tmp_path / "data.tar", ArchiveLimits())) == expected
    assert extract_archive(tmp_path / "data.tar", tmp_path / "job", ArchiveLimits()) == expected
