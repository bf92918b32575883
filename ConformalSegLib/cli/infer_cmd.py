"""``conformalseg infer``: run a model card's network on every image of a folder / dataset.

Writes, under ``--out``::

    probs/CASE.nii.gz                  lesion probability (float32, on the input image's grid)
    uncertainty/CASE_variance.nii.gz   with --mc-dropout N: variance over the N passes
    uncertainty/CASE_entropy.nii.gz    with --mc-dropout N: predictive entropy (nats)
    inference.json                     model name, card, weights SHA-256, pipeline fingerprint, device,
                                       MC passes, flips, seed, per-case seconds

For a quantile regression card (``output.quantiles``, e.g. the phantom denoiser) it writes instead::

    lower/CASE.nii.gz   the lowest-level quantile map (e.g. q_0.1), float32, the card's output units
    upper/CASE.nii.gz   the highest-level quantile map (e.g. q_0.9)
    inference.json

ready for ``conformalseg calibrate --method crc-interval|k-crc|sem-crc|sem-crc-organ --lower OUT/lower
--upper OUT/upper --truth ...`` (``--mc-dropout``, ``--tta`` and ``--cascade`` are lesion-only).

``probs/`` is ready for ``conformalseg calibrate --probs OUT/probs --labels ...`` (same case ids as
the label files). With MC dropout the probability is the mean over the passes: calibrate and apply
with the same number of passes (and seed). Every file is written atomically; existing outputs are
never overwritten without ``--force`` (checked before the first case runs).

``--images`` may also be a DICOM series folder (one case, named after the folder; ``--series-uid`` picks one
of several series) or a folder of case folders holding one series each: the maps are written on each
series' own grid (origin, spacing, direction from its slice positions).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import platform
import time
from pathlib import Path
from typing import Any

from .. import __version__
from ..common.errors import ConformalSegError
from ..common.executors import MapReport, map_ordered
from ..io.atomic import atomic_write_text, check_can_write
from .cascade_options import add_cascade_argument, cascade_predictor_from_args
from .common import add_force, add_trust_option, progress_bar
from .dicom_options import add_series_uid_option
from .executor_options import add_executor_options, executor_spec
from .model_options import add_tta_option

INFERENCE_FORMAT = "conformalseg-inference"
INFERENCE_FORMAT_VERSION = 1


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "infer",
        help="run a network (model card) on images and write probability maps",
        description="Predict lesion probability maps (and MC-dropout uncertainty maps) for every "
        "image in --images with the pipeline fixed by a model card, on each image's own "
        "grid, ready for `calibrate`/`apply`.",
    )
    p.add_argument(
        "--model",
        type=Path,
        default=None,
        help="model card .json, folder with model_card.json (also a MONAI bundle), or a TorchScript "
        "file X.ts/X.pt with its card X.json beside it",
    )
    p.add_argument(
        "--images",
        type=Path,
        required=True,
        help="image file, folder of images (.nii.gz/.nrrd/.mha), an MSD/nnU-Net dataset folder, a DICOM series "
        "folder (one case, named after the folder), or a folder of case folders each holding one DICOM series",
    )
    add_series_uid_option(p)
    p.add_argument(
        "--subset",
        choices=("all", "tr", "ts"),
        default="all",
        help="MSD/nnU-Net datasets: imagesTr and imagesTs (all, default), imagesTr (tr) or imagesTs (ts)",
    )
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument(
        "--mc-dropout",
        type=int,
        default=0,
        metavar="N",
        help="MC dropout passes (run as one batch); the probability is their mean, and variance and "
        "entropy maps are written (default 0: deterministic)",
    )
    add_tta_option(p)
    p.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="auto: CUDA when available (default); cuda without a GPU falls back to the CPU",
    )
    p.add_argument("--no-amp", action="store_true", help="CUDA: full float32 instead of float16 mixed precision")
    p.add_argument(
        "--sw-batch-size",
        type=int,
        default=None,
        help="windows per forward call (default: the model card's); speed/memory only",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the MC dropout masks (default 0)")
    p.add_argument(
        "--profile",
        type=Path,
        default=None,
        help="predict exactly as this calibration profile's maps were predicted: its recorded MC passes, flips "
        "and seed are used, and a model whose pipeline fingerprint differs is refused (as `apply --image` does)",
    )
    add_cascade_argument(p)
    add_trust_option(p)
    add_force(p)
    add_executor_options(p)
    p.set_defaults(func=run)


def output_paths(out: Path, case_id: str, mc: bool, *, entropy: bool = True) -> dict[str, Path]:
    paths = {"probability": out / "probs" / f"{case_id}.nii.gz"}
    if mc:
        paths["variance"] = out / "uncertainty" / f"{case_id}_variance.nii.gz"
        if entropy:
            paths["entropy"] = out / "uncertainty" / f"{case_id}_entropy.nii.gz"
    return paths


def quantile_output_paths(out: Path, case_id: str) -> dict[str, Path]:
    """``lower/CASE.nii.gz`` and ``upper/CASE.nii.gz`` (quantile regression cards)."""
    return {"lower": out / "lower" / f"{case_id}.nii.gz", "upper": out / "upper" / f"{case_id}.nii.gz"}


def _check_options(args: argparse.Namespace) -> None:
    if args.mc_dropout < 0:
        raise ConformalSegError(f"--mc-dropout must be >= 0, got {args.mc_dropout}")
    if args.sw_batch_size is not None and args.sw_batch_size < 1:
        raise ConformalSegError(f"--sw-batch-size must be >= 1, got {args.sw_batch_size}")
    if args.out.exists() and not args.out.is_dir():
        raise ConformalSegError("output path exists and is not a folder", path=args.out, fix="give a folder for --out")


def _check_outputs(planned: list[tuple[Any, dict[str, Path]]], report_path: Path, args: argparse.Namespace) -> None:
    """Refuse existing outputs (unless ``--force``) before anything runs."""
    if not args.force:
        existing = [p for _, paths in planned for p in paths.values() if p.exists()]
        if report_path.exists():
            existing.append(report_path)
        if existing:
            raise ConformalSegError(
                f"{len(existing)} output file(s) already exist (e.g. {existing[0]})",
                path=args.out,
                fix="pass --force to overwrite or choose another --out",
            )
    check_can_write(report_path, force=args.force)


def _predict_all(
    engine: Any,
    planned: list[tuple[Any, dict[str, Path]]],
    args: argparse.Namespace,
    *,
    quantile: bool,
    mc: bool,
    report: MapReport,
) -> list[dict[str, Any]]:
    """Predict and write every planned case (one task per case on ``--executor``); return the per-case records.

    The engine (the network's weights) goes to each worker once; each task reads its image, predicts and
    writes its maps on the worker, and sends back only its record.
    """
    progress = progress_bar("inference")
    progress(0, len(planned), "")  # show the bar before the first (possibly long) case
    options = {"out": args.out, "force": args.force, "mc_dropout": args.mc_dropout, "tta": args.tta}
    options.update(quantile=quantile, mc=mc)
    return map_ordered(
        predict_case,
        (engine, options),
        planned,
        executor_spec(args),
        labels=[case.case_id for case, _ in planned],
        progress=progress,
        keep_going=args.keep_going,
        report=report,
    )


def predict_case(shared: tuple[Any, dict[str, Any]], item: tuple[Any, dict[str, Path]]) -> dict[str, Any]:
    """Predict one image and write its maps (the task of ``infer``; module level, so workers import it)."""
    from ..io.volumes import save_volume

    engine, o = shared
    case, paths = item
    t0 = time.perf_counter()
    volume = case.load()  # an image file, or a DICOM series folder (its own geometry goes to the outputs)
    if o["quantile"]:
        prediction = engine.predict_quantiles(volume)
        save_volume(prediction.lower, volume.geometry, paths["lower"], force=o["force"])
        save_volume(prediction.upper, volume.geometry, paths["upper"], force=o["force"])
    else:
        prediction = engine.predict(volume, mc_dropout=o["mc_dropout"], tta_flips=o["tta"])
        save_volume(prediction.probability, volume.geometry, paths["probability"], force=o["force"])
    if o["mc"]:
        save_volume(prediction.variance, volume.geometry, paths["variance"], force=o["force"])
        if "entropy" in paths:
            save_volume(prediction.entropy, volume.geometry, paths["entropy"], force=o["force"])
    return {
        "case_id": case.case_id,
        "image": str(case.path.resolve()),
        **{key: str(path.relative_to(o["out"])) for key, path in paths.items()},
        "seconds": round(time.perf_counter() - t0, 3),
        "inference_seconds": round(prediction.seconds, 3),
        "windows": prediction.info.get("windows"),
    }


def run(args: argparse.Namespace) -> int:
    from ..inference import InferenceEngine, find_images, resolve_model
    from ..inference.model_dataset import inference_provenance

    _check_options(args)
    cascade = cascade_predictor_from_args(args)  # builds its own engines from the config (and --model)
    if cascade is None and args.model is None:
        raise ConformalSegError("no model given", fix="pass --model CARD.json (or --cascade CONFIG)")
    card: Any = cascade.card if cascade is not None else resolve_model(args.model)  # a CascadeCard reads like one
    quantile = card.output.is_quantile
    if quantile and (args.mc_dropout or args.tta or cascade is not None):
        raise ConformalSegError(
            f"{card.describe()} is a quantile regression model: --mc-dropout, --tta and "
            "--cascade apply to lesion models only",
            fix="run it without those options",
        )
    cases = find_images(args.images, subset=args.subset, dicom=True, series_uid=args.series_uid)
    if args.profile is not None:
        _options_from_profile(args)
    mc = args.mc_dropout > 0 or (cascade is not None and cascade.config.stage2_mc_passes > 0)
    report_path = args.out / "inference.json"
    planned = [
        (
            case,
            quantile_output_paths(args.out, case.case_id)
            if quantile
            else output_paths(args.out, case.case_id, mc, entropy=cascade is None),
        )
        for case in cases
    ]
    _check_outputs(planned, report_path, args)  # before the long run, not after it

    engine: Any = (
        _engine_from_profile(args, cascade)
        if args.profile is not None
        else cascade
        or InferenceEngine(
            card, device=args.device, amp=not args.no_amp, sw_batch_size=args.sw_batch_size, seed=args.seed
        )
    )
    started = time.perf_counter()
    ran = MapReport("serial", 1, [])
    records = _predict_all(engine, planned, args, quantile=quantile, mc=mc, report=ran)
    report = {
        "format": INFERENCE_FORMAT,
        "format_version": INFERENCE_FORMAT_VERSION,
        **inference_provenance(card, engine, mc_dropout=args.mc_dropout, tta_flips=args.tta, seed=args.seed),
        **(cascade.provenance() if cascade is not None else {}),
        "card_content": card.to_dict(),
        "seeded_dropout": bool(mc and getattr(engine, "seeded_dropout", True)),
        "sw_batch_size": getattr(engine, "sw_batch_size", None),
        "images": str(args.images.resolve()),
        "cases": records,
        "total_seconds": round(time.perf_counter() - started, 3),
        **ran.provenance(),
        "created_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "versions": _versions(),
    }
    atomic_write_text(report_path, json.dumps(report, indent=2) + "\n", force=args.force)
    if quantile:
        levels = card.output.quantiles
        print(
            f"wrote {len(records)} quantile interval(s): q_{levels[0]:g} to {args.out / 'lower'}, "
            f"q_{levels[-1]:g} to {args.out / 'upper'}; report {report_path}"
        )
        return 0
    print(
        f"wrote {len(records)} probability map(s) to {args.out / 'probs'}"
        + (f" and uncertainty maps to {args.out / 'uncertainty'}" if mc else "")
        + f"; report {report_path}"
    )
    return 0


def _options_from_profile(args: argparse.Namespace) -> None:
    """``--profile``: MC passes, flips and seed as the profile recorded them (explicit different ones are refused)."""
    from ..conformal.profile import load_profile
    from ..inference.model_dataset import PROFILE_FIX

    record = load_profile(args.profile).provenance.get("inference") or {}
    passes, flips, seed = int(record.get("mc_passes", 0)), int(record.get("tta_flips", 1)), record.get("seed")
    tta_differs = args.tta is not None and args.tta != flips
    if (args.mc_dropout not in (0, passes)) or tta_differs or (args.seed not in (0, seed or 0)):
        raise ConformalSegError(
            f"--profile fixes the pipeline (MC passes {passes}, flips {flips if flips > 1 else 'off'}, seed {seed}); "
            "--mc-dropout, --tta or --seed differ from it",
            path=args.profile,
            fix=f"leave out --mc-dropout, --tta and --seed with --profile ({PROFILE_FIX})",
        )
    args.mc_dropout, args.tta, args.seed, args.profile_record = passes, flips if flips > 1 else None, seed or 0, record


def _engine_from_profile(args: argparse.Namespace, cascade: Any) -> Any:
    """The profile's pipeline through the library's check (:func:`engine_for_profile`, as ``apply --image``):
    a model whose fingerprint differs from the recorded one is an error, before any case runs."""
    from ..inference.model_dataset import engine_for_profile

    engine, _ = engine_for_profile(
        args.profile_record or None, args.model, device=args.device, profile_path=args.profile, engine=cascade
    )
    return engine


def _versions() -> dict[str, str]:
    import monai
    import torch

    return {
        "conformalseg": __version__,
        "torch": torch.__version__,
        "monai": monai.__version__,
        "python": platform.python_version(),
        "cuda": torch.version.cuda or "none",
    }
