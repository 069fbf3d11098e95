"""`vitserve score --ray`: a local Ray instance (2 CPUs, started here) gives the same results as without Ray."""

from __future__ import annotations

import json
import tarfile

import pytest
from PIL import Image

from service.scoring.offline import read_results, score

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ray_local():
    import ray  # the `ray` extra is in the test extra: never skipped

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    import skimage.data

    folder = tmp_path_factory.mktemp("ray") / "images"
    (folder / "sub").mkdir(parents=True)
    for i, name in enumerate(("astronaut", "coffee", "chelsea", "rocket", "camera", "moon")):
        image = Image.fromarray(getattr(skimage.data, name)())
        image.thumbnail((160, 160))
        image.save(folder / ("sub" if i % 2 else "") / f"{name}.{'png' if i % 3 else 'jpg'}")
    (folder / "sub" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n cut")
    return folder


def test_ray_results_equal_local_results_for_a_folder_an_archive_and_a_manifest(
    ray_local, tiny_onnx, dataset, tmp_path
):
    from service.cli import main
    from service.scoring.ray_scoring import score_with_ray

    with tarfile.open(tmp_path / "images.tar", "w") as archive:
        archive.add(dataset, arcname="images")
    manifest = dataset.parent / "list.jsonl"
    manifest.write_text(
        "".join(json.dumps(f"images/{p.relative_to(dataset).as_posix()}") + "\n" for p in sorted(dataset.rglob("*.*")))
    )
    for spec in (str(dataset), str(tmp_path / "images.tar"), str(manifest)):
        local = tmp_path / "local.jsonl"
        score(spec, local, model=tiny_onnx, top_k=4, batch_size=3, progress_stream=None)
        on_ray = tmp_path / "ray.jsonl"
        summary = score_with_ray(spec, on_ray, model=tiny_onnx, top_k=4, batch_size=3, progress_stream=None)
        assert (summary.scored, summary.failed) == (6, 1)
        # Ray returns batches in completion order; the rows themselves must be identical.
        assert sorted(read_results(on_ray), key=lambda r: r["path"]) == sorted(
            read_results(local), key=lambda r: r["path"]
        )

    # the CLI flag, CSV output and --resume on top of a partial file
    out = tmp_path / "ray.csv"
    full = tmp_path / "local.csv"
    score(str(dataset), full, model=tiny_onnx, top_k=4, progress_stream=None)
    out.write_text("".join(full.read_text().splitlines(keepends=True)[:3]))
    assert (
        main(
            [
                "score",
                str(dataset),
                "-o",
                str(out),
                "--model",
                str(tiny_onnx),
                "--top-k",
                "4",
                "--ray",
                "--resume",
                "--quiet",
            ]
        )
        == 0
    )
    assert sorted(read_results(out), key=lambda r: r["path"]) == sorted(read_results(full), key=lambda r: r["path"])
