"""Location tokenizer (QT-Mob): per-location features -> MLP encoder -> ResidualVQ -> decoder, giving every
location a UNIQUE tuple of discrete codes (docs/QTMOB.md).

Features per location (each group standardised, then scaled so the group's total variance = its weight):
- category one-hot (the most frequent ``MAX_CATEGORIES`` categories + "other"; absent when the data set has no
  categories, as fsq-nyc and llmmob-fsq-nyc),
- coordinates: Web-Mercator (x, y) standardised over the location table (0 without coordinates),
- weekday x hour visit profile (168 bins) from TRAIN-split records only, row-normalised, square-rooted,
- log popularity: log1p(train-split visit count).

Codes: levels 1..L-1 are the nearest codeword of each residual; the last level is a **Sinkhorn-balanced**
assignment (our own log-domain Sinkhorn-Knopp, as LC-Rec / QT-Mob; vector-quantize-pytorch has no such
option) so codes spread evenly over the last codebook. Locations that still share a full tuple get an
**extra level**: their index (0, 1, ...) within the colliding group in location-id order; every location gets
that level (0 when it did not collide), so all tuples have the same length and are unique.

Shape legend: N locations, F feature width, d code dim, Lv RQ levels, K codebook size.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from nextlocmoe.data.layout import RECORD_COLUMNS, load_locations, load_manifest
from nextlocmoe.model.qtmob import load_codes  # noqa: F401 - the codes file reader, re-exported

MAX_CATEGORIES = 63
GROUP_WEIGHTS = {"category": 1.0, "coords": 2.0, "profile": 1.0, "popularity": 0.5}


@dataclass
class TokenizerSettings:
    levels: int = 4
    codebook: int = 64
    d_code: int = 32
    hidden: int = 128
    epochs: int = 60
    batch_size: int = 1024
    lr: float = 1e-3
    commitment: float = 0.25
    kmeans_iters: int = 10
    sinkhorn_eps: float = 0.05
    sinkhorn_iters: int = 100
    seed: int = 0


def _scale_group(x: np.ndarray, weight: float) -> np.ndarray:
    """Standardise columns, then scale so the group's summed variance is ``weight``."""
    x = x - x.mean(0, keepdims=True)
    total = float((x.std(0) ** 2).sum())
    return x * np.sqrt(weight / total) if total > 0 else x


def location_features(data_dir: str | Path) -> tuple[np.ndarray, dict[str, int]]:
    """[N, F] float32 features of every location of a prepared store, and {group: width}."""
    data_dir = Path(data_dir)
    locs = load_locations(data_dir)
    n = len(locs["xy"])
    rec = {c: np.load(data_dir / "records" / f"{c}.npy") for c in ("loc", "split", "weekday", "hour")}
    assert set(rec) <= set(RECORD_COLUMNS)
    train = rec["split"] == 0
    loc_t = rec["loc"][train].astype(np.int64)
    groups: dict[str, np.ndarray] = {}
    cats = np.asarray(locs["category"]).astype(str)
    known = cats != ""
    if known.any():
        names, counts = np.unique(cats[known], return_counts=True)
        top = names[np.argsort(-counts, kind="stable")[:MAX_CATEGORIES]]
        col = {c: i for i, c in enumerate(top)}
        onehot = np.zeros((n, len(top) + 1), np.float64)
        for i in np.flatnonzero(known):
            onehot[i, col.get(cats[i], len(top))] = 1.0
        groups["category"] = onehot
    xy = np.nan_to_num(np.asarray(locs["xy"], np.float64), nan=0.0)
    if np.ptp(xy, axis=0).max() > 0:
        groups["coords"] = xy
    slot = rec["weekday"][train].astype(np.int64) * 24 + rec["hour"][train].astype(np.int64)
    prof = np.bincount(loc_t * 168 + slot, minlength=n * 168).reshape(n, 168).astype(np.float64)
    prof = np.sqrt(prof / np.maximum(prof.sum(1, keepdims=True), 1.0))
    groups["profile"] = prof
    groups["popularity"] = np.log1p(np.bincount(loc_t, minlength=n).astype(np.float64))[:, None]
    feats = np.concatenate([_scale_group(v, GROUP_WEIGHTS[k]) for k, v in groups.items()], axis=1)
    return feats.astype(np.float32), {k: v.shape[1] for k, v in groups.items()}


class LocationRQVAE(nn.Module):
    """MLP encoder -> ResidualVQ (k-means init, EMA codebooks) -> MLP decoder."""

    def __init__(self, d_in: int, s: TokenizerSettings) -> None:
        super().__init__()
        from vector_quantize_pytorch import ResidualVQ

        self.encoder = nn.Sequential(nn.Linear(d_in, s.hidden), nn.GELU(), nn.Linear(s.hidden, s.d_code))
        self.decoder = nn.Sequential(nn.Linear(s.d_code, s.hidden), nn.GELU(), nn.Linear(s.hidden, d_in))
        self.rvq = ResidualVQ(
            dim=s.d_code, num_quantizers=s.levels, codebook_size=s.codebook, kmeans_init=True,
            kmeans_iters=s.kmeans_iters, commitment_weight=s.commitment, decay=0.9, threshold_ema_dead_code=1,
        )  # fmt: skip

    def forward(self, x_NF: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> reconstruction [N, F], indices [N, Lv], commitment loss (scalar)."""
        z = self.encoder(x_NF).unsqueeze(0)
        q, idx, commit = self.rvq(z)
        return self.decoder(q[0]), idx[0], commit.sum()


def sinkhorn_assign(dist_NK: torch.Tensor, eps: float, iters: int) -> torch.Tensor:
    """Balanced assignment: log-domain Sinkhorn-Knopp on cost ``dist`` (rows uniform, columns uniform), then
    argmax per row (ties -> lower code). -> [N] int64."""
    d = dist_NK.double()
    d = (d - d.mean()) / d.std().clamp_min(1e-12)
    n, k = d.shape
    log_q = -d / eps
    for _ in range(iters):
        log_q = log_q - torch.logsumexp(log_q, 0, keepdim=True) - np.log(k)  # columns: mass 1/K each
        log_q = log_q - torch.logsumexp(log_q, 1, keepdim=True) - np.log(n)  # rows: mass 1/N each
    return log_q.argmax(1)


@torch.no_grad()
def assign_codes(model: LocationRQVAE, x_NF: torch.Tensor, s: TokenizerSettings) -> tuple[np.ndarray, float]:
    """RQ codes [N, Lv] (last level Sinkhorn-balanced) and the reconstruction MSE of the assigned codes."""
    model.eval()
    residual = model.encoder(x_NF)
    books = [layer._codebook.embed.reshape(-1, s.d_code) for layer in model.rvq.layers]
    codes, quant = [], torch.zeros_like(residual)
    for lv, book in enumerate(books):
        dist = torch.cdist(residual, book) ** 2
        last = lv == len(books) - 1
        c = sinkhorn_assign(dist, s.sinkhorn_eps, s.sinkhorn_iters) if last else dist.argmin(1)
        codes.append(c)
        quant = quant + book[c]
        residual = residual - book[c]
    mse = float(((model.decoder(quant) - x_NF) ** 2).mean())
    return torch.stack(codes, 1).numpy().astype(np.int64), mse


def add_collision_level(codes_NL: np.ndarray) -> tuple[np.ndarray, dict]:
    """Make every tuple unique: where tuples collide, append an extra level = index within the colliding group
    (location-id order); all locations get the level (0 if unique). Unchanged when nothing collides."""
    _, inv, counts = np.unique(codes_NL, axis=0, return_inverse=True, return_counts=True)
    inv = inv.reshape(-1)
    info = {"collisions_resolved": int(counts[counts > 1].sum()), "colliding_groups": int((counts > 1).sum()),
            "max_collision_group": int(counts.max()) if len(counts) else 0}  # fmt: skip
    if info["colliding_groups"] == 0:
        return codes_NL, info
    order = np.argsort(inv, kind="stable")  # groups contiguous, location ids ascending inside each group
    start = np.r_[0, np.cumsum(counts)[:-1]]
    extra = np.empty(len(inv), np.int64)
    extra[order] = np.arange(len(inv)) - start[inv[order]]
    return np.concatenate([codes_NL, extra[:, None]], 1), info


def train_tokenizer(x_NF: np.ndarray, s: TokenizerSettings, log=None) -> tuple[np.ndarray, dict]:
    """Train the RQ-VAE on all locations (deterministic under ``s.seed``) -> unique codes [N, Lv(+1)] and
    stats."""
    torch.manual_seed(s.seed)
    g = torch.Generator().manual_seed(s.seed)
    x = torch.from_numpy(x_NF)
    model = LocationRQVAE(x.shape[1], s)
    opt = torch.optim.Adam(model.parameters(), lr=s.lr)
    n, t0, last = len(x), time.perf_counter(), time.perf_counter()
    for ep in range(s.epochs):
        model.train()
        perm = torch.randperm(n, generator=g)
        for a in range(0, n, s.batch_size):
            xb = x[perm[a : a + s.batch_size]]
            rec, _, commit = model(xb)
            loss = ((rec - xb) ** 2).mean() + commit
            opt.zero_grad()
            loss.backward()
            opt.step()
        if log is not None and (time.perf_counter() - last > 5 or ep == s.epochs - 1):
            last = time.perf_counter()
            log(f"tokenizer epoch {ep + 1}/{s.epochs}: loss {float(loss.detach()):.4f} ({last - t0:.1f} s)")
    rq, mse = assign_codes(model, x, s)
    codes, info = add_collision_level(rq)
    usage = [int(len(np.unique(codes[:, i]))) for i in range(codes.shape[1])]
    info.update({"rq_levels": s.levels, "extra_level": codes.shape[1] > s.levels, "code_usage": usage,
                 "level_sizes": [int(codes[:, i].max()) + 1 for i in range(codes.shape[1])],
                 "recon_mse": mse, "rq_unique_tuples": int(len(np.unique(rq, axis=0)))})  # fmt: skip
    return codes, info


def tokenize(data_dir: str | Path, s: TokenizerSettings, log=None) -> dict:
    """`nextlocmoe tokenize`: write DIR/location_codes.json ({"<dense location id>": [c1, ...]}) and
    DIR/tokenizer_report.json; returns the report."""
    data_dir = Path(data_dir)
    t0 = time.perf_counter()
    load_manifest(data_dir)  # a clear error when DIR is not a prepared store
    x, widths = location_features(data_dir)
    codes, info = train_tokenizer(x, s, log)
    assert len(np.unique(codes, axis=0)) == len(codes), "code tuples must be unique"
    (data_dir / "location_codes.json").write_text(
        json.dumps({str(i): [int(c) for c in row] for i, row in enumerate(codes)}) + "\n"
    )
    report = {"locations": int(len(codes)), "levels": int(codes.shape[1]), "codebook": s.codebook,
              "collisions_resolved": info.pop("collisions_resolved"), "code_usage": info.pop("code_usage"),
              **info, "features": widths, "balance": "sinkhorn (own, log-domain) on the last RQ level",
              "key": "dense location id (row of locations.npz)", "settings": vars(s),
              "seconds": time.perf_counter() - t0}  # fmt: skip
    (data_dir / "tokenizer_report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report
