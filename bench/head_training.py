"""Benchmark 7: head selection on cached features against extracting those features.

Two measurements, each side by side in one run:
A. real features: the demo backbone (EfficientNet-Lite0, package weights) embeds N demo images into a
   fresh store (timed; --repeats times, alternating with the selection, best of each), then the
   product's default head selection (`fit_head` with SelectionConfig():
   exact linear heads for 7 C values + 6 AdamW MLP heads) and a single MLP head (selection off) train
   on those features with the product's default split ratios (timed).
B. scale: the default grid on M x 768 synthetic fp16 features (two shifted Gaussians, the ViT-S/16
   cls+avg width) against extracting M images with the ViT-S/16 DINOv3 architecture, whose images/s is
   measured on a few demo images and extrapolated to M (embedding M images would take hours here).
C. why the AdamW candidates are not stacked: 6 MLP heads (the default grid's lr x weight decay) trained
   side by side as separate modules (what `fit_head` does) against the same 6 with their weights stacked
   in one module (one GEMM for the first layers, a batched matmul for the second), interleaved, at the
   train size of A and at the grid's row cap (`selection.max_rows`); and the separate modules with
   torch's per-tensor AdamW (the CPU default, what `fit_head` used before its fused AdamW).
D. the linear heads' C cross-validation on A's standardised train features (5 folds x 7 C): the
   product's batched solver (`stage1core.logistic`, to its tolerance) against scikit-learn's
   LogisticRegression solved one problem at a time along a warm-started C path (what `fit_head` did
   before, at scikit-learn's default tolerance), interleaved, best of 3; with each one's largest
   distance in probability from the optimum (the batched solver at a 1e-10 tolerance).
Goal: head selection stays a small fraction of extraction.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import _common as c


def main() -> None:
    def options(p):
        p.add_argument("--images", type=int, default=1200, help="A: demo images embedded and trained on")
        p.add_argument("--n", type=int, default=100_000, help="B: synthetic feature rows")
        p.add_argument("--probe-images", type=int, default=64, help="B: images embedded to measure ViT-S images/s")

    args = c.parse_args(__doc__, repeats=3, configure=options)
    c.header("7. head selection on cached features vs extraction", args)
    import numpy as np

    from stage1core.features import FeatureConfig, FeatureStore, extract_features
    from stage1core.selection import SelectionConfig
    from stage1core.splits import SplitConfig, make_splits
    from stage1core.train import TrainConfig, fit_head

    n_images, n, probe = (80, 2_000, 4) if args.quick else (args.images, args.n, args.probe_images)
    quick_train = TrainConfig(epochs=2, patience=1) if args.quick else TrainConfig()

    # A. real features, measured end to end
    samples = c.load_samples(c.bench_data(n_images, quick=args.quick))
    tmp = Path(tempfile.mkdtemp(prefix="bench-head-"))
    backbone = c.vit_small_backbone(pooling="avg", tiny=True) if args.quick else c.demo_backbone()
    parts = make_splits(samples, SplitConfig())
    def embed(r):  # each extraction into a fresh store
        return c.timed(lambda: extract_features(samples, backbone, FeatureConfig(batch_size=32),
                                                store_root=tmp / f"a{r}", progress=False))

    first_s, info = embed(0)
    store = FeatureStore(info.store_dir)

    def xy(name):
        return store.load([s.sample_id for s in parts[name]]), np.array([s.label for s in parts[name]])

    (xt, yt), (xv, yv) = xy("train"), xy("val")
    extract_times, grid_times = [first_s], []
    for r in range(args.repeats):  # alternating: extraction, selection, extraction, ...; the best of each
        if r:
            extract_times.append(embed(r)[0])
        grid_s, grid = c.timed(lambda: fit_head(xt, yt, xv, yv, config=quick_train))
        grid_times.append(grid_s)
    extract_s, grid_s = min(extract_times), min(grid_times)
    one_s, _ = c.timed(lambda: fit_head(xt, yt, xv, yv, config=quick_train, selection=SelectionConfig(enabled=False)))

    def runs(times):
        return f", best of {len(times)} ({', '.join(f'{t:.1f}' for t in times)} s)" if len(times) > 1 else ""

    c.figure("A: extraction", f"{extract_s:.1f} s for {info.n_computed} demo images ({info.images_per_second:.1f} "
             f"images/s, {info.dim}-d){runs(extract_times)}")
    c.figure("A: head selection", f"{grid_s:.1f} s for {len(grid.grid)} candidates on {len(yt)} train images; "
             f"chosen {next(r for r in grid.grid if r['chosen'])['kind']}{runs(grid_times)}")
    c.figure("A: one MLP head (selection off)", f"{one_s:.1f} s")
    c.ratio_line("A: head selection / extraction time, same images", grid_s / extract_s * 100, unit="%",
                 goal="small fraction (< 25%)", met=grid_s / extract_s < 0.25)
    c.ratio_line("A: head selection / one head", grid_s / one_s)

    # B. at scale: synthetic 768-d features against extrapolated ViT-S extraction
    dim = 768
    rng = np.random.default_rng(0)

    def make(count):
        y = rng.integers(0, 2, count)
        x = rng.standard_normal((count, dim), dtype=np.float32) + 0.3 * y[:, None] * rng.standard_normal(dim) ** 2
        return x.astype(np.float16).astype(np.float32), y

    (bt, byt), (bv, byv) = make(n), make(max(n // 7, 100))
    big_s, big = c.timed(lambda: fit_head(bt, byt, bv, byv, config=quick_train))
    vit = extract_features(samples[:probe], c.vit_small_backbone(pooling="cls+avg", tiny=args.quick),
                           FeatureConfig(batch_size=32), store_root=tmp, progress=False)
    vit_s = n / vit.images_per_second
    c.figure("B: head selection", f"{big_s:.1f} s for {len(big.grid)} candidates on {n} x {dim} features")
    c.figure("B: ViT-S/16 extraction (measured)", f"{vit.images_per_second:.2f} images/s over {vit.n_computed} images")
    c.figure("B: extraction for N (extrapolated)", f"{vit_s:.0f} s = {vit_s / 3600:.1f} h for {n} images")
    c.ratio_line("B: head selection / extraction time for the same N", big_s / vit_s * 100, unit="%",
                 goal="small fraction (< 10%)", met=big_s / vit_s < 0.10)

    # C. side by side (separate modules) vs stacked (one module), same data, same steps
    for rows, width in ((len(yt), int(xt.shape[1])), (min(n, 4000), dim)):
        epochs = 2 if args.quick else 10
        times = c.interleave(stacked_vs_separate(rows, width, epochs=epochs), repeats=2)
        c.figure(f"C: 6 MLP heads, {rows} x {width}, {epochs} epochs, best of 2",
                 ", ".join(f"{name} {min(v):.2f} s" for name, v in times.items()))
        c.ratio_line(f"C: stacked / separate at {rows} rows", min(times["stacked"]) / min(times["separate"]))
        c.ratio_line(f"C: separate, per-tensor AdamW / fused at {rows} rows",
                     min(times["per-tensor"]) / min(times["separate"]))

    # D. the linear heads' cross-validation: batched solver vs one scikit-learn solve at a time
    import torch

    from stage1core.heads import HeadConfig, build_head

    linear = build_head(HeadConfig(kind="linear"), int(xt.shape[1]), kind="linear")
    linear.norm.set_stats(torch.as_tensor(xt))
    with torch.no_grad():
        z = linear.norm(torch.as_tensor(xt)).double().numpy()
    ways, gaps = linear_cv_ways(z, np.asarray(yt), SelectionConfig())
    times = c.interleave(ways, repeats=3)
    c.figure(f"D: C cross-validation, {len(yt)} x {z.shape[1]}, 5 folds x 7 C, best of 3",
             ", ".join(f"{name} {min(v):.2f} s (max |p - optimum| {gaps[name]():.1e})" for name, v in times.items()))
    c.ratio_line("D: scikit-learn one at a time / batched", min(times["scikit-learn"]) / min(times["batched"]))


def linear_cv_ways(z, y, selection):
    """The C cross-validation's fits two ways, and for each a function giving its largest distance in
    p(class 1) on all rows from the optimum."""
    import copy
    import warnings

    import numpy as np
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold

    from stage1core.logistic import balanced_weights, fit_logistic_batch
    from stage1core.train import LINEAR_TOL

    folds = list(StratifiedKFold(selection.cv_folds, shuffle=True, random_state=0).split(z, y))
    weights = np.stack([balanced_weights(y, rows) for rows, _ in folds for _ in selection.linear_c])
    cs = np.array([cv for _ in folds for cv in selection.linear_c])
    found = {}

    def batched():
        fits = fit_logistic_batch(z, y, weights, cs, tol=LINEAR_TOL)
        found["batched"] = [fits.probability(k, z) for k in range(len(cs))]

    def one_at_a_time():
        out = []
        for rows, _ in folds:
            solver = LogisticRegression(class_weight="balanced", max_iter=2000, warm_start=True)
            for cv in selection.linear_c:
                solver.set_params(C=cv)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", ConvergenceWarning)
                    solver.fit(z[rows], y[rows])
                out.append(copy.deepcopy(solver).predict_proba(z)[:, 1])
        found["scikit-learn"] = out

    def gap(name):
        optimum = fit_logistic_batch(z, y, weights, cs, tol=1e-10, max_iter=20000)
        return max(float(np.abs(p - optimum.probability(k, z)).max()) for k, p in enumerate(found[name]))

    return {"batched": batched, "scikit-learn": one_at_a_time}, {"batched": lambda: gap("batched"),
                                                                 "scikit-learn": lambda: gap("scikit-learn")}


def stacked_vs_separate(rows: int, width: int, *, epochs: int, k: int = 6, hidden: int = 768, batch: int = 128):
    """Two ways to train k MLP heads on the same batches with AdamW: the product's (k modules, one
    parameter group each) and a stacked module (first layers as one (k*hidden, width) GEMM)."""
    import torch
    import torch.nn.functional as F

    from stage1core.heads import MLPHead

    torch.manual_seed(0)
    x, y = torch.randn(rows, width), torch.randint(0, 2, (rows,))

    def separate(fused=True):
        heads = [MLPHead(width, hidden) for _ in range(k)]
        optimizer = torch.optim.AdamW([{"params": list(h.parameters())} for h in heads], fused=fused or None)
        for _ in range(epochs):
            for i in range(0, rows, batch):
                xb, yb = x[i:i + batch], y[i:i + batch]
                torch.stack([F.cross_entropy(h(xb), yb) for h in heads]).sum().backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)

    def stacked():
        w1 = torch.nn.Parameter(torch.randn(k * hidden, width) * 0.02)
        b1 = torch.nn.Parameter(torch.zeros(k * hidden))
        w2 = torch.nn.Parameter(torch.randn(k, 2, hidden) * 0.02)
        b2 = torch.nn.Parameter(torch.zeros(k, 2))
        optimizer = torch.optim.AdamW([w1, b1, w2, b2], fused=True)
        for _ in range(epochs):
            for i in range(0, rows, batch):
                xb, yb = x[i:i + batch], y[i:i + batch]
                h = F.dropout(F.gelu(F.linear(xb, w1, b1)), 0.1, True).view(len(xb), k, hidden)
                logits = torch.einsum("bkh,kch->kbc", h, w2) + b2[:, None, :]
                (F.cross_entropy(logits.reshape(-1, 2), yb.repeat(k)) * k).backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)

    return {"separate": separate, "stacked": stacked, "per-tensor": lambda: separate(fused=False)}


if __name__ == "__main__":
    main()
