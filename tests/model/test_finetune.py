"""Fine-tuning: the ridge probe against scikit-learn, the three modes end to end, resume, the CLI.

Every run here uses a tiny ViT (32 px, patch 8, D=32, depth 2) saved as a native checkpoint, and
images the test makes itself (crops of real photos, or coloured noise), so each run takes seconds.
"""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from checkpoint_testlib import randomize
from PIL import Image

from model.checkpoint import import_checkpoint, load_native
from model.config import ViTConfig
from model.finetune import STATE_NAME, FinetuneError, FinetuneOptions, finetune
from model.native import save_native
from model.probe import fit_ridge
from model.vit import VisionTransformer
from service.core.metadata import Preprocessing

TINY = ViTConfig(
    image_size=32,
    patch_size=8,
    embed_dim=32,
    depth=2,
    num_heads=2,
    mlp_dim=64,
    num_classes=5,
    name="vit_test_patch8_32",
)
TINY_PREPROCESSING = Preprocessing(32, 32, "shortest", "bilinear", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    """A tiny random ViT with a 5-class head, as a native checkpoint (the 'pre-trained' model)."""
    # O(1) random weights (not timm's std 0.02 init) so the features depend on the image, as trained ones do.
    model = randomize(VisionTransformer(TINY))
    directory = tmp_path_factory.mktemp("base")
    return save_native(directory, model, TINY, list("abcde"), TINY_PREPROCESSING, source="test")


@pytest.fixture(scope="module")
def photo_crops(tmp_path_factory, photo_arrays) -> Path:
    """ImageFolder of 3 classes (astronaut, coffee, chelsea), 8 random crops of each photo, PNG and JPEG."""
    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    for name in ("astronaut", "coffee", "chelsea"):
        photo = photo_arrays[name]
        (root / name).mkdir()
        for i in range(8):
            side = int(rng.integers(120, 220))
            y, x = (int(rng.integers(0, photo.shape[k] - side)) for k in (0, 1))
            crop = Image.fromarray(photo[y : y + side, x : x + side])
            crop.save(root / name / f"{i}.{'png' if i % 2 else 'jpg'}")
    return root


def colour_dataset(root: Path, per_class: int = 12) -> Path:
    """4 classes, each a different colour plus pixel noise: separable by construction."""
    rng = np.random.default_rng(1)
    colours = {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (40, 60, 220), "grey": (128, 128, 128)}
    for name, colour in colours.items():
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = np.clip(np.asarray(colour) + rng.normal(0, 25, (40, 40, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    return root


# --- the ridge probe -------------------------------------------------------------------------------


def test_ridge_solution_matches_sklearn():
    """At a fixed lambda our closed form is scikit-learn's Ridge on {-1, 1}^K targets, intercept unpenalised."""
    from sklearn.linear_model import Ridge

    rng = np.random.default_rng(0)
    x = rng.normal(size=(80, 12)) * rng.uniform(0.1, 3, size=12)
    y = rng.integers(0, 4, size=80)
    fit = fit_ridge(x, y, 4, relative_lambdas=[0.3])
    reference = Ridge(alpha=fit.lam, fit_intercept=True, solver="svd").fit(x, 2.0 * np.eye(4)[y] - 1.0)
    np.testing.assert_allclose(fit.weight, reference.coef_, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(fit.bias, reference.intercept_, rtol=1e-8, atol=1e-10)


def test_ridge_probe_separates_clusters_and_picks_lambda_by_cv():
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 4, size=(5, 16))  # (K, D)

    def sample(n):
        y = rng.integers(0, 5, size=n)
        return centres[y] + rng.normal(0, 1, size=(n, 16)), y

    x_train, y_train = sample(100)
    x_test, y_test = sample(500)
    fit = fit_ridge(x_train, y_train, 5)
    assert fit.weight.shape == (5, 16) and fit.bias.shape == (5,)
    assert fit.cv_accuracy >= 0.95
    accuracy = np.mean((x_test @ fit.weight.T + fit.bias).argmax(axis=1) == y_test)
    assert accuracy >= 0.98


def test_linear_mode_fits_head_on_frozen_backbone(base_dir, tmp_path):
    data = colour_dataset(tmp_path / "colours")
    result = finetune(
        str(base_dir), data, tmp_path / "out", FinetuneOptions(mode="linear", val_split=0.25), log=lambda line: None
    )
    assert result.classes == ("blue", "green", "grey", "red")
    assert result.num_val == 12 and result.val_accuracy == 1.0
    base, tuned = load_native(base_dir), load_native(tmp_path / "out")
    assert tuned.model.head.weight.shape == (4, TINY.embed_dim)  # K x D
    assert tuned.labels == result.classes
    base_sd, tuned_sd = base.model.state_dict(), tuned.model.state_dict()
    backbone = [k for k in base_sd if not k.startswith("head.")]
    assert backbone and all(torch.equal(base_sd[k], tuned_sd[k]) for k in backbone)
    assert tuned.extra["finetune"]["history"][0]["ridge_lambda"] > 0


def test_augmentation_is_identity_at_zero_strength_and_shrinks_content_below_scale_1():
    from model.finetune import augment_batch

    image = torch.ones(2, 3, 32, 32)  # white paper in normalised units
    image[:, :, 8:24, 8:24] = -1.0  # a dark 16 x 16 square in the middle
    same = augment_batch(image, torch.Generator().manual_seed(0), rotation_deg=0, scale=(1, 1), shift=0)
    torch.testing.assert_close(same, image, atol=1e-5, rtol=0)
    half = augment_batch(image, torch.Generator().manual_seed(0), rotation_deg=0, scale=(0.5, 0.5), shift=0)
    dark = (half[:, 0] < 0).sum(dim=(1, 2)).float()  # (B,) dark pixels per image
    torch.testing.assert_close(dark, torch.full((2,), 64.0))  # 16 x 16 shrunk to 8 x 8
    assert torch.all(half[:, :, 0, 0] == 1.0)  # borders replicated: the paper stays white


# --- gradient training ----------------------------------------------------------------------------


def _dataset_loss(loaded, data: Path) -> float:
    """Mean cross-entropy of a loaded checkpoint over every image of an ImageFolder (no augmentation)."""
    from model.datasets import decode_image, scan_image_folder

    files = scan_image_folder(data)
    pixels = torch.from_numpy(np.stack([decode_image(p, loaded.preprocessing) for p in files.paths]))
    with torch.no_grad():
        logits = loaded.model(pixels)
    return torch.nn.functional.cross_entropy(logits, torch.tensor(files.targets)).item()


@pytest.mark.slow
def test_full_mode_at_another_resolution_lowers_loss_loads_and_exports(base_dir, photo_crops, tmp_path):
    options = FinetuneOptions(
        mode="full", epochs=2, batch_size=4, lr=3e-3, warmup_fraction=0.0, augment=False, val_split=0.25, seed=0
    )
    out = tmp_path / "tuned"
    result = finetune(str(base_dir), photo_crops, out, options, num_classes=3, image_size=48, log=lambda line: None)
    losses = [h["train_loss"] for h in result.history]
    assert len(losses) == 2 and losses[1] < losses[0]
    assert not (out / STATE_NAME).exists()  # removed once the final checkpoint is written

    loaded = import_checkpoint(str(out))
    assert loaded.config.image_size == 48 and loaded.model.pos_embed.shape == (1, 37, TINY.embed_dim)
    assert loaded.preprocessing.image_size == 48
    assert loaded.labels == ("astronaut", "chelsea", "coffee")
    # The fresh head starts at zero, so the untrained loss is exactly ln K; training must beat it.
    assert _dataset_loss(loaded, photo_crops) < math.log(3) - 0.02

    from model.export import export_checkpoint
    from model.verify import inspect_export

    export_result, report = export_checkpoint(str(out), tmp_path / "tuned.onnx", verify=True)
    assert report is not None and report.passed
    assert inspect_export(export_result.path).metadata.labels == loaded.labels


def test_head_mode_trains_only_the_head(base_dir, photo_crops, tmp_path):
    options = FinetuneOptions(mode="head", epochs=2, batch_size=8, lr=1e-2, augment=True, val_split=0.0)
    result = finetune(str(base_dir), photo_crops, tmp_path / "out", options, log=lambda line: None)
    assert result.val_accuracy is None and result.num_train == 24
    base_sd = load_native(base_dir).model.state_dict()
    tuned = load_native(tmp_path / "out")
    tuned_sd = tuned.model.state_dict()
    assert all(torch.equal(base_sd[k], tuned_sd[k]) for k in base_sd if not k.startswith("head."))
    assert tuned_sd["head.weight"].shape == (3, TINY.embed_dim) and tuned_sd["head.weight"].abs().sum() > 0


class _Interrupt(Exception):
    pass


@pytest.mark.slow
def test_resume_continues_from_last_epoch_and_matches_an_uninterrupted_run(base_dir, photo_crops, tmp_path):
    options = FinetuneOptions(mode="full", epochs=3, batch_size=8, lr=1e-3, augment=True, val_split=0.25, seed=3)
    quiet = dict(log=lambda line: None)
    straight = finetune(str(base_dir), photo_crops, tmp_path / "straight", options, **quiet)

    def stop_after_first(record):
        if record.epoch == 1:
            raise _Interrupt

    with pytest.raises(_Interrupt):
        finetune(str(base_dir), photo_crops, tmp_path / "resumed", options, on_epoch_end=stop_after_first, **quiet)
    assert (tmp_path / "resumed" / STATE_NAME).is_file()
    assert not (tmp_path / "resumed" / "vitserve.json").exists()

    lines: list[str] = []
    resumed = finetune(str(base_dir), photo_crops, tmp_path / "resumed", options, resume=True, log=lines.append)
    assert any("resumed" in line and "after epoch 1/3" in line for line in lines)
    assert [h["epoch"] for h in resumed.history] == [1, 2, 3]
    assert sum(line.startswith("epoch ") for line in lines) == 2  # only epochs 2 and 3 ran again
    a = load_native(tmp_path / "straight").model.state_dict()
    b = load_native(tmp_path / "resumed").model.state_dict()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)
    assert resumed.history[-1]["val_accuracy"] == straight.history[-1]["val_accuracy"]


def test_resume_refuses_changed_options_and_missing_state(base_dir, photo_crops, tmp_path):
    options = FinetuneOptions(mode="full", epochs=2, batch_size=8, val_split=0.25)

    def stop(record):
        raise _Interrupt

    with pytest.raises(_Interrupt):
        finetune(str(base_dir), photo_crops, tmp_path / "run", options, on_epoch_end=stop, log=lambda line: None)
    changed = FinetuneOptions(mode="full", epochs=2, batch_size=16, val_split=0.25)
    with pytest.raises(FinetuneError, match=r"batch_size \(8 -> 16\)"):
        finetune(str(base_dir), photo_crops, tmp_path / "run", changed, resume=True, log=lambda line: None)
    with pytest.raises(FinetuneError, match="--image-size 32, got 48"):
        finetune(
            str(base_dir), photo_crops, tmp_path / "run", options, image_size=48, resume=True, log=lambda line: None
        )
    with pytest.raises(FinetuneError, match="nothing to resume"):
        finetune(str(base_dir), photo_crops, tmp_path / "elsewhere", options, resume=True, log=lambda line: None)


def test_cuda_requested_without_a_gpu_is_an_error(base_dir, photo_crops, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(FinetuneError, match="no CUDA device"):
        finetune(str(base_dir), photo_crops, tmp_path / "out", FinetuneOptions(epochs=1), device="cuda")


# --- the CLI --------------------------------------------------------------------------------------


def test_cli_linear_probe_then_export_reads_it(base_dir, photo_crops, tmp_path, capsys):
    from service.cli import main

    out = tmp_path / "probe"
    code = main(
        [
            "finetune",
            str(base_dir),
            str(photo_crops),
            "-o",
            str(out),
            "--mode",
            "linear",
            "--val-split",
            "0.25",
            "--num-classes",
            "3",
        ]
    )
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert f"wrote {out}" in captured.out and "val accuracy" in captured.out
    assert "linear probe: lambda" in captured.err
    assert import_checkpoint(str(out)).labels == ("astronaut", "chelsea", "coffee")


def test_cli_reports_bad_dataset_with_exit_code_2(base_dir, tmp_path, capsys):
    from service.cli import main

    (tmp_path / "data" / "only").mkdir(parents=True)
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), "white").save(buffer, "PNG")
    (tmp_path / "data" / "only" / "a.png").write_bytes(buffer.getvalue())
    code = main(["finetune", str(base_dir), str(tmp_path / "data"), "-o", str(tmp_path / "out")])
    assert code == 2
    assert "only one class ('only')" in capsys.readouterr().err


def test_cli_interrupted_run_resumes(base_dir, photo_crops, tmp_path, capsys, monkeypatch):
    """Ctrl-C during epoch 2 keeps epoch 1's state; the same command with --resume finishes the run."""
    import model.finetune as finetune_module
    from service.cli import main

    real_epoch = finetune_module.train_one_epoch
    calls = []

    def interrupted_in_second_epoch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_epoch(*args, **kwargs)

    monkeypatch.setattr(finetune_module, "train_one_epoch", interrupted_in_second_epoch)
    out = tmp_path / "run"
    argv = ["finetune", str(base_dir), str(photo_crops), "-o", str(out), "--epochs", "2", "--batch-size", "8"]
    assert main(argv) == 130
    assert "run the same command with --resume" in capsys.readouterr().err
    assert (out / STATE_NAME).is_file() and not (out / "vitserve.json").exists()

    assert main(argv + ["--resume"]) == 0
    captured = capsys.readouterr()
    assert "resumed from" in captured.err and "epoch 2/2" in captured.err and "epoch 1/2:" not in captured.err
    assert [h["epoch"] for h in load_native(out).extra["finetune"]["history"]] == [1, 2]


# --- a hybrid base (R+ViT): the same three modes ---------------------------------------------------

TINY_HYBRID = ViTConfig(
    image_size=32,
    patch_size=2,
    embed_dim=32,
    depth=1,
    num_heads=2,
    mlp_dim=64,
    num_classes=5,
    name="vit_test_r5_p2_32",
    backbone_layers=(1,),  # the stem and one bottleneck stage: stride 4, an 8 x 8 map, 16 patches of 2 x 2
)


@pytest.fixture(scope="module")
def hybrid_base_dir(tmp_path_factory) -> Path:
    model = randomize(VisionTransformer(TINY_HYBRID))
    directory = tmp_path_factory.mktemp("hybrid-base")
    return save_native(directory, model, TINY_HYBRID, list("abcde"), TINY_PREPROCESSING, source="test")


@pytest.mark.parametrize("mode", ["linear", "head", "full"])
def test_every_mode_fine_tunes_a_hybrid_base(hybrid_base_dir, tmp_path, mode):
    data = colour_dataset(tmp_path / "colours", per_class=8)
    options = FinetuneOptions(mode=mode, epochs=2, batch_size=8, lr=3e-3, augment=False, val_split=0.25, seed=0)
    result = finetune(str(hybrid_base_dir), data, tmp_path / "out", options, log=lambda line: None)
    assert result.classes == ("blue", "green", "grey", "red") and result.num_val == 8
    base, tuned = load_native(hybrid_base_dir), load_native(tmp_path / "out")
    assert tuned.config.backbone_layers == (1,) and tuned.model.head.weight.shape == (4, TINY_HYBRID.embed_dim)
    base_sd, tuned_sd = base.model.state_dict(), tuned.model.state_dict()
    backbone = [k for k in base_sd if k.startswith("patch_embed.backbone.")]
    unchanged = all(torch.equal(base_sd[k], tuned_sd[k]) for k in backbone)
    assert unchanged == (mode != "full")  # only full fine-tuning moves the ResNet's weights
    if mode == "linear":
        assert result.val_accuracy == 1.0  # separable colours, closed-form probe
    else:
        losses = [h["train_loss"] for h in result.history]
        assert len(losses) == 2 and losses[1] < losses[0]
