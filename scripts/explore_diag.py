"""Diagnose exploration (issue 23, docs/MODEL_QUALITY.md "Exploration") on evenly spaced test samples.

  python scripts/explore_diag.py head RUN [--n 3000]     a run with model.heads.novelty=true: the gate's
      repeat/novel separation (ROC AUC), p_new alone on the novel targets (unvisited places only), the
      trade-off of a ranking-level mix (the last r of the 10 slots reserved for p_new's best unvisited
      places when the gate is below theta) and of shifting the gate's logit (overall and novel Hit@10)
  python scripts/explore_diag.py probe DATA [--n 4000]  hand-made scores of the places not in the pointer
      window for the novel targets of a prepared store (numpy; Hit@10 per score)

"Novel" = the target is not among the user's 256 records before it (eval/slices.py).
"""

from __future__ import annotations

import argparse

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F

from nextlocmoe.model.novelty import N_TIME_BINS, time_bin

WINDOW = 256


def head_components(model, batch: dict) -> tuple[torch.Tensor, ...]:
    """(gate g [B], p_copy [B, L], p_new [B, L], visited [B, L]) of the pointer head with novelty."""
    from nextlocmoe.model.novelty import gate_stats, novelty_log_probs, visited_mask
    from nextlocmoe.model.pointer import NEG
    from nextlocmoe.model.precision import linear32

    cap = {}
    hook = model.scored.register_forward_pre_hook(lambda m, a: cap.update(a=a))
    model(batch)
    hook.remove()
    h, pred, b, pi, om = cap["a"]
    hd, h = model.scored, h.float()
    a = hd.copy_scores(h, b, pi, om)
    w = torch.softmax(a, -1) * (b["ptr_loc"] >= 0).float()
    L = hd.loc_xy_L2.shape[0]
    p_copy = torch.zeros(a.shape[0], L).scatter_add(1, b["ptr_loc"].clamp_min(0), w)
    gen = hd.gen_logits(h, pred, b["cur_xy"][:, -1])
    n = (b["ptr_loc"] >= 0).float().sum(-1, keepdim=True)
    stats = torch.cat([torch.logsumexp(a, -1, keepdim=True).clamp(-20, 20) / 5.0, torch.log1p(n) / 5.0], -1)
    s, ex = hd.novel(h, b, pi, om, hd.loc_xy_L2, pred, None)
    vis = visited_mask(b["ptr_loc"], L)
    logits = torch.where(vis > 0, torch.full_like(gen, NEG), gen + s)
    p_new = novelty_log_probs(logits, vis).exp()
    stats = torch.cat([stats, gate_stats(ex, logits)], -1)
    g = torch.sigmoid(linear32(hd.gate_out, torch.cat([F.gelu(linear32(hd.gate_h, h)), stats], -1)))
    return (g[:, 0] * (n[:, 0] > 0).float(), p_copy, p_new, vis)


def auc(pos: np.ndarray, neg: np.ndarray) -> float:
    """ROC AUC = P(score of a positive > score of a negative), ties counted half (Mann-Whitney)."""
    allv = np.concatenate([pos, neg])
    order = allv.argsort(kind="stable")
    ranks = np.empty(len(allv))
    ranks[order] = np.arange(1, len(allv) + 1)
    _, inv, cnt = np.unique(allv, return_inverse=True, return_counts=True)
    ranks = (np.bincount(inv, weights=ranks) / cnt)[inv]  # average ranks of ties
    return float((ranks[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def diag_head(run: str, n: int) -> None:
    from nextlocmoe.data.store import TrajectoryDataset, collate
    from nextlocmoe.model.io import load_run

    cfg, model, _ = load_run(run)
    if getattr(model.scored, "novel", None) is None:
        raise SystemExit(f"{run}: not a run with model.heads.novelty=true")
    ds = TrajectoryDataset(cfg.data.dir, "test", pointer=cfg.model.pointer_window)
    idx = np.linspace(0, len(ds) - 1, n).astype(int)
    parts, targets = [], []
    with torch.no_grad():
        for s in range(0, n, 256):
            b = collate(ds.get_batch(idx[s : s + 256]))
            parts.append(head_components(model, b))
            targets.append(b["target_loc"])
    g, pc, pn, vis = (torch.cat(x) for x in zip(*parts, strict=True))
    t, r = torch.cat(targets), torch.arange(len(idx))
    novel = vis[r, t] == 0
    print(f"n={len(t)} novel share {novel.float().mean():.3f}; mean gate: repeat {g[~novel].mean():.3f}, "
          f"novel {g[novel].mean():.3f}; ROC AUC {auc(g[~novel].numpy(), g[novel].numpy()):.3f}")  # fmt: skip
    pnu = torch.where(vis > 0, torch.full_like(pn, -1.0), pn)
    rk = (pnu > pnu[r, t].unsqueeze(1)).sum(1)[novel]
    hit = {k: (rk < k).float().mean().item() for k in (1, 10, 20)}
    print(f"p_new alone, novel targets: Hit@1 {hit[1]:.4f} Hit@10 {hit[10]:.4f} Hit@20 {hit[20]:.4f}")
    reserved_slots(g, pc, pn, vis, t, novel)
    for d in (0, 1, 2, 3, 4):
        gg = torch.sigmoid(torch.logit(g.clamp(1e-6, 1 - 1e-6)) - d) * (g > 0)
        p = gg[:, None] * pc + (1 - gg[:, None]) * pn
        rk = (p > p[r, t].unsqueeze(1)).sum(1)
        h1, h10 = (rk < 1).float().mean().item(), (rk < 10).float().mean().item()
        print(f"gate logit -{d}: overall Hit@1 {h1:.4f} Hit@10 {h10:.4f} | "
              f"novel Hit@10 {(rk[novel] < 10).float().mean():.4f}")  # fmt: skip


def reserved_slots(g, pc, pn, vis, t, novel) -> None:
    """A ranking-level mix: when the gate says "explore" (g < theta) the last r of the 10 slots go to p_new's
    best unvisited places not already listed; Hit@1 is unchanged (slot 1 is the mixture's), so the trade
    is repeat Hit@10 for novel Hit@10. Prints overall and novel Hit@10 per (theta, r)."""
    p = g[:, None] * pc + (1 - g[:, None]) * pn
    top = p.topk(10, dim=1).indices
    pnu = torch.where(vis > 0, torch.full_like(pn, -1.0), pn)
    for theta in (0.5, 0.7, 0.9, 1.01):
        for r in (1, 2, 3, 5):
            head = top[:, : 10 - r]
            rest = pnu.scatter(1, head, -2.0).topk(r, dim=1).indices
            explore = (g < theta)[:, None]
            lst = torch.where(explore, torch.cat([head, rest], 1), top)
            hit = (lst == t[:, None]).any(1).float()
            print(f"reserve {r} slots when g < {theta:.2f} ({explore.float().mean():.2f} of samples): "
                  f"overall Hit@10 {hit.mean():.4f}, novel Hit@10 {hit[novel].mean():.4f}")  # fmt: skip


def base_tables(data: str) -> dict:
    """Train-split tables shared by the probes (also scripts/explore_probe.py): records, time bins,
    time-bin visit counts, place coordinates, the dense user co-visitation counts (diagonal zeroed) and their
    cosine normaliser ``nrm`` (dense [L, L]: data sets of a few thousand places)."""
    R = {c: np.load(f"{data}/records/{c}.npy") for c in ("user", "loc", "x", "y", "hour", "weekday", "split")}
    loc, user, tr = R["loc"].astype(np.int64), R["user"], R["split"] == 0
    L = int(loc.max()) + 1
    tb = time_bin(R["hour"], R["weekday"])
    pop_h = np.zeros((L, N_TIME_BINS))
    np.add.at(pop_h, (loc[tr], tb[tr]), 1)
    U = sp.csr_matrix((np.ones(tr.sum()), (user[tr], loc[tr])), shape=(int(user.max()) + 1, L))
    U.data[:] = 1.0
    C = (U.T @ U).toarray()
    d = np.diag(C).copy()
    np.fill_diagonal(C, 0)
    xy = np.zeros((L, 2))
    xy[loc, 0], xy[loc, 1] = R["x"], R["y"]
    return {"loc": loc, "user": user, "train": tr, "tb": tb, "L": L, "pop_h": pop_h, "xy": xy,
            "C": C, "nrm": np.sqrt(np.outer(d + 1, d + 1))}  # fmt: skip


def probe_tables(data: str) -> dict:
    """Train-split tables of the probe: counts, time-bin counts, transitions, user-user co-visitation."""
    t = base_tables(data)
    loc, user, tr, L = t["loc"], t["user"], t["train"], t["L"]
    step = np.flatnonzero((user[1:] == user[:-1]) & tr[1:])
    T = sp.csr_matrix((np.ones(len(step)), (loc[step], loc[step + 1])), shape=(L, L)).toarray()
    return {"loc": loc, "user": user, "tb": t["tb"], "L": L, "pop": np.bincount(loc[tr], minlength=L),
            "pop_h": t["pop_h"], "T": T, "C": t["C"] / t["nrm"], "xy": t["xy"]}  # fmt: skip


def diag_probe(data: str, n: int) -> None:
    t = probe_tables(data)
    loc, user, xy = t["loc"], t["user"], t["xy"]
    S = np.load(f"{data}/samples_test.npy")
    S = S[np.random.default_rng(0).choice(len(S), min(n, len(S)), replace=False)]
    names = ("gravity", "+time-bin popularity", "+transitions", "+co-visitation", "+nearest window place")
    hits: dict[str, list] = {k: [] for k in names}
    for r in S:
        lo = max(0, r - WINDOW)
        w = loc[lo:r][user[lo:r] == user[r]]
        if loc[r] in set(w.tolist()):
            continue
        km = np.hypot(*(xy - xy[loc[r - 1]]).T) / 1000
        wu = np.unique(w)
        near = np.min(np.hypot(xy[:, None, 0] - xy[None, wu, 0], xy[:, None, 1] - xy[None, wu, 1]), 1) / 1000
        s1 = np.log1p(t["pop"]) - 2 * np.log1p(km)
        s2 = np.log1p(t["pop_h"][:, t["tb"][r]]) - 2 * np.log1p(km)
        s3 = s2 + 2 * np.log1p(t["T"][loc[r - 1]])
        s4 = s3 + 3 * np.log1p(np.bincount(w, minlength=t["L"]) @ t["C"])
        for k, sc in zip(names, (s1, s2, s3, s4, s4 - np.log1p(near)), strict=True):
            sc = np.where(np.isin(np.arange(t["L"]), wu), -1e9, sc)
            hits[k].append((sc > sc[loc[r]]).sum() < 10)
    print(f"novel samples: {len(hits[names[0]])} of {len(S)}")
    for k in names:
        print(f"{k:24s} Hit@10 {np.mean(hits[k]):.4f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=("head", "probe"))
    ap.add_argument("path", help="run folder (head) or prepared data folder (probe)")
    ap.add_argument("--n", type=int, default=0, help="samples (default 3000 head, 4000 probe)")
    a = ap.parse_args()
    torch.set_num_threads(1)
    if a.what == "head":
        diag_head(a.path, a.n or 3000)
    else:
        diag_probe(a.path, a.n or 4000)


if __name__ == "__main__":
    main()
