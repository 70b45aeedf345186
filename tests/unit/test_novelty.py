"""The exploration head (model/novelty.py): counts match a brute-force count, p_new lives on unvisited
places only and the mixture is a distribution, training counts are leave-one-out and evaluation never reads
the target, the candidate scores are id-free, the config is validated, the head exports with ONNX parity."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from nextlocmoe.config import ConfigError, load_config
from nextlocmoe.model.novelty import (
    N_TIME_BINS,
    CityCounts,
    city_counts,
    first_visits,
    time_bin,
    visited_in,
    visited_mask,
)
from nextlocmoe.model.pointer import PointerScoredHead
from tests.unit.test_pointer import _routine_batch, _uniform_routing

L, P, D = 40, 24, 16


def _records(n: int = 400, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "loc": rng.integers(0, L, n),
        "user": np.sort(rng.integers(0, 7, n)),
        "hour": rng.integers(0, 24, n),
        "weekday": rng.integers(0, 7, n),
        "split": rng.choice([0, 0, 0, 1, 2], n),
    }


def _head(counts: CityCounts | None, seed: int = 0, hidden: int = 8, covisit: int = 0) -> PointerScoredHead:
    torch.manual_seed(seed)
    b = _routine_batch(2, 0, L=L, P=P)
    nov = {"hidden": hidden, "top_k": 5, "counts": counts, "covisit_k": covisit}
    return PointerScoredHead(D, b["xy_L2"], 8, 8, 4, 5, 1000.0, True, nov)


def test_city_counts_match_brute_force() -> None:
    r = _records()
    c = city_counts(r, L, 5)
    tr = r["split"] == 0
    assert np.array_equal(c.visits_L, np.bincount(r["loc"][tr], minlength=L))
    tb = time_bin(r["hour"], r["weekday"])
    assert c.visits_LT.shape == (L, N_TIME_BINS) and c.visits_LT.sum() == tr.sum()
    assert c.visits_LT[r["loc"][tr][0], tb[tr][0]] >= 1
    full = np.zeros((L, L))
    for i in range(len(r["loc"]) - 1):
        if r["user"][i] == r["user"][i + 1] and tr[i + 1]:
            full[r["loc"][i], r["loc"][i + 1]] += 1
    for src in range(L):
        kept = {
            int(d): float(n) for d, n in zip(c.succ_ids_LK[src], c.succ_cnt_LK[src], strict=True) if n > 0
        }
        assert all(full[src, d] == n for d, n in kept.items())  # the counts are the true ones
        top = np.sort(full[src][full[src] > 0])[::-1][:5]
        assert np.array_equal(np.sort(list(kept.values()))[::-1], top)  # and the most frequent ones


def test_visited_mask_and_first_visits() -> None:
    loc = torch.tensor([[-1, -1, 3, 4, 3, 5], [1, 1, 1, 1, 1, 1]])
    v = visited_mask(loc, 8)
    assert v[0].nonzero().flatten().tolist() == [3, 4, 5] and v[1].nonzero().flatten().tolist() == [1]
    assert first_visits(loc).tolist() == [[0, 0, 1, 1, 0, 1], [1, 0, 0, 0, 0, 0]]


@pytest.mark.parametrize("hidden", [8, 0])
def test_novelty_mass_is_on_unvisited_places_and_mixture_is_a_distribution(hidden: int) -> None:
    head = _head(city_counts(_records(), L, 5), hidden=hidden).eval()
    b = _routine_batch(6, 1, L=L, P=P)
    pi, om = _uniform_routing(6)
    h = torch.randn(6, D)
    with torch.no_grad():
        logp = head(h, b["cur_xy"][:, -1], b, pi, om)
        p = logp.exp()
        assert torch.allclose(p.sum(1), torch.ones(6), atol=1e-4)
        none = dict(b, ptr_loc=torch.full_like(b["ptr_loc"], -1))  # no slots: all mass on exploring
        p_new = head(h, b["cur_xy"][:, -1], none, pi, om).exp()
        assert torch.allclose(p_new.sum(1), torch.ones(6), atol=1e-4)
    seen = visited_mask(b["ptr_loc"], L) > 0
    assert (p[~seen] > 0).all()  # every unvisited place gets mass (through p_new only)
    s_BL, _ = head.novel(h, b, pi, om, head.loc_xy_L2, b["cur_xy"][:, -1])
    gen = head.gen_logits(h, b["cur_xy"][:, -1], b["cur_xy"][:, -1]) + s_BL
    # among unvisited places the ranking is p_new's: the copy part puts nothing there
    for i in range(6):
        u = (~seen[i]).nonzero().flatten()
        assert torch.equal(p[i, u].argsort(), gen[i, u].detach().argsort())


def test_training_counts_are_leave_one_out_and_evaluation_ignores_the_target() -> None:
    r = _records()
    head = _head(city_counts(r, L, 5))
    b = _routine_batch(6, 2, L=L, P=P)
    target = b["target_loc"]
    with torch.no_grad():
        full = head.novel.counts_BL(b, None)
        loo = head.novel.counts_BL(b, target)
    rows = torch.arange(6)
    for f, g in zip(full, loo, strict=True):
        raw_f, raw_g = f.expm1(), g.expm1()
        diff = raw_f - raw_g
        assert torch.all(diff[rows, target] <= 1 + 1e-5) and torch.all(diff >= -1e-5)
        other = torch.ones_like(diff, dtype=torch.bool)
        other[rows, target] = False
        assert torch.allclose(diff[other], torch.zeros(()), atol=1e-5)  # only the target's own record
    assert torch.allclose(
        (full[0].expm1() - loo[0].expm1())[rows, target], (full[0].expm1()[rows, target] > 0).float()
    )
    head.eval()
    pi, om = _uniform_routing(6)
    h = torch.randn(6, D)
    other_target = dict(b, target_loc=(target + 7) % L)
    with torch.no_grad():
        a = head(h, b["cur_xy"][:, -1], b, pi, om)
        c = head(h, b["cur_xy"][:, -1], other_target, pi, om)
    assert torch.equal(a, c)  # evaluation never reads the target


@pytest.mark.parametrize("covisit", [0, 6])
@pytest.mark.parametrize("loo", [False, True])
def test_candidate_scores_are_the_all_places_scores_at_the_candidates(loo: bool, covisit: int) -> None:
    """``cand_BC`` (a retrieved set, -1 padding) gives exactly the [B, L] scores gathered at the candidates,
    with and without the leave-one-out target; padding scores NEG; the visited test agrees with the mask."""
    from nextlocmoe.model.novelty import NEG

    head = _head(city_counts(_records(), L, 5, covisit), covisit=covisit)
    b = _routine_batch(6, 5, L=L, P=P)
    pi, om = _uniform_routing(6)
    h = torch.randn(6, D)
    g = torch.Generator().manual_seed(0)
    cand = torch.stack([torch.randperm(L, generator=g)[:12] for _ in range(6)])
    cand[:, 0] = b["target_loc"]  # the target among the candidates: its leave-one-out must apply there too
    cand[0, -3:] = -1
    target = b["target_loc"] if loo else None
    with torch.no_grad():
        s_all, st_all = head.novel(h, b, pi, om, head.loc_xy_L2, b["cur_xy"][:, -1], target)
        s_c, st_c = head.novel(h, b, pi, om, head.loc_xy_L2, b["cur_xy"][:, -1], target, cand_BC=cand)
    pad = cand < 0
    assert s_c.shape == (6, 12) and torch.equal(st_all, st_c)
    assert torch.allclose(s_c[~pad], s_all.gather(1, cand.clamp_min(0))[~pad], atol=1e-5)
    assert torch.all(s_c[pad] == NEG)
    vis = visited_in(b["ptr_loc"], cand)
    assert torch.equal(vis[~pad], visited_mask(b["ptr_loc"], L).gather(1, cand.clamp_min(0))[~pad])
    assert torch.all(vis[pad] == 0)


def _chronological_records(n_user: int = 9, per_user: int = 60, seed: int = 1) -> dict[str, np.ndarray]:
    """Records split chronologically per user (first 70 % train, then valid, then test), as prepare does."""
    rng = np.random.default_rng(seed)
    k = np.arange(per_user)
    split = np.where(k < 0.7 * per_user, 0, np.where(k < 0.85 * per_user, 1, 2))
    return {
        "loc": rng.integers(0, L, n_user * per_user),
        "user": np.repeat(np.arange(n_user), per_user),
        "hour": rng.integers(0, 24, n_user * per_user),
        "weekday": rng.integers(0, 7, n_user * per_user),
        "split": np.tile(split, n_user),
    }


def test_covisitation_matches_brute_force() -> None:
    r = _chronological_records()
    c = city_counts(r, L, 5, covisit_k=6)
    tr = r["split"] == 0
    U = np.zeros((9, L))
    U[r["user"][tr], r["loc"][tr]] = 1
    full = U.T @ U
    assert np.array_equal(c.users_L, np.diag(full))
    np.fill_diagonal(full, 0)
    for src in range(L):
        kept = c.covis_cnt_LK[src] > 0
        assert np.array_equal(c.covis_cnt_LK[src][kept], full[src, c.covis_ids_LK[src][kept]])
        assert np.array_equal(c.covis_cnt_LK[src], np.sort(full[src])[::-1][:6])  # the most shared places


def test_covisitation_leaves_the_samples_own_user_out_of_the_target() -> None:
    """A train sample's target score equals the one computed from the train split WITHOUT the sample's
    user (the user's own co-visits of the window places with the target are gone); other places keep
    their scores; evaluation (no target) reads the full counts."""
    r = _chronological_records()
    kc = L - 1  # no truncation: the reference is exact
    head = _head(city_counts(r, L, 5, kc), covisit=kc)
    tr = r["split"] == 0
    rows, targets, windows = [], [], []
    for u in range(4):
        idx = np.flatnonzero((r["user"] == u) & tr)[-1 - u]  # a train target with the user's records before
        first = np.flatnonzero(r["user"] == u)[0]
        w = r["loc"][max(first, idx - P) : idx]
        windows.append(np.r_[np.full(P - len(w), -1), w])
        targets.append(r["loc"][idx])
        rows.append(u)
    ptr = torch.as_tensor(np.stack(windows))
    t = torch.as_tensor(np.array(targets))
    with torch.no_grad():
        users_loo, cov_loo = head.novel.covis_BL(ptr, t)
        users_full, cov_full = head.novel.covis_BL(ptr, None)
    for i, u in enumerate(rows):
        U = np.zeros((9, L))
        U[r["user"][tr], r["loc"][tr]] = 1
        with_u = np.diag(U.T @ U)
        U[u] = 0  # the train split without this user
        wo = U.T @ U
        win = np.unique(windows[i][windows[i] >= 0])
        win = win[win != targets[i]]
        ref = np.sum(wo[targets[i], win] / np.sqrt((with_u[win] + 1) * (wo[targets[i], targets[i]] + 1)))
        assert np.isclose(cov_loo[i, targets[i]].item(), np.log1p(ref), atol=1e-5)
        assert np.isclose(users_loo[i, targets[i]].expm1().item(), wo[targets[i], targets[i]], atol=1e-4)
        other = torch.arange(L) != t[i]
        assert torch.equal(cov_loo[i, other], cov_full[i, other])
    assert (cov_full.gather(1, t[:, None]) >= cov_loo.gather(1, t[:, None])).all()


def test_novelty_scores_are_id_free() -> None:
    """Relabel every place (ids, coordinates, counts permuted together): the scores permute the same way."""
    r = _records()
    counts = city_counts(r, L, 5)
    perm = torch.randperm(L, generator=torch.Generator().manual_seed(3))
    inv = torch.argsort(perm)  # new id of old place x is perm[x]; old place of new id y is inv[y]
    iv = inv.numpy()
    pc = CityCounts(counts.visits_L[iv], counts.visits_LT[iv], perm.numpy()[counts.succ_ids_LK[iv]],
                    counts.succ_cnt_LK[iv])  # fmt: skip
    head = _head(counts).eval()
    b = _routine_batch(5, 4, L=L, P=P)
    b2 = dict(b)
    for k in ("ptr_loc", "cur_loc"):
        b2[k] = torch.where(b[k] >= 0, perm[b[k].clamp_min(0)], b[k])
    pi, om = _uniform_routing(5)
    h = torch.randn(5, D)
    with torch.no_grad():
        s, st = head.novel(h, b, pi, om, head.loc_xy_L2, b["cur_xy"][:, -1])
        head2 = _head(pc).eval()
        head2.novel.load_state_dict(
            {
                **head.novel.state_dict(),
                **{k: v for k, v in head2.novel.state_dict().items() if k.startswith(("visits", "succ"))},
            }
        )
        s2, st2 = head2.novel(h, b2, pi, om, head.loc_xy_L2[inv], b2["cur_xy"][:, -1])
    assert torch.allclose(s2[:, perm], s, atol=1e-4) and torch.equal(st, st2)


def test_novelty_config_is_validated() -> None:
    with pytest.raises(ConfigError, match="novelty=true needs heads.pointer"):
        load_config(None, ["model.heads.novelty=true"])
    with pytest.raises(ConfigError, match="novelty_covisit"):
        load_config(
            None, ["model.heads.pointer=true", "model.heads.novelty=true", "model.heads.novelty_covisit=-1"]
        )
    with pytest.raises(ConfigError, match="novelty_hidden"):
        load_config(
            None, ["model.heads.pointer=true", "model.heads.novelty=true", "model.heads.novelty_hidden=-1"]
        )


KEYS = ("ptr_loc", "ptr_xy", "ptr_hour", "ptr_weekday", "ptr_age_h", "cur_loc", "cur_xy", "query_hour",
        "query_weekday", "query_gap_h")  # fmt: skip


class _HeadGraph(nn.Module):
    def __init__(self, head: PointerScoredHead) -> None:
        super().__init__()
        self.head = head

    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        h, pred, pi, om = xs[:4]
        return self.head(h, pred, dict(zip(KEYS, xs[4:], strict=True)), pi, om)


@pytest.mark.parametrize(("hidden", "covisit"), [(8, 0), (0, 0), (8, 6)])
def test_novelty_head_exports_with_parity(tmp_path: Path, hidden: int, covisit: int) -> None:
    from export.onnx_io import OrtSession, export_onnx

    head = _head(city_counts(_records(), L, 5, covisit), hidden=hidden, covisit=covisit).eval()
    keys = KEYS
    m = _HeadGraph(head).eval()

    def inputs(n: int, seed: int) -> tuple[torch.Tensor, ...]:
        b = _routine_batch(n, seed, L=L, P=P)
        b["ptr_loc"][0, :5] = -1  # padded slots
        pi, om = _uniform_routing(n)
        g = torch.Generator().manual_seed(seed)
        xs = (torch.randn(n, D, generator=g), b["cur_xy"][:, -1], pi, om, *(b[k] for k in keys))
        return tuple(x.clone() for x in xs)  # no aliased inputs (cur_loc is a view of ptr_loc)

    names = ("h", "pred", "pi", "om", *keys)
    res = export_onnx(m, inputs(3, 0), tmp_path / "nov.onnx", names, ("logp",))
    sess = OrtSession(res.path)
    for n in (1, 4):
        xs = inputs(n, 10 + n)
        with torch.no_grad():
            ref = m(*xs).numpy()
        got = sess.run({k: v.numpy() for k, v in zip(names, xs, strict=True)})["logp"]
        top_ref, top_got = np.argsort(-ref, 1)[:, :10], np.argsort(-got, 1)[:, :10]
        assert np.abs(np.exp(got) - np.exp(ref)).max() < 1e-5 and np.array_equal(top_ref, top_got)
