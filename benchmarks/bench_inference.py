"""Inference engine overhead and MC dropout batching.

1. **Engine vs bare MONAI** on the same network, weights and volume: ``InferenceEngine.predict``
   (card: no reorientation, no resampling, intensity window, patch/overlap/Gaussian blending as
   below) against a bare ``monai.inferers.sliding_window_inference`` doing the same maths (window the
   intensities, per-window softmax, lesion channel, back to a C-contiguous numpy ``(z, y, x)``
   array). The ratio is the engine's overhead (goal <= 1.10x). One-time model loading is excluded
   (engines and the bare network are built before timing). On CUDA a second bare row copies the
   result to the host through page-locked memory as the engine does (a plain ``.cpu()`` of a 300 MB
   map into pageable memory is slow on some machines), so the engine's own overhead is visible.
   Another row times the engine with RAS reorientation and resampling to the card spacing (other
   work, for information).
2. **MC dropout, N passes**: the engine's batched passes (each window batch repeated N times along
   the batch axis, one forward call) vs the same engine one pass per forward call (``mc_chunk=1``)
   vs the naive way: N full sliding-window passes of bare MONAI with dropout in train mode.
3. **CUDA only**: the same on a 512 x 512 x 300 volume (float16 autocast) and on a small volume,
   with peak GPU memory.

Network: ``monai.networks.nets.UNet`` with dropout (random weights; speed does not depend on them).
Times are medians of interleaved runs (round-robin over the compared pipelines, after one warm-up
round, so drift on a shared machine hits all alike); every timed call ends with the result in host
memory (so CUDA work is synchronised).

Run: ``.venv/bin/python benchmarks/bench_inference.py [--quick] [--device auto|cpu|cuda]
[--skip-cpu] [--profile]`` (``--profile``: cProfile of the engine calls on stderr).
"""

from __future__ import annotations

import gc
import json
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import _common as C
import numpy as np

try:
    import torch
    from monai.inferers import sliding_window_inference
    from monai.networks.nets import UNet
except ImportError as exc:  # pragma: no cover - the inference extra is optional
    print(f"### Inference engine\n\nskipped: {exc} (install the `inference` extra: torch and monai)")
    sys.exit(0)

from ConformalSegLib.common.geometry import Geometry
from ConformalSegLib.inference import InferenceEngine, count_windows, load_model_card
from ConformalSegLib.io.volumes import Volume

WINDOW = {"kind": "window", "a_min": -200.0, "a_max": 300.0, "b_min": 0.0, "b_max": 1.0, "clip": True}


def net_args(size: str) -> dict:
    channels = {"quick": [4, 8, 16], "cpu": [8, 16, 32, 64], "gpu": [16, 32, 64, 128, 256]}[size]
    return {
        "spatial_dims": 3,
        "in_channels": 1,
        "out_channels": 2,
        "channels": channels,
        "strides": [2] * (len(channels) - 1),
        "num_res_units": 2,
        "dropout": 0.1,
    }


def write_card(
    folder: Path, name: str, args: dict, patch: list[int], sw_batch: int, *, orientation=None, spacing=None
) -> Path:
    card = {
        "format": "conformalseg-model-card",
        "format_version": 1,
        "name": name,
        "source": {"state_dict": {"network": "UNet", "args": args, "weights": "weights.pt"}},
        "preprocessing": {"orientation": orientation, "spacing_mm": spacing, "intensity": WINDOW},
        "inference": {"patch_size": patch, "overlap": 0.25, "blend": "gaussian", "sw_batch_size": sw_batch},
        "output": {"activation": "softmax", "lesion_channel": 1},
    }
    path = folder / f"{name}.json"
    path.write_text(json.dumps(card, indent=2))
    return path


def make_ct(shape_zyx: tuple[int, int, int], seed: int, spacing=(0.8, 0.8, 2.0)) -> Volume:
    """A CT-like float32 volume: smooth tissue field in HU plus noise (identity direction, LPS)."""
    rng = np.random.default_rng(seed)
    coarse = tuple(max(4, s // 16) for s in shape_zyx)
    field = C._smooth_field(rng, coarse, shape_zyx)
    field *= np.float32(120.0)
    field += np.float32(40.0)
    field += rng.standard_normal(shape_zyx, dtype=np.float32) * np.float32(20.0)
    return Volume(field, Geometry(shape=shape_zyx, spacing=spacing), None)


class Bare:
    """Bare MONAI: the same maths as the engine, no card, no MetaTensor, no geometry."""

    def __init__(self, net: torch.nn.Module, patch: list[int], sw_batch: int, device: torch.device, amp: bool):
        self.net, self.patch, self.sw_batch, self.device = net, patch, sw_batch, device
        self.amp = amp and device.type == "cuda"

    def _predictor(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cuda", dtype=torch.float16, enabled=self.amp):
            logits = self.net(x)
        return torch.softmax(logits.float(), dim=1)[:, 1:2]

    def window(self, array_zyx: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(array_zyx).to(self.device).permute(2, 1, 0)[None, None]
        return ((x - WINDOW["a_min"]) / (WINDOW["a_max"] - WINDOW["a_min"])).clamp_(0.0, 1.0)

    def predict(self, array_zyx: np.ndarray, pinned: bool = False) -> np.ndarray:
        with torch.inference_mode():
            out = sliding_window_inference(
                self.window(array_zyx), self.patch, self.sw_batch, self._predictor, overlap=0.25, mode="gaussian"
            )
            out = out[0, 0].permute(2, 1, 0).contiguous()
            if pinned and out.is_cuda:  # what the engine does: device -> page-locked host memory
                host = torch.empty(out.shape, dtype=out.dtype, pin_memory=True)
                return host.copy_(out).numpy()
            return out.cpu().numpy()

    def predict_mc_naive(self, array_zyx: np.ndarray, passes: int) -> np.ndarray:
        """N full sliding-window passes with dropout in train mode (global RNG), averaged."""
        dropouts = [m for m in self.net.modules() if isinstance(m, torch.nn.modules.dropout._DropoutNd)]
        for m in dropouts:
            m.train(True)
        try:
            with torch.inference_mode():
                x = self.window(array_zyx)
                total = None
                for _ in range(passes):
                    out = sliding_window_inference(
                        x, self.patch, self.sw_batch, self._predictor, overlap=0.25, mode="gaussian"
                    )
                    total = out if total is None else total + out
                return (total / passes)[0, 0].permute(2, 1, 0).contiguous().cpu().numpy()
        finally:
            for m in dropouts:
                m.train(False)


def ratio(a: float, b: float) -> str:
    return f"{a / b:.3f}x"


def interleaved(fns: dict, repeats: int) -> tuple[dict[str, float], dict[str, object]]:
    """Median seconds of each function, timed round-robin (one warm-up round first) so that drift of
    a shared machine hits all of them alike; also the last result of each."""
    results = {name: fn() for name, fn in fns.items()}
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            gc.collect()
            t0 = time.perf_counter()
            results[name] = fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}, results


def profile_engine(engine: InferenceEngine, volume: Volume, **kwargs) -> None:
    """cProfile of three engine calls, top functions by own time, to stderr."""
    import cProfile
    import io
    import pstats

    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(3):
        engine.predict(volume, **kwargs)
    profiler.disable()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(18)
    C.log(text.getvalue())


def run_section(
    title: str,
    device: torch.device,
    shape_zyx,
    patch,
    sw_batch,
    size: str,
    passes: int,
    repeats: int,
    seed: int,
    workdir: Path,
    *,
    resample_row: bool,
    mc: bool,
    profile: bool = False,
) -> list[str]:
    torch.manual_seed(seed)
    args = net_args(size)
    net = UNet(**args).eval()
    torch.save(net.state_dict(), workdir / "weights.pt")
    plain_card = load_model_card(write_card(workdir, f"plain-{size}", args, patch, sw_batch))
    amp = device.type == "cuda"
    engine = InferenceEngine(plain_card, device=device, amp=amp)  # model loading: not timed
    bare = Bare(net.to(device), patch, sw_batch, device, amp)
    volume = make_ct(shape_zyx, seed)
    windows = count_windows(shape_zyx[::-1], patch, 0.25)
    C.log(f"[{title}] volume {shape_zyx[::-1]} (x,y,z), patch {patch}, {windows} windows, sw_batch {sw_batch}")

    fns = {"bare": lambda: bare.predict(volume.array), "engine": lambda: engine.predict(volume)}
    if device.type == "cuda":
        fns["bare pinned"] = lambda: bare.predict(volume.array, pinned=True)
    if resample_row:
        card = load_model_card(
            write_card(workdir, f"ras-{size}", args, patch, sw_batch, orientation="RAS", spacing=[1.0, 1.0, 1.5])
        )
        resampling = InferenceEngine(card, device=device, amp=amp)
        fns["resampling"] = lambda: resampling.predict(volume)
    t, out = interleaved(fns, repeats)
    C.log("  " + ", ".join(f"{k} {C.fmt_s(v)}" for k, v in t.items()))
    if profile:
        profile_engine(engine, volume)
    diff = float(np.abs(out["engine"].probability - out["bare"]).max())
    rows = [
        ["bare MONAI `sliding_window_inference` (same maths)", C.fmt_s(t["bare"]), "1.000x", ""],
        [
            "`InferenceEngine.predict` (no reorientation/resampling)",
            C.fmt_s(t["engine"]),
            ratio(t["engine"], t["bare"]),
            f"max abs diff {diff:.1e}",
        ],
    ]
    if "bare pinned" in t:
        rows.insert(
            1,
            [
                "bare MONAI, result copied to the host through pinned memory (as the engine does)",
                C.fmt_s(t["bare pinned"]),
                ratio(t["bare pinned"], t["bare"]),
                "",
            ],
        )
        rows[2][3] += f"; {ratio(t['engine'], t['bare pinned'])} of bare+pinned"
    if resample_row:
        grid = out["resampling"].info["network_grid_xyz"]
        rows.append(
            [
                f"engine, RAS + resampling to 1 x 1 x 1.5 mm (network grid {grid[0]}x{grid[1]}x{grid[2]}, "
                f"{out['resampling'].info['windows']} windows; more work)",
                C.fmt_s(t["resampling"]),
                ratio(t["resampling"], t["bare"]),
                "",
            ]
        )
    lines = [
        f"#### {title}",
        "",
        f"Volume {shape_zyx[2]} x {shape_zyx[1]} x {shape_zyx[0]} (x * y * z), UNet channels "
        f"{args['channels']}, patch {patch[0]}x{patch[1]}x{patch[2]}, overlap 0.25, Gaussian blending, "
        f"sw_batch_size {sw_batch}, {windows} windows, device {device}"
        + (" (float16 autocast)" if amp else "")
        + f"; medians of {repeats} interleaved runs.",
        "",
        C.md_table(["pipeline", "median time", "vs bare", "note"], rows),
        "",
    ]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        engine.predict(volume)
        lines.insert(
            -1,
            f"Peak GPU memory of one deterministic engine call: "
            f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB.\n",
        )
    if not mc:
        return lines
    sequential = InferenceEngine(plain_card, device=device, amp=amp, mc_chunk=1)
    mc_fns = {
        "batched": lambda: engine.predict(volume, mc_dropout=passes),
        "sequential": lambda: sequential.predict(volume, mc_dropout=passes),
        "naive": lambda: bare.predict_mc_naive(volume.array, passes),
    }
    mc_repeats = max(1, repeats - 1)
    t, out = interleaved(mc_fns, mc_repeats)
    C.log("  MC: " + ", ".join(f"{k} {C.fmt_s(v)}" for k, v in t.items()))
    if profile:
        profile_engine(engine, volume, mc_dropout=passes)
    mem = ""
    if device.type == "cuda":
        peaks = {}
        for name in ("batched", "sequential"):
            torch.cuda.reset_peak_memory_stats(device)
            mc_fns[name]()
            peaks[name] = torch.cuda.max_memory_allocated(device) / 2**30
        mem = f" Peak GPU memory: batched {peaks['batched']:.2f} GiB, one pass per call {peaks['sequential']:.2f} GiB."
    same = float(np.abs(out["batched"].probability - out["sequential"].probability).max())
    naive_gap = float(np.abs(out["batched"].probability - out["naive"]).mean())
    rows = [
        [
            f"engine, {passes} passes batched ({passes * sw_batch} rows per forward call)",
            C.fmt_s(t["batched"]),
            "1.000x",
        ],
        [
            f"engine, one pass per forward call (`mc_chunk=1`, {sw_batch} rows)",
            C.fmt_s(t["sequential"]),
            ratio(t["sequential"], t["batched"]),
        ],
        [
            f"naive: {passes} full sliding-window passes (bare MONAI, train-mode dropout)",
            C.fmt_s(t["naive"]),
            ratio(t["naive"], t["batched"]),
        ],
    ]
    lines += [
        f"MC dropout, {passes} passes (mean probability, variance and entropy maps for the engine; "
        f"the naive baseline computes the mean only); medians of {mc_repeats} interleaved runs.{mem} "
        f"Batched vs one-pass-per-call engine maps: max abs difference {same:.1e} (same seeded masks); "
        f"engine vs naive mean: mean abs difference {naive_gap:.1e} (different masks, same distribution).",
        "",
        C.md_table(["MC dropout", "median time", "vs batched"], rows),
        "",
    ]
    return lines


def _options(parser) -> None:
    parser.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="auto: CPU section, plus the CUDA sections when a GPU is present; cpu: CPU only",
    )
    parser.add_argument("--profile", action="store_true", help="print a cProfile of engine.predict to stderr")
    parser.add_argument("--skip-cpu", action="store_true", help="only the CUDA sections")


def main(argv: list[str] | None = None) -> int:
    args = C.parse_args(__doc__.splitlines()[0], argv, extra=_options)
    warnings.simplefilter("ignore", FutureWarning)
    cuda = torch.cuda.is_available() and args.device != "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        C.log("CUDA requested but not available: CPU only")
    out = [
        "### Inference engine",
        "",
        C.machine_line() + f"; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads" + (f"; GPU {torch.cuda.get_device_name()}" if cuda else ""),
        "",
    ]
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        cpu = torch.device("cpu")
        if args.skip_cpu and cuda:
            pass
        elif args.quick:
            out += run_section(
                "CPU (quick)",
                cpu,
                (40, 48, 48),
                [32, 32, 32],
                2,
                "quick",
                passes=4,
                repeats=2,
                seed=args.seed,
                workdir=workdir,
                resample_row=True,
                mc=True,
            )
        else:
            out += run_section(
                "CPU",
                cpu,
                (80, 128, 128),
                [64, 64, 64],
                2,
                "cpu",
                passes=4,
                repeats=9,
                seed=args.seed,
                workdir=workdir,
                resample_row=True,
                mc=True,
                profile=args.profile,
            )
        if cuda:
            gpu = torch.device("cuda")
            if args.quick:
                out += run_section(
                    "CUDA (quick)",
                    gpu,
                    (64, 128, 128),
                    [64, 64, 64],
                    4,
                    "gpu",
                    passes=4,
                    repeats=2,
                    seed=args.seed,
                    workdir=workdir,
                    resample_row=False,
                    mc=True,
                )
            else:
                out += run_section(
                    "CUDA, 512 x 512 x 300",
                    gpu,
                    (300, 512, 512),
                    [96, 96, 96],
                    4,
                    "gpu",
                    passes=8,
                    repeats=3,
                    seed=args.seed,
                    workdir=workdir,
                    resample_row=True,
                    mc=True,
                    profile=args.profile,
                )
                out += run_section(
                    "CUDA, small volume 128 x 128 x 64 (batching matters most)",
                    gpu,
                    (64, 128, 128),
                    [64, 64, 64],
                    4,
                    "gpu",
                    passes=8,
                    repeats=5,
                    seed=args.seed,
                    workdir=workdir,
                    resample_row=False,
                    mc=True,
                    profile=args.profile,
                )
        elif not args.quick:
            out += ["CUDA not available: the 512 x 512 x 300 GPU timing was skipped.", ""]
    print("\n".join(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
