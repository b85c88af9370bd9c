"""DeepZero's black-box defense by denoised smoothing, in miniature on the digits.

A digits classifier trained beforehand by backprop is the black box (only its logits are
queried). A small residual conv denoiser in front of it is trained on noisy images so that
the black box classifies the denoised images correctly (:mod:`zohpc.tasks.denoise`), and the
pair is certified by randomized smoothing (:mod:`zohpc.smoothing`, Cohen et al. 2019).
Three defenses, the same black box and the same certification:

* ``none``: smoothing the black box alone;
* ``fo_ds``: the denoiser trained by backprop through a white-box copy of the classifier
  (the upper bound a black box denies);
* ``zo_ds``: the denoiser trained by zohpc (CGE over MPI) through the black box;
* ``gb_ds``: gray-box mode (``zo.boundary = "outputs"``, :mod:`zohpc.steps.graybox`): the
  classifier stays a black box but the denoiser is white-box, so the queries perturb the
  denoised image (CGE over its 64 pixels, one image per query) and one backward pass through
  the denoiser gives the parameter gradient (ZO-AE-DS's idea with the image as the interface).

Noise level: sigma = 0.25 in [0, 1] pixel units (one quarter of the pixel range, as the
paper's ImageNet setting). Radii: 0 / 0.2 / 0.4 / 0.6: with n = 10,000 samples at
alpha = 0.001 no point can be certified beyond 0.80 (every sample agreeing), and the
paper's 0.75 needs p_A >= 0.99865, which only a few 8x8 digits reach for any defense.
"""

from __future__ import annotations

import time

import torch

from ..plotting import figure

PAPER = {
    "source": "DeepZero (Chen et al., ICLR 2024), ImageNet-10, sigma = 0.25",
    "radii": [0.0, 0.25, 0.5, 0.75],
    "certified_accuracy": {
        "fo_ds": [89.33, 81.67, 68.87, 49.80],
        "zo_ds": [86.02, 76.61, 61.80, 43.05],
        "zo_ae_ds": [63.60, 52.80, 43.13, 32.73],
    },
}

METHODS = ("none", "fo_ds", "zo_ds", "gb_ds")
LABELS = {"none": "no denoiser", "fo_ds": "FO-DS (white box)", "zo_ds": "ZO-DS (zohpc)",
          "gb_ds": "GB-DS (gray-box)"}
PAPER_LABELS = {"fo_ds": "FO-DS", "zo_ds": "ZO-DS (DeepZero)", "zo_ae_ds": "ZO-AE-DS"}
COLORS = {"none": "tab:gray", "fo_ds": "tab:blue", "zo_ds": "tab:orange", "zo_ae_ds": "tab:green",
          "gb_ds": "tab:red"}
RADII = (0.0, 0.2, 0.4, 0.6)

SETTINGS = {
    False: dict(images=360, n0=100, n=10000, fo_epochs=30, zo_epochs=4, zo_max_steps=0, batch_size=64, lr=3e-3),
    True: dict(images=30, n0=50, n=500, fo_epochs=3, zo_epochs=1, zo_max_steps=40, batch_size=32, lr=1e-2),
}
COMMON = dict(sigma=0.25, alpha=0.001, seed=0)


def zo_overrides(s: dict, c: dict) -> list[str]:
    """The ZO-DS run: DeepZero's sparse CGE (ZO-GraSP ratios at 50% sparsity, a fresh layer-wise
    random mask every epoch; about 380 of the 737 coordinates per step), Adam, constant step size."""
    return ["zo.estimator=cge", "prune.method=zo_grasp", "prune.sparsity=0.5", "prune.mask_interval=1",
            "optim.name=adam", f"optim.lr={s['lr']}",
            "optim.schedule=constant", f"data.batch_size={s['batch_size']}", f"train.epochs={s['zo_epochs']}",
            f"train.max_steps={s['zo_max_steps']}", f"train.seed={c['seed']}"]


def gb_overrides(s: dict, c: dict) -> list[str]:
    """GB-DS: the same optimizer, lr, batches and steps as ZO-DS; central differences at the
    denoised pixels (mu 5e-3 of the [0, 1] range; the black box's float32 logits make a forward
    difference at a smaller mu noisy), one stacked pass of 129 images per training image."""
    return ["zo.estimator=cge", "zo.boundary=outputs", "zo.difference=central", "zo.mu=5e-3", "zo.query_batch=129",
            "prune.method=none", "optim.name=adam", f"optim.lr={s['lr']}", "optim.schedule=constant",
            f"data.batch_size={s['batch_size']}", f"train.epochs={s['zo_epochs']}",
            f"train.max_steps={s['zo_max_steps']}", f"train.seed={c['seed']}"]


def run(comm, out_dir: str, quick: bool) -> dict:
    import zohpc

    from ..config import Config
    from ..smoothing import certified_accuracy, certify_set, max_radius
    from ..steps.protocol import share_state
    from ..tasks.blackbox import BlackBox, accuracy, load_pixels, train_classifier
    from ..tasks.denoise import DEFAULTS, make_denoiser, make_task, train_fo

    s, c = SETTINGS[bool(quick)], dict(COMMON)
    comm.set_threads()
    data = load_pixels(Config().data)
    opts = dict(DEFAULTS, sigma=c["sigma"], seed=c["seed"])
    clf = train_classifier(data, opts["classifier"], int(opts["classifier_epochs"]), seed=c["seed"], comm=comm)
    task = make_task(clf, data, opts)
    channels = data.input_shape[0]

    # ---- FO-DS: backprop through a white-box copy, on the driver, then shared
    t0 = time.perf_counter()
    fo = make_denoiser(channels, int(opts["width"]), int(opts["depth"]), c["seed"])
    if comm.is_driver:
        train_fo(fo, clf, task.train, s["fo_epochs"], lr=s["lr"], batch_size=s["batch_size"], seed=c["seed"])
    share_state(comm, fo)
    fo_seconds = time.perf_counter() - t0

    # ---- ZO-DS: zohpc trains the task's denoiser through the black box (same start as FO-DS)
    t0 = time.perf_counter()
    summary = zohpc.run(task, overrides=zo_overrides(s, c), save=False)
    zo_seconds = time.perf_counter() - t0
    zo = task.model

    # ---- GB-DS: gray-box mode, the same denoiser start, objective and black box
    gray = make_task(clf, data, opts)
    t0 = time.perf_counter()
    gb_summary = zohpc.run(gray, overrides=gb_overrides(s, c), save=False)
    gb_seconds = time.perf_counter() - t0

    # ---- certification of the three smoothed classifiers, test points split over ranks
    bb = BlackBox(clf)
    pipelines = {"none": lambda z: z, "fo_ds": fo, "zo_ds": zo, "gb_ds": gray.model}
    xs, ys = data.test_x[:s["images"]], data.test_y[:s["images"]].numpy()
    tx, ty = task.test
    cert, noisy, curves, seconds = {}, {}, {}, {}
    grid = [round(0.02 * k, 2) for k in range(int(c["sigma"] * 4 / 0.02) + 1)]
    for name, den in pipelines.items():
        t0 = time.perf_counter()

        @torch.no_grad()
        def classify(z, den=den):
            return bb(den(z)).argmax(1)

        preds, radii = certify_set(classify, xs, c["sigma"], s["n0"], s["n"], c["alpha"], data.num_classes,
                                   seed=c["seed"], comm=comm)
        cert[name] = certified_accuracy(preds, radii, ys, RADII)
        curves[name] = certified_accuracy(preds, radii, ys, grid)
        with torch.no_grad():
            noisy[name] = accuracy(lambda z, den=den: clf(den(z)), tx, ty)
        seconds[name] = time.perf_counter() - t0
    return {
        "radii": list(RADII),
        "certified_accuracy": cert,
        "sigma": c["sigma"], "n0": s["n0"], "n": s["n"], "alpha": c["alpha"], "images": int(xs.shape[0]),
        "max_certifiable_radius": max_radius(c["sigma"], s["n"], c["alpha"]),
        "clean_accuracy": accuracy(clf, data.test_x, data.test_y),
        "noisy_accuracy": noisy,
        "curve_radii": grid,
        "curves": curves,
        "denoiser_parameters": int(sum(p.numel() for p in zo.parameters())),
        "fo": {"epochs": s["fo_epochs"], "seconds": fo_seconds},
        "zo": {"steps": summary.get("steps"), "epochs": summary.get("epochs"), "queries": summary.get("queries"),
               "seconds": zo_seconds, "ranks": comm.size, "overrides": zo_overrides(s, c),
               "images_queried": int(summary.get("queries") or 0) * s["batch_size"]},
        # one gray-box query is one image through the black box; a ZO-DS query a minibatch
        "gb": {"steps": gb_summary.get("steps"), "queries": gb_summary.get("queries"), "seconds": gb_seconds,
               "ranks": comm.size, "overrides": gb_overrides(s, c), "images_queried": gb_summary.get("queries")},
        "certify_seconds": seconds,
    }


def goal(result: dict) -> tuple[bool, bool]:
    """(ZO-DS above no denoiser at every radius, ZO-DS within 8 points of FO-DS at r = 0)."""
    ca = result["certified_accuracy"]
    above = all(z > n for z, n in zip(ca["zo_ds"], ca["none"]))
    close = ca["fo_ds"][0] - ca["zo_ds"][0] <= 0.08 + 1e-12
    return above, close


def table(result: dict) -> str:
    radii = result["radii"]
    head = "".join(f"{'r=' + format(r, 'g'):>9s}" for r in radii)
    lines = [
        f"certified_defense: digits, sigma {result['sigma']} ([0, 1] pixels), {result['images']} test images, "
        f"n0 {result['n0']}, n {result['n']}, alpha {result['alpha']} "
        f"(largest certifiable radius {result['max_certifiable_radius']:.2f})",
        f"black box: {100 * result['clean_accuracy']:.1f}% clean test accuracy; denoiser: "
        f"{result['denoiser_parameters']} parameters; ZO-DS: {result['zo']['steps']} CGE steps, "
        f"{result['zo']['queries']} queries, {result['zo']['seconds']:.0f} s on {result['zo']['ranks']} rank(s)",
    ]
    for key, name in (("zo", "ZO-DS"), ("gb", "GB-DS")):
        if key in result and result[key].get("images_queried") is not None:
            r = result[key]
            lines.append(f"{name}: {r['steps']} steps, {r['queries']:,} queries, {r['images_queried']:,} images "
                         f"through the black box, {r['seconds']:.0f} s")
    lines += [
        "",
        f"{'certified accuracy (%)':26s}{head}   noisy top-1",
    ]
    for m in METHODS:
        if m not in result["certified_accuracy"]:
            continue
        vals = "".join(f"{100 * v:9.1f}" for v in result["certified_accuracy"][m])
        lines.append(f"{LABELS[m]:26s}{vals}   {100 * result['noisy_accuracy'][m]:8.1f}")
    lines.append("")
    phead = "".join(f"{'r=' + format(r, 'g'):>9s}" for r in PAPER["radii"])
    lines.append(f"{'paper (' + 'ImageNet-10' + ')':26s}{phead}")
    for m in ("fo_ds", "zo_ds", "zo_ae_ds"):
        lines.append(f"{PAPER_LABELS[m]:26s}" + "".join(f"{v:9.2f}" for v in PAPER["certified_accuracy"][m]))
    above, close = goal(result)
    lines.append("")
    lines.append(f"goal: ZO-DS above no denoiser at every radius: {'met' if above else 'not met'}; "
                 f"within 8 points of FO-DS at r = 0: {'met' if close else 'not met'}")
    return "\n".join(lines)


def plot(result: dict, path: str) -> None:
    with figure(path, 2, (10, 4)) as (fig, (ax, bx)):
        for m in METHODS:
            if m not in result["curves"]:
                continue
            ax.plot(result["curve_radii"], [100 * v for v in result["curves"][m]], label=LABELS[m], color=COLORS[m])
            ax.plot(result["radii"], [100 * v for v in result["certified_accuracy"][m]], "o", color=COLORS[m])
        ax.set_xlabel("L2 radius ([0, 1] pixels)")
        ax.set_ylabel("certified accuracy (%)")
        ax.set_title(f"digits, sigma {result['sigma']}, n {result['n']}")
        ax.legend()
        for m in ("fo_ds", "zo_ds", "zo_ae_ds"):
            bx.plot(PAPER["radii"], PAPER["certified_accuracy"][m], "o-", label=PAPER_LABELS[m], color=COLORS[m])
        bx.set_xlabel("L2 radius")
        bx.set_ylabel("certified accuracy (%)")
        bx.set_title("paper: ImageNet-10, sigma 0.25")
        bx.legend()
        fig.tight_layout()
