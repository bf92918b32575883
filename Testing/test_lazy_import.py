"""Heavy dependencies imported on first use (``common.lazy_import``): the proxy imports once, under
concurrency too, says what to install when the package is missing, and ``conformalseg train`` on phantoms
runs where SimpleITK and the other file, DICOM, plotting and optimisation packages are not installed (what
a GPU machine given only the repository and a few small wheels has, ``scripts/device_train.sh``)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from ConformalSegLib.common.errors import ConformalSegError
from ConformalSegLib.common.lazy_import import lazy_module

REPO = Path(__file__).resolve().parent.parent
#: What training on phantoms must do without (it needs numpy, scipy, torch, monai, nibabel and tqdm).
NOT_NEEDED_TO_TRAIN = (
    "SimpleITK",
    "slicerio",
    "cvxpy",
    "sklearn",
    "highdicom",
    "pydicom",
    "dask",
    "matplotlib",
    "jsonschema",
)


def test_the_module_is_imported_at_the_first_attribute_read_and_then_read_directly():
    sys.modules.pop("colorsys", None)
    proxy = lazy_module("colorsys", purpose="test")
    assert "colorsys" not in sys.modules  # nothing imported yet
    with pytest.raises(AttributeError):
        proxy.__wrapped__  # introspection does not import  # noqa: B018
    assert "colorsys" not in sys.modules
    assert proxy.rgb_to_hsv(1.0, 0.0, 0.0) == (0.0, 1.0, 1.0)
    assert "colorsys" in sys.modules and proxy.rgb_to_hsv is sys.modules["colorsys"].rgb_to_hsv


def test_reads_follow_the_real_module_so_a_monkeypatch_reaches_the_proxy_and_is_undone(monkeypatch):
    proxy = lazy_module("colorsys", purpose="test")
    real = proxy.rgb_to_hsv  # imported and read once
    with monkeypatch.context() as patch:
        patch.setattr(sys.modules["colorsys"], "rgb_to_hsv", lambda *a: "patched")
        assert proxy.rgb_to_hsv(1.0, 0.0, 0.0) == "patched"
    assert proxy.rgb_to_hsv is real


def test_concurrent_first_reads_import_once():
    sys.modules.pop("colorsys", None)
    proxy = lazy_module("colorsys", purpose="test")
    barrier, seen = threading.Barrier(8), []

    def read() -> None:
        barrier.wait()
        seen.append(proxy.hsv_to_rgb)

    threads = [threading.Thread(target=read) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(seen) == 8 and all(f is sys.modules["colorsys"].hsv_to_rgb for f in seen)


def test_a_missing_package_names_itself_its_purpose_and_the_fix():
    proxy = lazy_module("no_such_package_xyz", purpose="read image files", pip_name="no-such-package")
    with pytest.raises(
        ConformalSegError, match="no_such_package_xyz is not installed; it is needed to read image files"
    ) as info:
        proxy.ReadImage  # noqa: B018
    assert "pip install no-such-package" in str(info.value)


def test_image_io_without_simpleitk_says_what_to_install(tmp_path):
    """Reading an image file where SimpleITK is absent: one clear error, not an AttributeError."""
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["SimpleITK"] = None  # as if it were not installed
        from ConformalSegLib.common.errors import ConformalSegError
        from ConformalSegLib.io.volumes import load_image
        try:
            load_image({str(tmp_path / "ct.nrrd")!r})
        except ConformalSegError as exc:
            print("ERROR", exc)
        """
    )
    (tmp_path / "ct.nrrd").write_bytes(b"NRRD0004\n")
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "SimpleITK is not installed; it is needed to read and write image files" in done.stdout
    assert "pip install SimpleITK" in done.stdout


def test_training_on_phantoms_needs_no_simpleitk(tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("monai")
    out = tmp_path / "model"
    script = textwrap.dedent(
        f"""
        import sys
        for name in {NOT_NEEDED_TO_TRAIN!r}:
            sys.modules[name] = None  # any import of these fails
        sys.argv = ["conformalseg", "train", "--phantom-stream", "--phantom-seed", "5", "--heldout", "1",
                    "--lesion-label", "6", "--out", {str(out)!r}, "--epochs", "1", "--steps-per-epoch", "2",
                    "--phantom-shape", "24", "48", "48", "--patch-size", "32", "32", "16", "--crop-size", "16",
                    "16", "8", "--channels", "4", "8", "16", "--strides", "2x2x1", "2x2x2", "--device", "cpu",
                    "--threads", "1", "--num-workers", "0", "--precision", "bf16"]
        from ConformalSegLib.cli import main
        sys.exit(main())
        """
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["model_card.json", "training.json", "weights.pt"]
