"""Where a training step's time goes, and what bfloat16 mixed precision buys (``train --precision bf16``).

Five measurements on the shipped lesion model's recipe (``--task lesion`` with ``--loss blob-dice-ce``:
DynUNet 8..128 with deep supervision, batches of 2 crops of 48 x 48 x 32, a fresh phantom per sample),
starting from the shipped model's weights (``Resources/models/phantom_lesion_unet_v11``), in the benchmark
process with the thread count of ``--threads`` (default: torch's):

1. **Data, per sample** (what a loader worker does): generating the phantom, preparing it with the card's
   pipeline (:func:`ConformalSegLib.training.data.prepare_case`), cropping and augmenting. The label map's
   way onto the network grid side by side: the reorientation the preparation uses on the images' own grid
   against the nearest-neighbour resampling it used before (``monai.transforms.ResampleToMatch``), checked
   equal on every sample.
2. **Network step** (forward, loss, backward, AdamW step) on one fixed batch, fp32 against bf16, the two
   interleaved repetition by repetition; median seconds per step.
3. **Agreement**: on ``--batches`` real batches, the bf16 loss and gradient against the fp32 ones of the
   same weights and batch (dropout masks seeded alike): relative loss difference and the cosine between the
   two gradients.
4. **The training loop**: :func:`ConformalSegLib.training.optimization.fit` for ``--steps`` steps over the
   real :class:`~ConformalSegLib.training.phantom_stream.PhantomStreamSampler` (one loader worker, as
   ``train`` runs), fp32, then bf16, then bf16 with two crops cut from each phantom
   (``train --crops-per-phantom 2``: half the phantoms generated), one after the other: seconds per step as
   a run sees them.
5. **Dropout's share**: the self CPU time of ``aten::bernoulli_`` (drawing the dropout masks) in
   ``torch.profiler`` over four bf16 network steps, as a share of the steps' CPU time.

Run: ``.venv/bin/python benchmarks/bench_training_step.py [--quick]`` (about 3 minutes on 2 cores;
``--quick``: a tiny network and a few steps, seconds).
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

import _common as C
import numpy as np

MODEL = C.REPO_ROOT / "Resources" / "models" / "phantom_lesion_unet_v11"


def _extra(parser) -> None:
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    parser.add_argument("--samples", type=int, default=None, help="phantoms for the data timing (default 20)")
    parser.add_argument("--repeats", type=int, default=None, help="network steps per precision (default 15)")
    parser.add_argument("--batches", type=int, default=None, help="batches for the agreement (default 8)")
    parser.add_argument("--steps", type=int, default=None, help="training-loop steps per precision (default 60)")


def _config(quick: bool, precision: str):
    from ConformalSegLib.training import TrainingConfig

    if quick:
        shape = dict(
            channels=(4, 8, 16), strides=((2, 2, 1), (2, 2, 2)), patch_size=(32, 32, 16), crop_size=(16, 16, 8)
        )
    else:
        shape = dict(
            channels=(8, 16, 32, 64, 128),
            strides=((2, 2, 1), (2, 2, 2), (2, 2, 2), (2, 2, 1)),
            patch_size=(64, 64, 48),
            crop_size=(48, 48, 32),
        )
    return TrainingConfig(
        **shape,
        network="dynunet",
        deep_supervision=True,
        dropout=0.05,
        spacing_mm=None,
        loss="blob-dice-ce",
        optimizer="adamw",
        learning_rate=3e-4,
        weight_decay=1e-4,
        lr_schedule="poly",
        batch_size=2,
        fg_fraction=0.5,
        augment=True,
        num_workers=1,
        device="cpu",
        precision=precision,
    )


def _network(config, quick: bool):
    import torch

    from ConformalSegLib.training.networks import build_network

    torch.manual_seed(0)
    network = build_network(config.network, config.network_args())
    if not quick:
        network.load_state_dict(torch.load(MODEL / "weights.pt", weights_only=True))
    return network


def data_timing(card, stream, samples: int, crops) -> tuple[list[list[object]], str]:
    """Per-sample seconds of each data stage, and the label path against the old resampling."""
    import torch
    from monai.transforms import ResampleToMatch

    from ConformalSegLib.inference.preprocessing import build_preprocessing
    from ConformalSegLib.io.volumes import Volume
    from ConformalSegLib.training.augmentation import AugmentationConfig
    from ConformalSegLib.training.data import prepare_case, to_meta_tensor
    from ConformalSegLib.training.patches import sample_patch

    spatial, _ = build_preprocessing(card)
    assert spatial is not None
    resample = ResampleToMatch(mode="nearest", padding_mode="zeros")
    times: dict[str, list[float]] = {k: [] for k in ("generate", "prepare", "patch", "reorient", "resample")}
    for i in range(samples + 1):  # the first sample warms up and is not counted
        t0 = time.perf_counter()
        case = stream.training_case(i)
        t1 = time.perf_counter()
        prepared = prepare_case(card, case, (6,), crops)
        t2 = time.perf_counter()
        sample_patch(prepared, crops, np.random.default_rng(i), fg_fraction=0.5, augmentation=AugmentationConfig())
        t3 = time.perf_counter()
        image, labels = case.volumes()
        lesion = to_meta_tensor(Volume((np.asarray(labels.array) == 6).astype(np.float32), labels.geometry, None))
        grid = spatial(to_meta_tensor(image))
        t4 = time.perf_counter()
        reoriented = spatial(lesion)
        t5 = time.perf_counter()
        resampled = resample(lesion, img_dst=grid)
        t6 = time.perf_counter()
        assert torch.equal(reoriented.as_tensor(), resampled.as_tensor()), f"sample {i}: the label paths differ"
        if i:
            for key, dt in zip(times, (t1 - t0, t2 - t1, t3 - t2, t5 - t4, t6 - t5)):
                times[key].append(dt)
    med = {k: statistics.median(v) for k, v in times.items()}
    total = med["generate"] + med["prepare"] + med["patch"]
    rows: list[list[object]] = [
        ["generate the phantom (`make_phantom`)", C.fmt_s(med["generate"]), f"{med['generate'] / total:.0%}"],
        ["prepare it (`prepare_case`: reorient, window, label onto the grid)", C.fmt_s(med["prepare"]),
         f"{med['prepare'] / total:.0%}"],
        ["crop and augment (`sample_patch`)", C.fmt_s(med["patch"]), f"{med['patch'] / total:.0%}"],
        ["**one sample**", f"**{C.fmt_s(total)}**", "100%"],
    ]  # fmt: skip
    note = (
        f"The label map onto the network grid: reorientation {C.fmt_s(med['reorient'])} against the "
        f"nearest-neighbour resampling used before {C.fmt_s(med['resample'])} "
        f"({C.fmt_ratio(med['resample'] / med['reorient'])}), the same voxels on all {samples} samples."
    )
    return rows, note


def _seeded_loss(network, config, images, targets, seed: int):
    import torch

    from ConformalSegLib.training.trainer import training_loss

    torch.manual_seed(seed)  # the same dropout masks for both precisions
    return training_loss(network, config, torch.device("cpu"))(images, targets)


def step_timing(configs, network, batch, repeats: int) -> dict[str, float]:
    """Median seconds of one optimiser step per precision, interleaved."""
    import copy

    from ConformalSegLib.training.optimization import build_optimizer

    images, targets = batch
    nets = {p: copy.deepcopy(network).train() for p in configs}
    opts = {p: build_optimizer("adamw", nets[p].parameters(), 3e-4, 1e-4) for p in configs}
    times: dict[str, list[float]] = {p: [] for p in configs}
    for r in range(repeats + 2):  # two warm-ups
        for p, config in configs.items():
            t = time.perf_counter()
            loss = _seeded_loss(nets[p], config, images, targets, r)
            opts[p].zero_grad(set_to_none=True)
            loss.backward()
            opts[p].step()
            if r >= 2:
                times[p].append(time.perf_counter() - t)
    return {p: statistics.median(v) for p, v in times.items()}


def agreement(configs, network, batches) -> tuple[list[float], list[float]]:
    """Per batch: |loss_bf16 - loss_fp32| / loss_fp32 and the cosine between the two gradients."""
    import torch

    network.train()
    rel, cos = [], []
    for k, (images, targets) in enumerate(batches):
        out = {}
        for p, config in configs.items():
            network.zero_grad(set_to_none=True)
            loss = _seeded_loss(network, config, images, targets, 1000 + k)
            loss.backward()
            grad = torch.cat([q.grad.flatten() for q in network.parameters() if q.grad is not None])
            out[p] = (float(loss.detach()), grad)
        (l32, g32), (l16, g16) = out["fp32"], out["bf16"]
        rel.append(abs(l16 - l32) / abs(l32))
        cos.append(float(torch.nn.functional.cosine_similarity(g16, g32, dim=0)))
    return rel, cos


def loop_timing(variants, network, card, stream, steps: int) -> dict[str, float]:
    """Seconds per step of ``fit`` over the real sampler (one worker) for each ``name: (config, crops per
    phantom)``, one after the other, from the same weights."""
    import copy

    import torch

    from ConformalSegLib.training.augmentation import AugmentationConfig
    from ConformalSegLib.training.optimization import fit
    from ConformalSegLib.training.phantom_stream import PhantomStreamSampler
    from ConformalSegLib.training.trainer import training_loss

    result = {}
    for name, (config, crops_per_phantom) in variants.items():
        sampler = PhantomStreamSampler(
            stream, card, (6,), config.crops, batch_size=2, steps_per_epoch=steps, fg_fraction=0.5,
            augmentation=AugmentationConfig(), num_workers=1, crops_per_phantom=crops_per_phantom,
        )  # fmt: skip
        net = copy.deepcopy(network)
        torch.manual_seed(0)
        log = fit(net, sampler, training_loss(net, config, torch.device("cpu")), epochs=1, learning_rate=3e-4,
                  lr_schedule="poly", device=torch.device("cpu"), optimizer="adamw", weight_decay=1e-4)  # fmt: skip
        result[name] = log[0]["seconds"] / steps
    return result


def dropout_share(config, network, batch, steps: int = 4) -> float:
    """Share of a network step's CPU time spent drawing dropout masks (``aten::bernoulli_``, self time)."""
    import copy

    from torch.profiler import ProfilerActivity, profile

    from ConformalSegLib.training.optimization import build_optimizer

    net = copy.deepcopy(network).train()
    opt = build_optimizer("adamw", net.parameters(), 3e-4, 1e-4)

    def step(r: int) -> None:
        loss = _seeded_loss(net, config, *batch, r)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step(0)  # warm-up
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for r in range(steps):
            step(r + 1)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    return sum(e.self_cpu_time_total for e in events if e.key == "aten::bernoulli_") / total


def main(argv: list[str] | None = None) -> int:
    args = C.parse_args(__doc__.splitlines()[0], argv, _extra)
    import torch

    from ConformalSegLib.training.phantom_stream import PhantomStream
    from ConformalSegLib.training.trainer import build_card

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    quick = args.quick
    samples = args.samples or (3 if quick else 20)
    repeats = args.repeats or (3 if quick else 15)
    n_batches = args.batches or (2 if quick else 8)
    steps = args.steps or (4 if quick else 60)
    stream = PhantomStream(9000 + args.seed, {"shape": (24, 48, 48)} if quick else {})
    configs = {p: _config(quick, p) for p in ("fp32", "bf16")}
    crops = configs["fp32"].crops
    with tempfile.TemporaryDirectory() as tmp:
        card = build_card(configs["fp32"], Path(tmp))
        network = _network(configs["fp32"], quick)
        C.log(f"data: {samples} phantoms ...")
        data_rows, data_note = data_timing(card, stream, samples, crops)
        from ConformalSegLib.training.phantom_stream import PhantomStreamSampler

        sampler = PhantomStreamSampler(stream, card, (6,), crops, batch_size=2, steps_per_epoch=n_batches,
                                       fg_fraction=0.5, augmentation=None, num_workers=0)  # fmt: skip
        batches = list(sampler.epoch(0))
        C.log(f"network step: {repeats} repetitions per precision ...")
        step = step_timing(configs, network, batches[0], repeats)
        C.log(f"agreement on {n_batches} batches ...")
        rel, cos = agreement(configs, _network(configs["fp32"], quick), batches)
        C.log("dropout's share of the bf16 network step ...")
        dropout = dropout_share(configs["bf16"], network, batches[0])
        C.log(f"training loop: {steps} steps per variant ...")
        variants = {"fp32": (configs["fp32"], 1), "bf16": (configs["bf16"], 1), "bf16, 2 crops": (configs["bf16"], 2)}
        loop = loop_timing(variants, network, card, stream, steps)
    quick_flag = " --quick" if quick else ""
    what = "tiny network" if quick else "v11's network and weights"
    print(f"### Training step: data, network, bf16 (bench_training_step.py{quick_flag})\n")
    print(f"- {C.machine_line()}; {torch.get_num_threads()} torch thread(s), torch {torch.__version__}; {what}, "
          f"batches of 2 crops of {' x '.join(map(str, crops))}, blob Dice-CE with deep supervision.\n")  # fmt: skip
    print(C.md_table([f"data, per sample (median of {samples})", "time", "share"], data_rows))
    print(f"\n{data_note}\n")
    rows = [
        ["network step (forward, loss, backward, AdamW), one batch", C.fmt_s(step["fp32"]), C.fmt_s(step["bf16"]),
         C.fmt_ratio(step["fp32"] / step["bf16"])],
        [f"training loop (`fit`, real sampler, 1 worker), {steps} steps", C.fmt_s(loop["fp32"]),
         C.fmt_s(loop["bf16"]), C.fmt_ratio(loop["fp32"] / loop["bf16"])],
    ]  # fmt: skip
    print(C.md_table(["seconds per step", "fp32 (baseline)", "bf16", "fp32 / bf16"], rows))
    crops_rows = [
        [f"training loop (`fit`, real sampler, 1 worker, bf16), {steps} steps", C.fmt_s(loop["bf16"]),
         C.fmt_s(loop["bf16, 2 crops"]), C.fmt_ratio(loop["bf16"] / loop["bf16, 2 crops"]),
         C.fmt_ratio(loop["fp32"] / loop["bf16, 2 crops"])],
    ]  # fmt: skip
    print()
    print(C.md_table(["seconds per step", "a phantom per crop (baseline)", "`--crops-per-phantom 2`", "ratio",
                      "against fp32, a phantom per crop"], crops_rows))  # fmt: skip
    print(
        f"\nDrawing dropout masks (`aten::bernoulli_`, dropout {configs['bf16'].dropout:g} in the DynUNet's blocks) "
        f"is {dropout:.0%} of the bf16 network step's CPU time."
    )
    print(
        f"\nbf16 against fp32 on {n_batches} real batches, same weights, batch and dropout masks: relative loss "
        f"difference median {statistics.median(rel):.1e} (max {max(rel):.1e}); cosine between the gradients "
        f"median {statistics.median(cos):.4f} (min {min(cos):.4f})."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
