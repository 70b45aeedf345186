"""How far a learned ranker of unvisited places gets, and what a mixture with it can keep (issue 23,
docs/MODEL_QUALITY.md "Third pass: a learned ranker and the mixture's bound").

  python scripts/explore_ranker.py rank DATA            learned rankers of the places not in the 256-record
      window, trained on the VALID split's novel targets, evaluated on every novel target of the TEST split
  python scripts/explore_ranker.py mix DATA RUN [--n 6000]   the run's own distribution mixed with that
      ranker through a learned gate, on evenly spaced test samples: overall and novel Hit@10 per gate shift

Leakage: every table counts the TRAIN split only, and valid / test targets come after their user's train
records (chronological per-user splits), so no feature sees its target or anything after it. The target's
time (hour, weekday) is an input, as in the model (``query_time``). Candidates: the C = 1000 unvisited places
with the best hand-made score; a target outside them is a miss (the recall is printed). The rankers train
only on samples whose target is inside (a forced-in target would teach the weights to rank far places up).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from explore_diag import auc, base_tables  # scripts/ is this script's folder: on sys.path

WINDOW, N_CAND = 256, 1000
NAMES = ("visits", "visits in the time bin", "km to the current place", "transitions from it",
         "transitions from the previous place", "2-step transitions", "co-visitation (counts)",
         "co-visitation (places once)", "km to the nearest window place", "km to the centroid / radius",
         "train users", "hour fit", "first visits", "first-visit transitions from the current place",
         "transitions into the current place", "user-kNN (50 most similar train users)")  # fmt: skip
HAND = {1: 1.0, 2: -2.0, 3: 2.0, 7: 3.0}  # the probe's best hand-made score (scripts/explore_probe.py)


def _dense(a: np.ndarray, b: np.ndarray, L: int) -> np.ndarray:
    return sp.csr_matrix((np.ones(len(a)), (a, b)), shape=(L, L)).toarray().astype(np.float32)


def tables(data: str) -> dict:
    """Train-split tables (dense [L, L]: data sets of a few thousand places) and per-record columns."""
    b = base_tables(data)
    loc, user, tr, L = b["loc"], b["user"], b["train"], b["L"]
    t = {k: b[k] for k in ("loc", "user", "tb", "L", "xy")}
    t["pos"] = np.load(f"{data}/records/pos.npy").astype(np.int64)
    t["hour"] = np.load(f"{data}/records/hour.npy").astype(np.int64)
    t["t_min"] = np.load(f"{data}/records/t_min.npy").astype(np.float64)
    t["cos"] = (b["C"] / b["nrm"]).astype(np.float32)
    t["pop"] = np.bincount(loc[tr], minlength=L).astype(np.float32)
    t["pop_h"] = b["pop_h"].astype(np.float32)
    t["users"] = np.diag(b["nrm"]).astype(np.float32) - 1
    s1 = np.flatnonzero((user[1:] == user[:-1]) & tr[1:])
    s2 = np.flatnonzero((user[2:] == user[:-2]) & tr[2:])
    t["T"], t["T2"] = _dense(loc[s1], loc[s1 + 1], L), _dense(loc[s2], loc[s2 + 2], L)
    ph = np.full((L, 24), 0.1, np.float32)
    np.add.at(ph, (loc[tr], t["hour"][tr]), 1)
    t["ph"] = ph / ph.sum(1, keepdims=True)
    t["novel"] = novel_records(loc, user)
    first = ~_ever_before(loc, user)
    t["pop_first"] = np.bincount(loc[tr & first], minlength=L).astype(np.float32)
    sf = s1[first[s1 + 1]]
    t["TN"] = _dense(loc[sf], loc[sf + 1], L)
    U = sp.csr_matrix((np.ones(tr.sum()), (user[tr], loc[tr])), shape=(int(user.max()) + 1, L))
    U.sum_duplicates()
    U.data[:] = 1.0
    n = np.sqrt(np.asarray(U.sum(1)).ravel()) + 1e-9
    t["UU"] = (U @ U.T).toarray().astype(np.float32) / n[:, None] / n[None, :]
    np.fill_diagonal(t["UU"], 0)
    t["U"] = U.toarray().astype(np.float32)
    return t


def _ever_before(loc: np.ndarray, user: np.ndarray) -> np.ndarray:
    """[N] bool: the user visited this place at an earlier record (records sorted by user, then time)."""
    seen: set[tuple[int, int]] = set()
    out = np.zeros(len(loc), bool)
    for i, key in enumerate(zip(user.tolist(), loc.tolist(), strict=True)):
        out[i] = key in seen
        seen.add(key)
    return out


def novel_records(loc: np.ndarray, user: np.ndarray) -> np.ndarray:
    """[N] bool: the place is not among its user's 256 records before it (eval/slices.py's "novel")."""
    last: dict[tuple[int, int], int] = {}
    out = np.ones(len(loc), bool)
    for i, key in enumerate(zip(user.tolist(), loc.tolist(), strict=True)):
        j = last.get(key)
        out[i] = j is None or i - j > WINDOW
        last[key] = i
    return out


def features(t: dict, r: int) -> tuple[np.ndarray, np.ndarray]:
    """Features [L, 16] of every place for the sample whose target is record r, and the window mask [L]."""
    L, loc, xy = t["L"], t["loc"], t["xy"]
    w = loc[max(r - t["pos"][r], r - WINDOW) : r]
    cur, prev = w[-1], w[-2] if len(w) > 1 else w[-1]
    n = np.bincount(w, minlength=L).astype(np.float32)
    vis = n > 0
    km = np.hypot(*(xy - xy[cur]).T) / 1000
    wu = np.flatnonzero(vis)
    near = np.min(np.hypot(xy[:, None, 0] - xy[None, wu, 0], xy[:, None, 1] - xy[None, wu, 1]), 1) / 1000
    c = xy[w].mean(0)
    cent = np.hypot(*(xy - c).T) / 1000 / (np.hypot(*(xy[w] - c).T).mean() / 1000 + 0.5)
    sim = t["UU"][t["user"][r]].copy()
    sim[sim < np.sort(sim)[-min(50, len(sim))]] = 0  # the 50 most similar train users (all if fewer)
    cols = (t["pop"], t["pop_h"][:, t["tb"][r]], km, t["T"][cur], t["T"][prev], t["T2"][prev], n @ t["cos"],
            vis.astype(np.float32) @ t["cos"], near, cent, t["users"], None, t["pop_first"], t["TN"][cur],
            t["T"][:, cur], sim @ t["U"])  # fmt: skip
    X = np.stack([np.log(t["ph"][:, t["hour"][r]] * 24) if x is None else np.log1p(x) for x in cols], 1)
    return X.astype(np.float32), vis


def candidates(X: np.ndarray, vis: np.ndarray) -> np.ndarray:
    """The N_CAND unvisited places with the best hand-made score [min(N_CAND, L)]; -1 pads the list where
    fewer places are unvisited (tiny data sets)."""
    order = np.argsort(-np.where(vis, -np.inf, hand_scores(X)), kind="stable")[:N_CAND]
    return np.where(vis[order], -1, order)


def masked(scores: torch.Tensor, ids: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Scores [S, C] with the padding candidates (id -1) at -inf."""
    return scores.masked_fill(torch.as_tensor(ids) < 0, float("-inf"))


def novel_samples(t: dict, data: str, split: str) -> np.ndarray:
    S = np.load(f"{data}/samples_{split}.npy").astype(np.int64)
    return S[t["novel"][S]]


def ranker_set(t: dict, rs: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """(features [S, C, 16] of the candidates, target slot [S] (-1 outside), candidate ids [S, C] (-1:
    padding))."""
    X, Y, ids = [], [], []
    for r in rs:
        F_, vis = features(t, int(r))
        c = candidates(F_, vis)
        X.append(F_[np.maximum(c, 0)])
        at = np.flatnonzero(c == t["loc"][r])
        Y.append(int(at[0]) if len(at) else -1)
        ids.append(c)
    return torch.tensor(np.stack(X)), torch.tensor(Y), np.stack(ids)


def train_ranker(
    X: torch.Tensor, Y: torch.Tensor, ids: np.ndarray, hidden: int, seed: int = 0
) -> torch.nn.Module:
    """Softmax over the candidates (standardised features), trained on the samples with the target inside."""
    torch.manual_seed(seed)
    keep = Y >= 0
    mu, sd = X[keep].flatten(0, 1).mean(0), X[keep].flatten(0, 1).std(0) + 1e-6
    if hidden:
        net = torch.nn.Sequential(
            torch.nn.Linear(X.shape[-1], hidden), torch.nn.GELU(), torch.nn.Linear(hidden, 1)
        )
    else:
        net = torch.nn.Linear(X.shape[-1], 1)
    model = torch.nn.Sequential(Standardise(mu, sd), net, torch.nn.Flatten(-2))
    opt = torch.optim.Adam(model.parameters(), 3e-3 if hidden else 1e-2, weight_decay=1e-4)
    Xk, Yk, Ik = X[keep], Y[keep], torch.as_tensor(ids)[keep]
    for _ in range(40 if hidden else 60):
        for j in torch.randperm(len(Yk)).split(256):
            loss = F.cross_entropy(masked(model(Xk[j]), Ik[j]), Yk[j])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


class Standardise(torch.nn.Module):
    def __init__(self, mu: torch.Tensor, sd: torch.Tensor) -> None:
        super().__init__()
        self.mu, self.sd = mu, sd

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mu) / self.sd


def hits(scores: torch.Tensor, Y: torch.Tensor, ks=(1, 10, 20)) -> dict[int, float]:
    """Hit@k among the candidates; a target outside them (Y = -1) is a miss."""
    tgt = scores.gather(1, Y.clamp_min(0)[:, None])
    rank = (scores > tgt).sum(1)
    return {k: float(((rank < k) & (Y >= 0)).float().mean()) for k in ks}


def hand_scores(X):
    """The hand-made score of features [..., 16] (numpy or torch) -> [...]."""
    return sum(wt * X[..., k] for k, wt in HAND.items())


def cmd_rank(data: str) -> None:
    t0 = time.time()
    t = tables(data)
    Xv, Yv, Iv = ranker_set(t, novel_samples(t, data, "valid"))
    Xt, Yt, It = ranker_set(t, novel_samples(t, data, "test"))
    se = np.sqrt(0.1 * 0.9 / len(Yt))
    print(f"{data}: {len(Yv)} valid / {len(Yt)} test novel targets (Hit@10 SE about {se:.4f}); candidate "
          f"recall valid {(Yv >= 0).float().mean():.3f}, test {(Yt >= 0).float().mean():.3f} "
          f"({time.time() - t0:.0f} s)")  # fmt: skip
    rows = {"hand-made (the probe's best)": masked(hand_scores(Xt), It)}
    for hidden in (0, 32):
        model = train_ranker(Xv, Yv, Iv, hidden)
        with torch.no_grad():
            rows[f"learned, {'linear' if not hidden else f'MLP {hidden}'}"] = masked(model(Xt), It)
        if not hidden:
            w = model[1].weight[0] / model[0].sd  # per unit of each (log) feature
            print(
                "linear weights: "
                + ", ".join(f"{k} {v:+.2f}" for k, v in zip(NAMES, w.tolist(), strict=True))
            )
    for name, s in rows.items():
        h = hits(s, Yt)
        print(f"{name:30s} test novel Hit@1 {h[1]:.4f} Hit@10 {h[10]:.4f} Hit@20 {h[20]:.4f}")


def model_log_probs(run: str, data: str, split: str, idx: np.ndarray) -> tuple[torch.Tensor, np.ndarray]:
    """The run's log-probabilities [S, L] on samples ``idx`` of a split, and their target records [S]."""
    from nextlocmoe.data.store import TrajectoryDataset, collate
    from nextlocmoe.model.io import load_run

    cfg, model, _ = load_run(run)
    ds = TrajectoryDataset(data, split, pointer=cfg.model.pointer_window)
    out = []
    with torch.no_grad():
        for s in range(0, len(idx), 256):
            pred, _ = model(collate(ds.get_batch(idx[s : s + 256])))
            out.append(torch.log_softmax(pred.scores.float(), -1))
    return torch.cat(out), np.load(f"{data}/samples_{split}.npy").astype(np.int64)[idx]


def gate_features(t: dict, rs: np.ndarray, logp: torch.Tensor) -> torch.Tensor:
    """Per sample [S, 8]: the run's log-mass on the window places and its top log-probability, log history
    length, distinct places per window record, the novel share of the last 10 and 50 records, whether the
    current record was novel, log minutes to the target's time (an input: ``query_time``)."""
    rows = []
    for i, r in enumerate(rs.tolist()):
        lo = max(r - t["pos"][r], r - WINDOW)
        w = np.unique(t["loc"][lo:r])
        mass = torch.logsumexp(logp[i, torch.as_tensor(w)], 0).item()
        nov = t["novel"][lo:r]
        rows.append([np.log(-np.expm1(min(mass, -1e-6))) - mass, logp[i].max().item(), np.log1p(r - lo),
                     len(w) / (r - lo), nov[-10:].mean(), nov[-50:].mean(), float(nov[-1]),
                     np.log1p(max(t["t_min"][r] - t["t_min"][r - 1], 0.0))])  # fmt: skip
    return torch.tensor(rows, dtype=torch.float32)


def train_gate(X: torch.Tensor, novel: torch.Tensor) -> torch.nn.Module:
    """Logistic regression P(novel target | gate features), standardised inputs, full-batch LBFGS."""
    mu, sd = X.mean(0), X.std(0) + 1e-6
    model = torch.nn.Sequential(Standardise(mu, sd), torch.nn.Linear(X.shape[1], 1), torch.nn.Flatten(0))
    opt = torch.optim.LBFGS(model.parameters(), max_iter=200)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.binary_cross_entropy_with_logits(model(X), novel.float())
        loss.backward()
        return loss

    opt.step(closure)
    return model.eval()


def mixture_hits(logp, ids, p_rank, q, tgt, novel) -> tuple[float, float, float]:
    """Overall Hit@1, Hit@10 and novel Hit@10 of (1 - q) p_run + q p_ranker (the ranker's probability on
    its candidates, 0 elsewhere)."""
    p = (1 - q)[:, None] * logp.exp()
    p = p.scatter_add(1, torch.as_tensor(ids).clamp_min(0), q[:, None] * p_rank)  # padding: p_rank 0
    rank = (p > p.gather(1, tgt[:, None])).sum(1)
    return (
        float((rank < 1).float().mean()),
        float((rank < 10).float().mean()),
        float((rank[novel] < 10).float().mean()),
    )


def cmd_mix(data: str, run: str, n: int) -> None:
    t = tables(data)
    Xv, Yv, Iv = ranker_set(t, novel_samples(t, data, "valid"))
    ranker = train_ranker(Xv, Yv, Iv, 32)
    n_valid = len(np.load(f"{data}/samples_valid.npy"))
    vi = np.linspace(0, n_valid - 1, min(n, n_valid)).astype(int)
    lv, rv = model_log_probs(run, data, "valid", vi)
    gate = train_gate(gate_features(t, rv, lv), torch.as_tensor(t["novel"][rv]))
    n_test = len(np.load(f"{data}/samples_test.npy"))
    ti = np.linspace(0, n_test - 1, min(n, n_test)).astype(int)
    lt, rt = model_log_probs(run, data, "test", ti)
    novel = torch.as_tensor(t["novel"][rt])
    with torch.no_grad():
        g_feat = gate_features(t, rt, lt)
        z = gate(g_feat)
        X, _, ids = ranker_set(t, rt)
        p_rank = torch.softmax(masked(ranker(X), ids), -1)
    tgt = torch.as_tensor(t["loc"][rt])
    m = g_feat[:, 0].numpy()  # the run's own log-odds of its mass off the window
    print(f"{run} on {len(rt)} test samples ({int(novel.sum())} novel); gate ROC AUC "
          f"{auc(z[novel].numpy(), z[~novel].numpy()):.3f} (the run's own mass off the window alone: "
          f"{auc(m[novel.numpy()], m[~novel.numpy()]):.3f})")  # fmt: skip
    h = mixture_hits(lt, ids, p_rank, torch.zeros(len(rt)), tgt, novel)
    print(f"the run alone: overall Hit@1 {h[0]:.4f} Hit@10 {h[1]:.4f}, novel Hit@10 {h[2]:.4f}")
    for shift in (-2, -1, 0, 1, 2, 3):
        h = mixture_hits(lt, ids, p_rank, torch.sigmoid(z + shift), tgt, novel)
        print(f"gate logit {shift:+d}: overall Hit@1 {h[0]:.4f} Hit@10 {h[1]:.4f}, novel Hit@10 {h[2]:.4f}")
    h = mixture_hits(lt, ids, p_rank, novel.float(), tgt, novel)
    print(f"oracle gate (q = 1 exactly on the novel targets): overall Hit@1 {h[0]:.4f} Hit@10 {h[1]:.4f}, "
          f"novel Hit@10 {h[2]:.4f}")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=("rank", "mix"))
    ap.add_argument("data", help="prepared data folder (nextlocmoe prepare --out)")
    ap.add_argument("run", nargs="?", help="run folder (mix): its model scores every place")
    ap.add_argument("--n", type=int, default=6000, help="mix: evenly spaced valid (gate) and test samples")
    a = ap.parse_args()
    torch.set_num_threads(2)
    if a.what == "rank":
        cmd_rank(a.data)
    else:
        if not a.run:
            ap.error("mix needs a RUN folder")
        cmd_mix(a.data, a.run, a.n)


if __name__ == "__main__":
    main()
