"""Evaluation networks trained here on real images, and the metrics computed with them.

* :class:`FeatureNet`: a 4-layer strided CNN on the whole 64x64 image, trained to predict every cell's
  colour, shape and size and the background (colour and plain/gradient). Its 64-d bottleneck (before
  the heads) is the feature space of the Frechet distance, as Inception-v3's pool features are FID's.
* :class:`CellClassifier`: a 3-layer CNN on the crop of one grid cell (with a 2-pixel margin, randomly
  shifted by up to 2 pixels in training), predicting colour, shape and size, each with an "empty" class.
  Attribute accuracy (:func:`attribute_scores`) reads the cell named by each prompted object: colour
  and shape must match, position counts the object as placed when its cell is not empty.
* :func:`frechet_distance`: the Frechet distance between Gaussians fitted to two feature sets;
  :func:`frechet_bootstrap_se` its bootstrap standard error over the evaluation prompts.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .data import (
    BACKGROUNDS,
    COLORS,
    NUM_CELLS,
    SHAPE_NAMES,
    SIZE_NAMES,
    Split,
    background_labels,
    cell_boxes,
    cell_labels,
    images_to_tensor,
)

logger = logging.getLogger(__name__)

FEATURE_DIM = 64
CROP = 20
"""Side of a cell crop fed to the classifier (cells are 21-22 px at 64 px)."""
MARGIN = 2
"""Extra pixels around a cell in the stored crop; training takes random CROP windows, evaluation the centre."""

CELL_HEADS = {"color": 1 + len(COLORS), "shape": 1 + len(SHAPE_NAMES), "size": 1 + len(SIZE_NAMES)}
GLOBAL_HEADS = {"background": len(BACKGROUNDS), "background_kind": 2}


class FeatureNet(nn.Module):
    """Whole-image CNN; :meth:`features` is the 64-d space of the Frechet distance."""

    def __init__(self, width: int = 32, feature_dim: int = FEATURE_DIM):
        super().__init__()
        w = width
        self.body = nn.Sequential(
            nn.Conv2d(3, w, 4, 2, 1),  # 32
            nn.GELU(),
            nn.Conv2d(w, 2 * w, 4, 2, 1),  # 16
            nn.GELU(),
            nn.Conv2d(2 * w, 2 * w, 4, 2, 1),  # 8
            nn.GELU(),
            nn.Conv2d(2 * w, 2 * w, 4, 2, 1),  # 4
            nn.GELU(),
            nn.Flatten(),
            nn.Linear(2 * w * 16, feature_dim),
        )
        heads = {f"{k}_{c}": n for k, n in CELL_HEADS.items() for c in range(NUM_CELLS)}
        heads.update(GLOBAL_HEADS)
        self.heads = nn.ModuleDict({k: nn.Linear(feature_dim, n) for k, n in heads.items()})

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, 64, 64) in [-1, 1] -> (B, 64) features."""
        return self.body(x)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = F.gelu(self.features(x))
        return {k: head(h) for k, head in self.heads.items()}


class CellClassifier(nn.Module):
    """Colour / shape / size (each with an empty class) of one ``CROP`` x ``CROP`` cell crop."""

    def __init__(self, width: int = 32):
        super().__init__()
        w = width
        self.body = nn.Sequential(
            nn.Conv2d(3, w, 3, 1, 1),
            nn.GELU(),
            nn.MaxPool2d(2),  # 10
            nn.Conv2d(w, 2 * w, 3, 1, 1),
            nn.GELU(),
            nn.MaxPool2d(2),  # 5
            nn.Conv2d(2 * w, 2 * w, 3, 1, 1),
            nn.GELU(),
            nn.Flatten(),
            nn.Linear(2 * w * 25, 128),
            nn.GELU(),
        )
        self.heads = nn.ModuleDict({k: nn.Linear(128, n) for k, n in CELL_HEADS.items()})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.body(x)
        return {k: head(h) for k, head in self.heads.items()}


# --- data preparation -----------------------------------------------------------------------------------


def cell_crops(images: torch.Tensor) -> torch.Tensor:
    """(N, 3, R, R) in [-1, 1] -> (N, 9, 3, CROP + 2·MARGIN, CROP + 2·MARGIN): each cell with a margin
    (edge pixels replicated outside the image), resampled to the crop size."""
    res = images.shape[-1]
    side = CROP + 2 * MARGIN
    m = round(MARGIN * res / 3 / CROP)  # the margin in image pixels
    padded = F.pad(images, (m, m, m, m), mode="replicate")
    crops = []
    for x0, y0, x1, y1 in cell_boxes(res):
        box = padded[:, :, y0 : y1 + 2 * m, x0 : x1 + 2 * m]
        crops.append(
            F.interpolate(box, size=(side, side), mode="bilinear", antialias=True, align_corners=False)
        )
    return torch.stack(crops, dim=1)


def _windows(crops: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """CROP x CROP windows of (B, 3, S, S) crops: random offsets with a generator, else the centre."""
    if generator is None:
        return crops[:, :, MARGIN : MARGIN + CROP, MARGIN : MARGIN + CROP]
    off = torch.randint(0, 2 * MARGIN + 1, (crops.shape[0], 2), generator=generator)
    return torch.stack([c[:, y : y + CROP, x : x + CROP] for c, (y, x) in zip(crops, off.tolist())])


def _to_uint8(x: torch.Tensor) -> torch.Tensor:
    return ((x + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)


def _to_device(arrays: dict[str, np.ndarray], device) -> dict[str, torch.Tensor]:
    return {k: torch.as_tensor(v, device=device) for k, v in arrays.items()}


# --- training -------------------------------------------------------------------------------------------


def train_loop(net, steps, batch, n, loss_fn, lr, seed, what, device):
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(steps, 1), pct_start=0.1)
    net.train()
    t0, last = time.time(), float("nan")
    for step in range(steps):
        idx = torch.randint(0, n, (batch,), generator=gen)
        loss = loss_fn(idx, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if (step + 1) % max(steps // 5, 1) == 0 or step + 1 == steps:  # host sync only when logging
            last = float(loss.detach())
            logger.info("%s: step %d/%d loss %.4f (%.1fs)", what, step + 1, steps, last, time.time() - t0)
    net.eval()
    return last


def train_feature_net(
    split: Split,
    steps: int,
    batch: int = 64,
    lr: float = 2e-3,
    seed: int = 0,
    device="cpu",
    shuffle_labels: bool = False,
) -> FeatureNet:
    """Train :class:`FeatureNet` on real images (``shuffle_labels`` permutes the targets: a control)."""
    torch.manual_seed(seed)
    net = FeatureNet().to(device)
    x = torch.from_numpy(split.images).to(device)  # uint8, converted per batch
    labels = {}
    cells = cell_labels(split.objects)
    for k in CELL_HEADS:
        for c in range(NUM_CELLS):
            labels[f"{k}_{c}"] = cells[k][:, c]
    labels.update(background_labels(split.captions))
    if shuffle_labels:
        perm = np.random.default_rng(seed).permutation(len(split))
        labels = {k: v[perm] for k, v in labels.items()}
    y = _to_device(labels, device)

    def loss_fn(idx, gen):
        idx = idx.to(device)
        out = net(x[idx].permute(0, 3, 1, 2).float() / 127.5 - 1.0)
        return sum(F.cross_entropy(out[k], y[k][idx]) for k in out) / len(out)

    train_loop(net, steps, batch, len(split), loss_fn, lr, seed, "feature net", device)
    return net


def train_cell_classifier(
    split: Split,
    steps: int,
    batch: int = 256,
    lr: float = 2e-3,
    seed: int = 0,
    device="cpu",
    shuffle_labels: bool = False,
) -> CellClassifier:
    """Train :class:`CellClassifier` on every cell of the real images (``shuffle_labels``: a control)."""
    torch.manual_seed(seed)
    net = CellClassifier().to(device)
    crops = torch.cat(  # (N·9, 3, S, S) uint8
        [
            _to_uint8(cell_crops(images_to_tensor(split.images[i : i + 1000]))).flatten(0, 1)
            for i in range(0, len(split), 1000)
        ]
    )
    labels = {k: v.reshape(-1) for k, v in cell_labels(split.objects).items()}
    if shuffle_labels:
        perm = np.random.default_rng(seed).permutation(len(crops))
        labels = {k: v[perm] for k, v in labels.items()}
    y = _to_device(labels, device)

    def loss_fn(idx, gen):
        x = _windows(crops[idx], gen).to(device).float() / 127.5 - 1.0
        out = net(x)
        idx = idx.to(device)
        return sum(F.cross_entropy(out[k], y[k][idx]) for k in out) / len(out)

    train_loop(net, steps, batch, len(crops), loss_fn, lr, seed, "cell classifier", device)
    return net


# --- inference ------------------------------------------------------------------------------------------


@torch.no_grad()
def extract_features(net: FeatureNet, images: torch.Tensor, batch: int = 256) -> np.ndarray:
    """(N, 3, R, R) in [-1, 1] -> (N, 64) float64 features."""
    device = next(net.parameters()).device
    out = [
        net.features(images[i : i + batch].to(device)).double().cpu() for i in range(0, len(images), batch)
    ]
    return torch.cat(out).numpy()


@torch.no_grad()
def predict_cells(net: CellClassifier, images: torch.Tensor, batch: int = 128) -> dict[str, np.ndarray]:
    """Predicted (N, 9) labels of ``color``, ``shape`` and ``size`` (0 = empty) of every cell."""
    device = next(net.parameters()).device
    preds: dict[str, list] = {k: [] for k in CELL_HEADS}
    for i in range(0, len(images), batch):
        crops = cell_crops(images[i : i + batch])
        n = crops.shape[0]
        out = net(_windows(crops.flatten(0, 1), None).to(device))
        for k in CELL_HEADS:
            preds[k].append(out[k].argmax(-1).reshape(n, NUM_CELLS).cpu())
    return {k: torch.cat(v).numpy() for k, v in preds.items()}


@torch.no_grad()
def predict_global(net: FeatureNet, images: torch.Tensor) -> dict[str, np.ndarray]:
    """The feature net's background predictions (for its sanity check)."""
    device = next(net.parameters()).device
    out = net(images.to(device))
    return {k: out[k].argmax(-1).cpu().numpy() for k in GLOBAL_HEADS}


def classifier_accuracy(net: CellClassifier, split: Split) -> dict[str, float]:
    """Held-out accuracy of the cell classifier: colour/shape/size on occupied cells, and occupancy."""
    pred = predict_cells(net, images_to_tensor(split.images))
    true = cell_labels(split.objects)
    occ = true["color"] > 0
    out = {k: float((pred[k][occ] == true[k][occ]).mean()) for k in CELL_HEADS}
    out["occupancy"] = float(((pred["color"] > 0) == occ).mean())
    return out


def feature_net_accuracy(net: FeatureNet, split: Split) -> dict[str, float]:
    """Held-out accuracy of the feature net's background heads (5 colours, plain/gradient)."""
    pred = predict_global(net, images_to_tensor(split.images))
    true = background_labels(split.captions)
    return {k: float((pred[k] == true[k]).mean()) for k in GLOBAL_HEADS}


# --- metrics --------------------------------------------------------------------------------------------


def frechet_parts(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    """Frechet distance between Gaussians fitted to feature sets ``a`` (N, D) and ``b`` (M, D), in parts:
    ``mean_term`` ``|μa − μb|²`` (a shift of the whole set, e.g. every colour a little off), ``cov_term``
    ``tr(Σa + Σb − 2 (Σa^½ Σb Σa^½)^½)`` (a different spread or shape) and ``variance_ratio`` ``tr Σa / tr Σb``
    (below 1: ``a`` less varied than ``b``, as a mode-seeking student). Float64, symmetric eigendecompositions
    (no SciPy); ``fd`` = ``mean_term + cov_term``, 0 for identical sets up to rounding."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
    w, v = np.linalg.eigh(cov_a)
    sqrt_a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    m = sqrt_a @ cov_b @ sqrt_a
    ev = np.linalg.eigvalsh((m + m.T) / 2)
    tr_sqrt = np.sqrt(np.clip(ev, 0, None)).sum()
    mean_term = float(((mu_a - mu_b) ** 2).sum())
    cov_term = max(float(np.trace(cov_a) + np.trace(cov_b) - 2 * tr_sqrt), 0.0)
    ratio = float(np.trace(cov_a) / np.trace(cov_b)) if np.trace(cov_b) > 0 else float("inf")
    return {"fd": mean_term + cov_term, "mean_term": mean_term, "cov_term": cov_term, "variance_ratio": ratio}


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to feature sets ``a`` (N, D) and ``b`` (M, D):
    ``|μa − μb|² + tr(Σa + Σb − 2 (Σa^½ Σb Σa^½)^½)`` (:func:`frechet_parts`)."""
    return frechet_parts(a, b)["fd"]


def frechet_bootstrap_se(a: np.ndarray, b: np.ndarray, reps: int = 50, seed: int = 0) -> float:
    """Bootstrap standard error of :func:`frechet_distance` over the evaluation set: ``reps`` resamples of
    the prompts with replacement, the same indices in ``a`` and ``b`` (row i of both belongs to prompt i).
    It measures the evaluation's sampling noise only, not the spread between training runs."""
    if len(a) != len(b):
        raise ValueError(f"paired feature sets differ in length: {len(a)} and {len(b)}")
    rng = np.random.default_rng(seed)
    values = [frechet_distance(a[idx], b[idx]) for idx in rng.integers(0, len(a), (reps, len(a)))]
    return float(np.std(values, ddof=1))


def fd_metrics(features: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    """``fd``, its parts ``fd_mean_term``, ``fd_cov_term`` and ``feature_variance_ratio``
    (:func:`frechet_parts`), and ``fd_se`` (:func:`frechet_bootstrap_se`) of a prompt-aligned set."""
    parts = frechet_parts(features, reference)
    return {
        "fd": parts["fd"],
        "fd_se": frechet_bootstrap_se(features, reference),
        "fd_mean_term": parts["mean_term"],
        "fd_cov_term": parts["cov_term"],
        "feature_variance_ratio": parts["variance_ratio"],
    }


def attribute_scores(pred: dict[str, np.ndarray], objects: list[list[dict]]) -> dict[str, float]:
    """Prompt fidelity from predicted cell labels and the prompts' objects.

    ``color`` / ``shape``: the named cell shows the prompted colour / shape; ``position``: the named cell
    is not empty; ``attributes``: the mean of the three; ``scene``: every cell is exactly right (the
    prompted colour and shape where named, empty elsewhere)."""
    true = cell_labels(objects)
    hits = {"color": [], "shape": [], "position": []}
    scene = []
    for i, objs in enumerate(objects):
        for o in objs:
            c = o["cell"]
            hits["color"].append(pred["color"][i, c] == true["color"][i, c])
            hits["shape"].append(pred["shape"][i, c] == true["shape"][i, c])
            hits["position"].append(pred["color"][i, c] > 0)
        scene.append(
            bool(
                (pred["color"][i] == true["color"][i]).all() and (pred["shape"][i] == true["shape"][i]).all()
            )
        )
    out = {k: float(np.mean(v)) for k, v in hits.items()}
    out["attributes"] = float(np.mean([out["color"], out["shape"], out["position"]]))
    out["scene"] = float(np.mean(scene))
    return out
