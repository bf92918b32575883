"""Bad inputs to the command line, one table (issue 16): each row damages one thing in a fresh copy of a
small workspace, runs one command and checks the exit code, a fragment of the one-line message (which
names the file) and that nothing was written or changed in the workspace.

The workspace (built once per module): ``d/`` a 12-case synthetic dataset (lesion label 2),
``p.json``/``p.npz`` a CLS profile calibrated on it, ``iv/{lower,upper,truth,organs}`` 16 interval cases
as ``.nii.gz`` and ``iv.json`` a crc-interval profile calibrated on them.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import sys
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from ConformalSegLib.cli import main
from ConformalSegLib.io.json_file import CHECKSUM_KEY, content_sha256
from ConformalSegLib.phantoms.simulated_dataset import write_synthetic_dataset
from ConformalSegLib.semcrc import synthetic_intervals

CLS = ["--method", "cls", "--lesion-label", "2", "--epsilon", "0.2", "--alpha", "0.2"]
ORGAN_SPEC = "1=liver,2=spleen"


def _save_nifti(array: np.ndarray, path: Path) -> None:
    nib.save(nib.Nifti1Image(np.asarray(array).T, np.eye(4)), str(path))


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("bad_inputs_base")
    write_synthetic_dataset(root / "d", 12, seed=7, shape=(16, 20, 20))
    assert main(["calibrate", "--data", str(root / "d"), *CLS, "--out", str(root / "p.json")]) == 0
    syn = synthetic_intervals(16, shape=(2, 8, 8), seed=1)
    for name in ("lower", "upper", "truth", "organs"):
        (root / "iv" / name).mkdir(parents=True)
    for i in range(16):
        _save_nifti(syn.lower[i].astype(np.float32), root / "iv" / "lower" / f"c{i:02d}.nii.gz")
        _save_nifti(syn.upper[i].astype(np.float32), root / "iv" / "upper" / f"c{i:02d}.nii.gz")
        _save_nifti(syn.truth[i].astype(np.float32), root / "iv" / "truth" / f"c{i:02d}.nii.gz")
        _save_nifti((syn.labels[i] % 3).astype(np.int16), root / "iv" / "organs" / f"c{i:02d}.nii.gz")
    assert main([*interval_calibrate(root), "--out", str(root / "iv.json")]) == 0
    return root


def interval_calibrate(ws: Path, method: str = "crc-interval") -> list[str]:
    iv = ws / "iv"
    return ["calibrate", "--method", method, "--epsilon", "0.1", "--lower", str(iv / "lower"),
            "--upper", str(iv / "upper"), "--truth", str(iv / "truth"), "--organs", str(iv / "organs"),
            "--organ-labels", ORGAN_SPEC]  # fmt: skip


def interval_apply(ws: Path, case: str = "c03") -> list[str]:
    iv = ws / "iv"
    return ["apply", "--profile", str(ws / "iv.json"), "--lower", str(iv / "lower" / f"{case}.nii.gz"),
            "--upper", str(iv / "upper" / f"{case}.nii.gz"), "--organs", str(iv / "organs" / f"{case}.nii.gz"),
            "--out", str(ws / "r")]  # fmt: skip


def calibrate(ws: Path, *extra: str) -> list[str]:
    return ["calibrate", "--data", str(ws / "d"), *CLS, "--out", str(ws / "new.json"), *extra]


def apply(ws: Path, prob: Path | None = None, profile: str = "p.json", *extra: str) -> list[str]:
    prob = prob or ws / "d" / "probs" / "synth_000.nii.gz"
    return ["apply", "--profile", str(ws / profile), "--prob", str(prob), "--out", str(ws / "r"), *extra]


# ----------------------------------------------------------------------------- damage


def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def set_voxels(path: Path, change: Callable[[np.ndarray], np.ndarray]) -> None:
    image = nib.load(str(path))
    array = change(np.asanyarray(image.dataobj).astype(np.float32))
    nib.save(nib.Nifti1Image(array, image.affine), str(path))


def edit_json(path: Path, change: Callable[[dict], object], *, keep_checksum: bool = False) -> None:
    doc = json.loads(path.read_text())
    change(doc)
    if keep_checksum:  # a full forgery: the content checksum recomputed
        doc[CHECKSUM_KEY] = content_sha256(doc)
    path.write_text(json.dumps(doc))


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


def npy_with_header(path: Path, shape: tuple[int, ...]) -> None:
    """A tiny ``.npy`` whose header claims ``shape`` (float32)."""
    with open(path, "wb") as handle:
        np.lib.format.write_array_header_1_0(handle, {"descr": "<f4", "fortran_order": False, "shape": shape})
        handle.write(b"\0" * 64)


def nifti_header_only(path: Path, shape: tuple[int, ...]) -> None:
    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(np.int16)
    with gzip.open(path, "wb") as handle:
        handle.write(header.binaryblock + b"\0" * 4)


def with_npz_member(npz: Path, json_path: Path, name: str, shape: tuple[int, ...], key: str = "summaries") -> None:
    """Add (or replace) a member whose header claims ``shape`` in a profile's ``.npz``; the profile's
    checksums are recomputed (a forgery)."""
    import hashlib
    import zipfile

    with zipfile.ZipFile(npz) as archive:
        members = {info.filename: archive.read(info) for info in archive.infolist()}
    header = Path(str(npz) + ".member")
    npy_with_header(header, shape)
    members[f"{name}.npy"] = header.read_bytes()
    header.unlink()
    with zipfile.ZipFile(npz, "w", zipfile.ZIP_DEFLATED) as archive:
        for member, data in members.items():
            archive.writestr(member, data)
    sha = hashlib.sha256(npz.read_bytes()).hexdigest()
    edit_json(json_path, lambda d: d[key].update(sha256=sha), keep_checksum=True)


# ----------------------------------------------------------------------------- the table


@dataclass(frozen=True)
class Row:
    name: str
    prepare: Callable[[Path], list[str]]  # damages the workspace, returns the command line
    fragment: str  # in the one-line message (case-insensitive)
    names: str = ""  # the file the message must name (a fragment of its path)
    code: int = 2
    env: tuple[tuple[str, str], ...] = ()
    root_skips: bool = False  # permission rows: root reads everything
    fsize: int | None = None  # a file size limit (bytes) while the command runs: a full disk
    patch: Callable[[pytest.MonkeyPatch], None] | None = None


@contextmanager
def file_size_limit(limit: int | None) -> Iterator[None]:
    """Writes beyond ``limit`` bytes fail with EFBIG (as on a full disk) while the block runs."""
    if limit is None:
        yield
        return
    import resource
    import signal

    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)


def fail_with(error: BaseException, target: str) -> Callable[[pytest.MonkeyPatch], None]:
    """``error`` raised when ``target`` (``module:function``) is called."""

    def patch(monkeypatch: pytest.MonkeyPatch) -> None:
        module, name = target.split(":")

        def raise_error(*args: object, **kwargs: object) -> None:
            raise error

        monkeypatch.setattr(f"{module}.{name}", raise_error)

    return patch


def interrupt(target: str) -> Callable[[pytest.MonkeyPatch], None]:
    """Ctrl-C when ``target`` (``module:function``) is called."""

    def patch(monkeypatch: pytest.MonkeyPatch) -> None:
        module, name = target.split(":")

        def raise_interrupt(*args: object, **kwargs: object) -> None:
            raise KeyboardInterrupt

        monkeypatch.setattr(f"{module}.{name}", raise_interrupt)

    return patch


def _truncated_label(ws: Path) -> list[str]:
    truncate(ws / "d" / "labels" / "synth_003.nii.gz")
    return calibrate(ws)


def _truncated_uncompressed_label(ws: Path) -> list[str]:
    labels = ws / "d" / "labels"
    image = nib.load(str(labels / "synth_003.nii.gz"))
    nib.save(image, str(labels / "synth_003.nii"))
    (labels / "synth_003.nii.gz").unlink()
    truncate(labels / "synth_003.nii")
    return calibrate(ws)


def _truncated_probability(ws: Path) -> list[str]:
    truncate(ws / "d" / "probs" / "synth_004.nii.gz")
    return calibrate(ws)


def _truncated_interval(role: str) -> Callable[[Path], list[str]]:
    def prepare(ws: Path) -> list[str]:
        truncate(ws / "iv" / role / "c05.nii.gz")
        return [*interval_calibrate(ws), "--out", str(ws / "new.json")]

    return prepare


def _nan_interval(role: str) -> Callable[[Path], list[str]]:
    def prepare(ws: Path) -> list[str]:
        set_voxels(ws / "iv" / role / "c05.nii.gz", lambda a: np.where(a == a.flat[0], np.nan, a))
        return [*interval_calibrate(ws), "--out", str(ws / "new.json")]

    return prepare


def _nan_label(ws: Path) -> list[str]:
    set_voxels(ws / "d" / "labels" / "synth_004.nii.gz", lambda a: np.where(a == 2, np.nan, a))
    return calibrate(ws)


def _crossing(ws: Path) -> list[str]:
    lower, upper = ws / "iv" / "lower" / "c02.nii.gz", ws / "iv" / "upper" / "c02.nii.gz"
    shutil.copy(lower, ws / "tmp.nii.gz")
    shutil.copy(upper, lower)
    shutil.move(ws / "tmp.nii.gz", upper)
    return [*interval_calibrate(ws), "--out", str(ws / "new.json")]


def _edit_profile(change: Callable[[dict], object], profile: str = "p.json") -> Callable[[Path], list[str]]:
    def prepare(ws: Path) -> list[str]:
        edit_json(ws / profile, change)
        return apply(ws) if profile == "p.json" else interval_apply(ws)

    return prepare


def _profile_text(text: str) -> Callable[[Path], list[str]]:
    def prepare(ws: Path) -> list[str]:
        (ws / "p.json").write_text(text)
        return apply(ws)

    return prepare


def _missing_npz(ws: Path) -> list[str]:
    (ws / "p.npz").unlink()
    return apply(ws)


def _huge_npz_member(name: str) -> Callable[[Path], list[str]]:
    def prepare(ws: Path) -> list[str]:
        with_npz_member(ws / "p.npz", ws / "p.json", name, (10**6, 10**6))
        return apply(ws)

    return prepare


def _huge_interval_record(ws: Path) -> list[str]:
    with_npz_member(ws / "iv.npz", ws / "iv.json", "record_need", (10**6, 10**6), key="record")
    return interval_apply(ws)


def _forged_interval_record_name(name: str) -> Callable[[Path], list[str]]:
    def prepare(ws: Path) -> list[str]:
        edit_json(ws / "iv.json", lambda d: d["record"].update(file=name), keep_checksum=True)
        return interval_apply(ws)

    return prepare


def _huge_npy(ws: Path) -> list[str]:
    npy_with_header(ws / "huge.npy", (10**5, 10**5, 10**5))
    return apply(ws, ws / "huge.npy")


def _huge_nifti_header(ws: Path) -> list[str]:
    nifti_header_only(ws / "d" / "labels" / "synth_002.nii.gz", (2000, 1000, 1000))
    return calibrate(ws)


def _channels_last(ws: Path) -> list[str]:
    p = np.asarray(nib.load(str(ws / "d" / "probs" / "synth_001.nii.gz")).dataobj).T
    np.savez(ws / "cl.npz", probabilities=np.stack([1 - p, p], -1))
    return apply(ws, ws / "cl.npz", "p.json", "--channel", "1")


def _pickle_npz(ws: Path) -> list[str]:
    np.savez(ws / "obj.npz", probabilities=np.array([{"a": 1}], dtype=object))
    return apply(ws, ws / "obj.npz")


def _non_utf8(ws: Path) -> list[str]:
    probs = ws / "d" / "probs"
    os.rename(probs / "synth_000.nii.gz", os.fsdecode(bytes(probs) + b"/synth_\xff.nii.gz"))
    labels = ws / "d" / "labels"
    os.rename(labels / "synth_000.nii.gz", os.fsdecode(bytes(labels) + b"/synth_\xff.nii.gz"))
    return calibrate(ws)


def _unreadable_profile(ws: Path) -> list[str]:
    os.chmod(ws / "p.json", 0)
    return apply(ws)


def _out_in(folder: str, command: str) -> Callable[[Path], list[str]]:
    def prepare(ws: Path) -> list[str]:
        if command == "calibrate":
            return [*calibrate(ws)[:-2], "--out", str(ws / "d" / folder / "p2.json")]
        if command == "apply":
            return [*apply(ws)[:-2], "--out", str(ws / "d" / folder)]
        return ["evaluate", "--data", str(ws / "d"), "--lesion-label", "2", "--out", str(ws / "d" / folder)]

    return prepare


def _dangling_link(ws: Path) -> list[str]:
    (ws / "d" / "probs" / "synth_001.nii.gz").unlink()
    os.symlink(ws / "nowhere.nii.gz", ws / "d" / "probs" / "synth_001.nii.gz")
    return calibrate(ws)


def _npz_dataset(ws: Path) -> Path:
    """``ws/n``: the dataset with two-channel nnU-Net-style ``.npz`` maps; ``ws/n.json`` calibrated on channel 1."""
    (ws / "n" / "probs").mkdir(parents=True)
    shutil.copytree(ws / "d" / "labels", ws / "n" / "labels")
    for path in sorted((ws / "d" / "probs").iterdir()):
        p = np.asarray(nib.load(str(path)).dataobj).T
        np.savez(ws / "n" / "probs" / path.name.replace(".nii.gz", ".npz"), probabilities=np.stack([1 - p, p]))
    args = ["calibrate", "--data", str(ws / "n"), *CLS, "--channel", "1", "--out", str(ws / "n.json")]
    assert main(args) == 0
    return ws / "n" / "probs" / "synth_000.npz"


def _other_channel(ws: Path) -> list[str]:
    prob = _npz_dataset(ws)
    return ["apply", "--profile", str(ws / "n.json"), "--prob", str(prob), "--channel", "0", "--out", str(ws / "r")]


def _profile_channel_used(ws: Path) -> list[str]:
    prob = _npz_dataset(ws)
    return ["apply", "--profile", str(ws / "n.json"), "--prob", str(prob), "--out", str(ws / "r")]


def _npy_map(ws: Path, *extra: str) -> list[str]:
    p = np.asarray(nib.load(str(ws / "d" / "probs" / "synth_001.nii.gz")).dataobj).T
    np.save(ws / "x.npy", p)
    args = ["calibrate", "--data", str(ws / "d"), "--method", "sets", "--lesion-label", "2", "--alpha", "0.2",
            "--transform", "gaussian:2", "--out", str(ws / "g.json")]  # fmt: skip
    assert main(args) == 0
    return apply(ws, ws / "x.npy", "g.json", *extra)


def _all_npy(ws: Path) -> list[str]:
    for role in ("probs", "labels"):
        for path in sorted((ws / "d" / role).iterdir()):
            np.save(str(path).replace(".nii.gz", ".npy"), np.asarray(nib.load(str(path)).dataobj).T)
            path.unlink()
    return ["calibrate", "--data", str(ws / "d"), "--method", "sets", "--lesion-label", "2", "--alpha", "0.2",
            "--transform", "distance", "--out", str(ws / "g.json")]  # fmt: skip


def _case_grid(ws: Path, case: str):  # noqa: ANN202
    from ConformalSegLib.io.volumes import load_label_map

    return load_label_map(ws / "d" / "labels" / f"{case}.nii.gz")


def _probability_series(ws: Path, case: str, value: float, *series: tuple[float, float]) -> Path:
    """Replace case ``case``'s probability map by a folder of DICOM series of ``value`` (one series per
    ``(slope, intercept)``)."""
    from dicom_support import write_ct_series

    label = _case_grid(ws, case)
    (ws / "d" / "probs" / f"{case}.nii.gz").unlink()
    folder = ws / "d" / "probs" / case
    for k, rescale in enumerate(series, start=1):
        values = np.full(label.geometry.shape, value)
        write_ct_series(folder, values, label.geometry, series_uid=f"1.2.826.0.1.{k}", series_number=k, rescale=rescale)
    return folder


def _two_series_for_apply(ws: Path, *extra: str) -> list[str]:
    folder = _probability_series(ws, "synth_003", 0.25, (0.001, 0.0), (0.001, 0.0))
    return apply(ws, folder, "p.json", *extra)


def _label_dcm(ws: Path, case: str, content: Callable[[Path, Path], None]) -> list[str]:
    """Replace ``case``'s label map by ``CASE.dcm`` written by ``content(ws, path)``; the calibrate command."""
    content(ws, ws / "d" / "labels" / f"{case}.dcm")
    (ws / "d" / "labels" / f"{case}.nii.gz").unlink()
    return calibrate(ws)


def _ct_slice(ws: Path, path: Path) -> None:
    from dicom_support import write_ct_series

    files = write_ct_series(ws / "ct", np.zeros((2, 4, 4), np.int16))
    shutil.move(str(files[0]), path)
    shutil.rmtree(ws / "ct")


def _seg(spacing_scale: float = 1.0) -> Callable[[Path, Path], None]:
    """A SEG of synth_003's lesion (label 2) and body (1), on its grid (or one ``spacing_scale`` times finer)."""

    def write(ws: Path, path: Path) -> None:
        from dicom_support import write_ct_series

        from ConformalSegLib.common.geometry import Geometry
        from ConformalSegLib.io.dicom_seg import GuaranteeRecord, write_dicom_seg

        label = _case_grid(ws, "synth_003")  # the label map the SEG replaces
        g = label.geometry
        grid = Geometry(g.shape, tuple(v * spacing_scale for v in g.spacing), g.origin, g.direction)
        write_ct_series(ws / "ct", np.zeros(g.shape, np.int16), grid)
        masks = {"lesion": label.array == 2, "body": label.array == 1}
        write_dicom_seg(masks, grid, ws / "ct", path, GuaranteeRecord("truth", None, None, 0, "0" * 64, "truth"))
        shutil.rmtree(ws / "ct")

    return write


SHIPPED_CARD = ROOT / "Resources" / "models" / "phantom_lesion_unet" / "model_card.json"


def _model(source: dict, *files: str) -> Callable[[Path], list[str]]:
    """``infer`` with a copy of the shipped card whose ``source`` is replaced (and ``files`` created)."""

    def prepare(ws: Path) -> list[str]:
        card = json.loads(SHIPPED_CARD.read_text())
        card["source"] = source
        (ws / "m" / "configs").mkdir(parents=True)
        (ws / "m" / "model_card.json").write_text(json.dumps(card))
        for name in files:
            (ws / "m" / name).write_text("never loaded")
        image = ws / "d" / "probs" / "synth_000.nii.gz"
        return ["infer", "--model", str(ws / "m"), "--images", str(image), "--out", str(ws / "pred")]

    return prepare


def _patch(ws: Path, size: int) -> list[str]:
    argv = _model({"state_dict": {"network": "UNet", "weights": "w.pt"}}, "w.pt")(ws)
    card = json.loads((ws / "m" / "model_card.json").read_text())
    card["inference"]["patch_size"] = [size] * 3
    (ws / "m" / "model_card.json").write_text(json.dumps(card))
    return argv


ROWS = [
    # 1. truncated compressed files
    Row("truncated label .nii.gz", _truncated_label, "truncated", "synth_003"),
    Row("truncated label .nii", _truncated_uncompressed_label, "truncated", "synth_003.nii"),
    Row("truncated probability map", _truncated_probability, "synth_004", "synth_004"),
    Row("truncated interval truth", _truncated_interval("truth"), "truncated", "c05"),
    Row("truncated interval lower", _truncated_interval("lower"), "truncated", "c05"),
    Row("truncated organ map", _truncated_interval("organs"), "truncated", "c05"),
    # 2. label maps and interval inputs validated
    Row("NaN in a float label map", _nan_label, "NaN", "synth_004"),
    Row("NaN in interval truth", _nan_interval("truth"), "NaN", "c05"),
    Row("NaN in interval upper", _nan_interval("upper"), "NaN", "c05"),
    Row("NaN in organ map", _nan_interval("organs"), "NaN", "c05"),
    Row("lower > upper", _crossing, "lower > upper", "c02"),
    Row("--lesion-label beyond int64", lambda ws: calibrate(ws, "--lesion-label", "9" * 20), "out of range"),
    # 3. profiles
    Row("n edited", _edit_profile(lambda d: d.update(n=5000)), "edited by hand", "p.json"),
    Row("epsilon nudged", _edit_profile(lambda d: d.update(epsilon=0.2001)), "edited by hand", "p.json"),
    Row("alpha nudged", _edit_profile(lambda d: d.update(alpha=0.1999)), "edited by hand", "p.json"),
    Row("format_version true", _edit_profile(lambda d: d.update(format_version=True)), "version", "p.json"),
    Row(
        "interval lambdas zeroed",
        _edit_profile(lambda d: d.update(**{"lambda": {k: 0.0 for k in d["lambda"]}}), "iv.json"),
        "edited by hand",
        "iv.json",
    ),
    Row(
        "interval epsilon edited",
        _edit_profile(lambda d: d.update(epsilon=0.3), "iv.json"),
        "edited by hand",
        "iv.json",
    ),
    Row("interval method edited", _edit_profile(lambda d: d.update(method="sem-crc"), "iv.json"), "", "iv.json"),
    Row(
        "summaries file ../",
        _edit_profile(lambda d: d["summaries"].update(file="../p.npz")),
        "plain file name",
        "p.json",
    ),
    Row(
        "summaries file absolute",
        _edit_profile(lambda d: d["summaries"].update(file="/etc/passwd")),
        "plain file name",
        "p.json",
    ),
    Row("summaries not an object", _edit_profile(lambda d: d.update(summaries="x.npz")), "JSON object", "p.json"),
    Row("provenance a list", _edit_profile(lambda d: d.update(provenance=[1, 2])), "JSON object", "p.json"),
    Row("deeply nested JSON", _profile_text(nested(100_000)), "nested", "p.json"),
    Row("5000-digit integer", _profile_text('{"n": ' + "9" * 5000 + "}"), "digits", "p.json"),
    Row("JSON names an absent .npz", _missing_npz, "p.npz is missing", "p.json"),
    Row("huge summaries in the profile .npz", _huge_npz_member("lesion_values"), "MiB", "p.npz"),
    Row("unused huge member in the profile .npz: never read", _huge_npz_member("junk"), "", code=0),
    Row(
        "interval record file ../ (checksum forged)",
        _forged_interval_record_name("../iv.npz"),
        "plain file name",
        "iv.json",
    ),
    Row("interval record file absolute", _forged_interval_record_name("/etc/passwd"), "plain file name", "iv.json"),
    Row("huge record in the interval .npz", _huge_interval_record, "MiB", "iv.npz"),
    # 5. which structure
    Row(
        "no --lesion-label, label maps hold 1 and 2",
        lambda ws: [
            "calibrate",
            "--data",
            str(ws / "d"),
            "--method",
            "cls",
            "--epsilon",
            "0.2",
            "--alpha",
            "0.2",
            "--out",
            str(ws / "new.json"),
        ],
        "which one marks the lesion",
        "labels",
    ),
    Row("apply --channel other than the profile's", _other_channel, "differs from channel 1", "n.json"),
    Row("apply without --channel uses the profile's", _profile_channel_used, "", code=0),
    # 6. geometry and layout
    Row(".npy map with a mm-based profile", _npy_map, "no voxel spacing", "x.npy"),
    Row(".npy map with --spacing", lambda ws: _npy_map(ws, "--spacing", "0.9", "0.9", "2.5"), "", code=0),
    Row("bare arrays calibrated with a mm transform", _all_npy, "no voxel spacing", "labels"),
    Row("channels-last .npz", _channels_last, "channels-last", "cl.npz"),
    # 7. tracebacks -> messages
    Row("object array in a probability .npz", _pickle_npz, "obj.npz", "obj.npz"),
    Row("huge .npy header", _huge_npy, "GiB", "huge.npy"),
    Row(
        "huge NIfTI header",
        _huge_nifti_header,
        "GiB",
        "synth_002",
        env=(("CONFORMALSEG_MAX_VOLUME_BYTES", str(10**9)),),
    ),
    Row("non-UTF-8 file names", _non_utf8, "UTF-8"),
    Row("dangling symbolic link", _dangling_link, "broken link", "synth_001"),
    Row("profile not readable", _unreadable_profile, "permission", "p.json", root_skips=True),
    # 8. code in model folders
    Row(
        "TorchScript without --trust-model-code",
        _model({"torchscript": "m.ts"}, "m.ts"),
        "--trust-model-code",
        "model_card.json",
    ),
    Row(
        "MONAI bundle without --trust-model-code",
        _model({"bundle": "."}, "configs/inference.json"),
        "--trust-model-code",
        "model_card.json",
    ),
    Row(
        "weights outside the model folder",
        _model({"state_dict": {"network": "UNet", "weights": "../p.npz"}}),
        "outside the model folder",
        "model_card.json",
    ),
    Row(
        "weights at an absolute path",
        _model({"state_dict": {"network": "UNet", "weights": "/etc/passwd"}}),
        "outside the model folder",
        "model_card.json",
    ),
    Row(
        "huge gaussian sigma",
        lambda ws: calibrate(ws, "--method", "sets", "--transform", "gaussian:1e9"),
        "larger than",
    ),
    Row("huge patch size in a model card", lambda ws: _patch(ws, 4096), "GiB", "model_card.json"),
    Row(
        "non-UTF-8 output folder", lambda ws: [*apply(ws)[:-2], "--out", os.fsdecode(bytes(ws) + b"/res\xff")], "UTF-8"
    ),
    # 9. newcomer friction
    Row(
        "interval calibration that controls nothing",
        lambda ws: [*interval_calibrate(ws, "sem-crc-organ"), "--n-opt", "14", "--out", str(ws / "new.json")],
        "no group is controlled",
        code=3,
    ),
    Row(
        "organ values not in --organ-labels: reported",
        lambda ws: (
            set_voxels(ws / "iv" / "organs" / "c05.nii.gz", lambda a: np.where(a == a.flat[0], 7, a).astype(np.int16)),
            [*interval_calibrate(ws), "--out", str(ws / "new.json")],
        )[1],
        "values [7] are not in the organ labels",
        code=0,
    ),
    Row(
        "an operating-system error no check caught",
        lambda ws: calibrate(ws),
        "Permission denied",
        "labels",
        patch=fail_with(
            PermissionError(13, "Permission denied", "labels/synth_002.nii.gz"),
            "ConformalSegLib.io.dataset:load_label_map",
        ),  # fmt: skip
    ),
    # 4. --out inside an input folder
    Row("profile into probs/", _out_in("probs", "calibrate"), "inside the input folder", "p2.json"),
    Row("masks into probs/", _out_in("probs", "apply"), "inside the input folder", "probs"),
    Row("evaluation into labels/", _out_in("labels", "evaluate"), "inside the input folder", "labels"),
    # 7. disk full, Ctrl-C
    Row(
        "disk full: calibrate --force over a profile",
        lambda ws: [*calibrate(ws)[:-2], "--out", str(ws / "p.json"), "--force"],
        "cannot write",
        "p.",
        fsize=1500,
    ),
    Row("disk full: apply (SimpleITK short write)", lambda ws: apply(ws), "incomplete", "r", fsize=200),
    Row(
        "disk full: synth", lambda ws: ["synth", "--out", str(ws / "s"), "--cases", "2"], "incomplete", "s", fsize=4000
    ),
    Row(
        "disk full: interval profile",
        lambda ws: [*interval_calibrate(ws), "--out", str(ws / "iv.json"), "--force"],
        "cannot write",
        "/iv.",  # the pair iv.json + iv.npz (its per-scan coverage thresholds): whichever hit the limit
        fsize=800,
    ),
    Row(
        "Ctrl-C during apply",
        lambda ws: apply(ws),
        "interrupted",
        code=130,
        patch=interrupt("ConformalSegLib.cli.apply_cmd:write_seg_nrrd"),
    ),
    Row(
        "Ctrl-C during interval apply",
        lambda ws: interval_apply(ws),
        "interrupted",
        code=130,
        patch=interrupt("ConformalSegLib.cli.interval_options:write_interval_table"),
    ),
    Row(
        "evaluate over an earlier report: refused before the run",
        lambda ws: (
            (ws / "e").mkdir(),
            (ws / "e" / "results.json").write_text("{}"),
            ["evaluate", "--data", str(ws / "d"), "--lesion-label", "2", "--out", str(ws / "e")],
        )[2],
        "already exist",
        "e",
    ),  # fmt: skip
    Row(
        "synth into a folder that holds cases",
        lambda ws: ["synth", "--out", str(ws / "d"), "--cases", "2"],
        "already holds cases",
        "d",
    ),
    # 10. DICOM inputs (issue 18)
    Row(
        "DICOM probability series of integers (a CT)",
        lambda ws: (_probability_series(ws, "synth_003", 40.0, (1.0, -1024.0)), calibrate(ws))[1],
        "holds integers",
        "synth_003",
    ),
    Row(
        "DICOM probability series out of [0, 1]",
        lambda ws: (_probability_series(ws, "synth_003", 40.0, (0.5, 0.0)), calibrate(ws))[1],
        "probability values range",
        "synth_003",
    ),
    Row(
        "two DICOM series in one probability case folder",
        lambda ws: (_probability_series(ws, "synth_003", 0.25, (0.001, 0.0), (0.001, 0.0)), calibrate(ws))[1],
        "holds 2 DICOM series",
        "synth_003",
    ),
    Row("apply --prob: a folder of two series, no --series-uid", _two_series_for_apply, "2 series", "synth_003"),
    Row(
        "apply --prob: --series-uid not in the folder",
        lambda ws: _two_series_for_apply(ws, "--series-uid", "9.9"),
        "series 9.9 is not in the folder",
        "synth_003",
    ),
    Row(
        "label map .dcm that is a CT slice, not a SEG",
        lambda ws: _label_dcm(ws, "synth_004", _ct_slice),
        "not a DICOM SEG",
        "synth_004.dcm",
    ),
    Row(
        "label map .dcm of garbage bytes",
        lambda ws: _label_dcm(ws, "synth_004", lambda _ws, path: path.write_bytes(b"not dicom" * 50)),
        "cannot read the DICOM file",
        "synth_004.dcm",
    ),
    Row(
        "SEG label map on another grid",
        lambda ws: _label_dcm(ws, "synth_003", _seg(spacing_scale=0.5)),
        "not on the grid",
        "synth_003.dcm",
    ),
    Row(
        "--seg-segments names a segment the SEG lacks",
        lambda ws: [*_label_dcm(ws, "synth_003", _seg()), "--seg-segments", "tumor=2"],
        "'tumor' matches no segment",
        "synth_003.dcm",
    ),
    Row(
        "--seg-segments malformed",
        lambda ws: [*_label_dcm(ws, "synth_003", _seg()), "--seg-segments", "lesion:2"],
        "NAME=VALUE",
    ),
    Row(
        "SEG label map with --seg-segments: calibrates",
        lambda ws: [
            *_label_dcm(ws, "synth_003", _seg())[:-2],
            "--out",
            str(ws / "new.json"),
            "--seg-segments",
            "Lesion=2,BODY=1",
        ],  # fmt: skip
        "",
        code=0,
    ),
    # cases that already worked and must keep working
    Row(
        "NaN in a probability map",
        lambda ws: (
            set_voxels(ws / "d" / "probs" / "synth_005.nii.gz", lambda a: np.where(a > 0.5, np.nan, a)),
            calibrate(ws),
        )[1],
        "NaN",
        "synth_005",
    ),
    Row(
        "logits instead of probabilities",
        lambda ws: (set_voxels(ws / "d" / "probs" / "synth_005.nii.gz", lambda a: a * 10 - 5), calibrate(ws))[1],
        "softmax",
        "synth_005",
    ),
    Row(
        "missing label map",
        lambda ws: ((ws / "d" / "labels" / "synth_006.nii.gz").unlink(), calibrate(ws))[1],
        "synth_006",
    ),
    Row(
        "threshold edited", _edit_profile(lambda d: d.update(probability_threshold=0.123)), "does not follow", "p.json"
    ),
    Row(
        "existing output without --force",
        lambda ws: [*calibrate(ws)[:-2], "--out", str(ws / "p.json")],
        "already exists",
        "p.json",
    ),
]


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file below ``folder`` (hidden ones too): size and modification time."""
    found = {}
    for dirpath, _dirs, files in os.walk(folder):
        for name in files:
            path = os.path.join(dirpath, name)
            stat = os.lstat(path)
            found[os.path.relpath(path, folder)] = (stat.st_size, stat.st_mtime_ns)
    return found


@pytest.mark.parametrize("row", ROWS, ids=[row.name for row in ROWS])
def test_bad_input(row: Row, base: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch) -> None:
    if row.root_skips and os.geteuid() == 0:
        pytest.skip("root reads unreadable files: test_permission_denied_as_an_unprivileged_user runs it as uid 65534")
    ws = tmp_path / "ws"
    shutil.copytree(base, ws, symlinks=True)
    argv = row.prepare(ws)
    capsys.readouterr()  # what preparing printed
    for key, value in row.env:
        monkeypatch.setenv(key, value)
    if row.patch is not None:
        row.patch(monkeypatch)
    before = snapshot(ws)
    with file_size_limit(row.fsize), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code = main(argv)
    err = capsys.readouterr().err + "".join(f"warning: {w.message}\n" for w in caught)
    assert code == row.code, err
    if row.code not in (2, 130):  # a result was written (exit 0), or written with a warning (exit 3)
        assert row.fragment in err, err
        return
    if row.code == 130:
        assert row.fragment in err and snapshot(ws) == before, err
        return
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert row.fragment.lower() in lines[0].lower(), lines[0]
    assert row.names in lines[0], lines[0]
    assert snapshot(ws) == before, "files were written or changed"


def test_profile_pair_is_kept_when_the_second_rename_fails(base: Path, tmp_path: Path, monkeypatch) -> None:
    """Writing a profile pair is all-or-nothing: a failure after the ``.npz`` rename puts the old pair back."""
    from ConformalSegLib.conformal.profile import load_profile
    from ConformalSegLib.io import atomic

    shutil.copy(base / "p.json", tmp_path / "p.json")
    shutil.copy(base / "p.npz", tmp_path / "p.npz")
    before = snapshot(tmp_path)
    profile = load_profile(tmp_path / "p.json").recalibrate(epsilon=0.3)
    calls = []
    real_replace = os.replace

    def failing_replace(src, dst):
        calls.append(dst)
        if len(calls) == 2:  # the JSON's rename, after the .npz was replaced
            raise KeyboardInterrupt
        return real_replace(src, dst)

    monkeypatch.setattr(atomic.os, "replace", failing_replace)
    with pytest.raises(KeyboardInterrupt):
        profile.save(tmp_path / "p.json", force=True)
    monkeypatch.setattr(atomic.os, "replace", real_replace)
    assert sorted(snapshot(tmp_path)) == sorted(before)  # no temporary or backup file left
    assert load_profile(tmp_path / "p.json").calibration.epsilon == 0.2  # the old pair still loads
    profile.save(tmp_path / "p.json", force=True)
    assert load_profile(tmp_path / "p.json").calibration.epsilon == 0.3


# ----------------------------------------------------------------------------- permission denied

UNPRIVILEGED = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--"]


def _permission_cases() -> list[tuple[str, str, Callable[[Path], list[str]], str]]:
    """``(name, path to make unreadable, command, file the message names)``."""
    return [
        ("folder", "d/labels", calibrate, "labels"),
        ("profile JSON", "p.json", apply, "p.json"),
        ("profile .npz", "p.npz", apply, "p.npz"),
    ]


@pytest.mark.parametrize("case", _permission_cases(), ids=[c[0] for c in _permission_cases()])
def test_permission_denied_as_an_unprivileged_user(case, base: Path) -> None:
    """Root reads files without read permission, so as root the command runs as uid/gid 65534 (``setpriv``);
    as any other user it runs as that user. One ``error:`` line naming the file, exit 2, nothing written."""
    import subprocess
    import tempfile

    _name, target, command, names = case
    prefix: list[str] = []
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("running as root and setpriv (util-linux) is not installed: cannot drop privileges")
        probe = subprocess.run([*UNPRIVILEGED, sys.executable, "-c", "import ConformalSegLib.cli"], cwd=ROOT)
        if probe.returncode != 0:
            pytest.skip("uid 65534 cannot run this Python / read this checkout (a private home or venv)")
        prefix = UNPRIVILEGED
    ws = Path(tempfile.mkdtemp(prefix="conformalseg-perm-"))
    try:
        shutil.copytree(base, ws, dirs_exist_ok=True)
        for path in [ws, *ws.rglob("*")]:  # everyone may read and write the copy ...
            os.chmod(path, 0o777 if path.is_dir() else 0o666)
        os.chmod(ws / target, 0)  # ... except the one path under test
        before = snapshot(ws)
        env = {**os.environ, "HOME": str(ws), "MPLCONFIGDIR": str(ws), "PYTHONDONTWRITEBYTECODE": "1"}
        argv = [*prefix, sys.executable, "-m", "ConformalSegLib", *command(ws)]
        proc = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
        assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
        assert "permission" in lines[0].lower() and names in lines[0], lines[0]
        os.chmod(ws / target, 0o777 if (ws / target).is_dir() else 0o666)
        assert snapshot(ws) == before, "files were written or changed"
    finally:
        shutil.rmtree(ws, ignore_errors=True)
