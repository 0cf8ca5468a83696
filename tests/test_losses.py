"""model.py against plain-Python double loops of the formulas in model.py's docstrings (the original
star/train.py and adore/train.py losses)."""
import math

import pytest
import torch

from model import (adore_batch_loss, adore_gains, adore_pair_weights, adore_query_loss, inbatch_loss, randneg_loss,
                   star_loss)

# 3 queries with 2-D embeddings. Queries 0 and 2 share their positive doc (rows 0 and 2 of D are the same
# passage), so M[0, 2] = M[2, 0] = 0. Hard doc 1 is relevant to query 2, so N[2, 1] = 0.
Q = [[1.0, 0.5], [0.2, -1.0], [-0.7, 0.3]]
D = [[0.9, 0.1], [0.4, -0.8], [0.9, 0.1]]
H = [[0.3, 0.3], [-0.5, 1.0], [1.0, -1.0]]
M = [[0, 1, 0], [1, 0, 1], [0, 1, 0]]
N = [[1, 1, 1], [1, 1, 1], [1, 0, 1]]


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


def stable_softplus(x: float) -> float:
    return max(x, 0.0) + math.log1p(math.exp(-abs(x)))


def dot(a, b) -> float:
    return sum(x * y for x, y in zip(a, b))


def ref_pooled(q, d, blocks, sp=softplus) -> float:
    """Σ over blocks of Σ_ik mask_ik softplus(q_i·x_k − q_i·d_i) / Σ over blocks of Σ mask."""
    total, count = 0.0, 0
    for docs, mask in blocks:
        for i in range(len(q)):
            for k in range(len(docs)):
                if mask[i][k]:
                    total += sp(dot(q[i], docs[k]) - dot(q[i], d[i]))
                    count += 1
    return total / count


def t(rows, **kw) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32, **kw)


def test_inbatch_matches_formula_with_shared_positive():
    loss = inbatch_loss(t(Q), t(D), t(M))
    assert loss.item() == pytest.approx(ref_pooled(Q, D, [(D, M)]), rel=1e-6)


def test_randneg_matches_formula():
    loss = randneg_loss(t(Q), t(D), t(H), t(N))
    assert loss.item() == pytest.approx(ref_pooled(Q, D, [(H, N)]), rel=1e-6)


def test_star_pools_both_terms_under_one_normaliser():
    loss = star_loss(t(Q), t(D), t(H), t(M), t(N)).item()
    assert loss == pytest.approx(ref_pooled(Q, D, [(D, M), (H, N)]), rel=1e-6)
    # 4 in-batch pairs vs 8 hard pairs: pooling is not the average of the two separate means
    separate = (ref_pooled(Q, D, [(D, M)]) + ref_pooled(Q, D, [(H, N)])) / 2
    assert abs(loss - separate) > 1e-3


def test_bool_masks_equal_float_masks():
    as_bool = star_loss(t(Q), t(D), t(H), t(M).bool(), t(N).bool())
    assert as_bool.item() == pytest.approx(star_loss(t(Q), t(D), t(H), t(M), t(N)).item(), rel=1e-7)


def test_gradients_flow_and_are_finite():
    q, d, h = t(Q, requires_grad=True), t(D, requires_grad=True), t(H, requires_grad=True)
    star_loss(q, d, h, t(M), t(N)).backward()
    for x in (q, d, h):
        assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_inputs_are_computed_in_fp32(dtype):
    q, d, h = t(Q).to(dtype), t(D).to(dtype), t(H).to(dtype)
    loss = star_loss(q, d, h, t(M), t(N))
    assert loss.dtype == torch.float32
    assert loss.item() == star_loss(q.float(), d.float(), h.float(), t(M), t(N)).item()
    assert inbatch_loss(q, d, t(M)).dtype == torch.float32
    assert randneg_loss(q, d, h, t(N)).dtype == torch.float32


def test_no_valid_pair_gives_zero_not_nan():
    q = t(Q, requires_grad=True)
    loss = inbatch_loss(q, t(D), torch.zeros(3, 3))
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(q.grad).all()


def test_large_score_gaps_stay_finite():
    big_q = [[1000.0 * x for x in row] for row in Q]
    loss = star_loss(t(big_q), t(D), t(H), t(M), t(N)).item()
    assert math.isfinite(loss)
    assert loss == pytest.approx(ref_pooled(big_q, D, [(D, M), (H, N)], sp=stable_softplus), rel=1e-5)


def test_mask_shape_is_checked():
    with pytest.raises(ValueError, match="rel_pair_mask"):
        inbatch_loss(t(Q), t(D), torch.zeros(3, 2))


# -- ADORE ----------------------------------------------------------------------------------------------

def ref_adore(scores, labels, cut, sp=softplus) -> float:
    gains = [1.0 / r if r <= cut else 0.0 for r in range(1, len(scores) + 1)]
    total, count = 0.0, 0
    for r in range(len(scores)):
        for s in range(len(scores)):
            if labels[r] and not labels[s]:
                total += abs(gains[r] - gains[s]) * sp(scores[s] - scores[r])
                count += 1
    return total / count if count else 0.0


def query_loss(scores, labels, cut):
    return adore_query_loss(t(scores), torch.tensor(labels), cut)


def test_pair_weights_are_reciprocal_rank_differences_with_cut():
    w = adore_pair_weights(5, 3)
    gains = [1.0, 1 / 2, 1 / 3, 0.0, 0.0]
    expected = [[abs(a - b) for b in gains] for a in gains]
    torch.testing.assert_close(w, t(expected))
    torch.testing.assert_close(adore_gains(5, 3), t(gains))


@pytest.mark.parametrize("scores,labels,cut", [
    ([2.0, 1.5, 1.7, -0.3, 0.4], [False, False, True, False, False], 5),          # one positive
    ([2.0, 1.5, 1.7, -0.3, 0.4], [True, False, True, False, True], 5),            # several positives
    ([0.9, 0.8, 0.1, -0.2, 0.5, 0.3], [False] * 4 + [True, True], 4),             # appended after K = 4
    ([0.5, 0.2, -0.1, 0.7, 0.3], [False, False, False, True, False], 2),          # cut smaller than K
])
def test_query_loss_matches_formula(scores, labels, cut):
    assert query_loss(scores, labels, cut).item() == pytest.approx(ref_adore(scores, labels, cut), rel=1e-6)


def test_appended_positive_pairs_weigh_one_over_s():
    # K = 4 retrieved negatives, positive appended at position 5 (a_5 = 0): weight of pair (5, s) is 1/s
    scores = t([0.9, 0.8, 0.1, -0.2, 0.0], requires_grad=True)
    adore_query_loss(scores, torch.tensor([False] * 4 + [True]), 4).backward()
    # d loss / d f_s = w_5s · sigmoid(f_s − f_5) / #pairs
    expected = [(1.0 / s) * torch.sigmoid(torch.tensor(f)).item() / 4 for s, f in
                zip(range(1, 5), [0.9, 0.8, 0.1, -0.2])]
    torch.testing.assert_close(scores.grad[:4], t(expected))


def test_pairs_beyond_the_cut_get_no_weight():
    scores = t([0.5, 0.2, -0.1, 0.7, 0.3], requires_grad=True)
    adore_query_loss(scores, torch.tensor([False, False, False, True, False]), 2).backward()
    assert scores.grad[2].item() == 0.0 and scores.grad[4].item() == 0.0
    assert scores.grad[0].item() > 0 and scores.grad[1].item() > 0


def test_tied_scores_give_log2_times_mean_weight():
    labels = [False, True, False, False]
    loss = query_loss([0.3] * 4, labels, 4).item()
    mean_weight = (abs(1 / 2 - 1) + abs(1 / 2 - 1 / 3) + abs(1 / 2 - 1 / 4)) / 3
    assert loss == pytest.approx(math.log(2) * mean_weight, rel=1e-6)


def test_large_gaps_are_finite():
    scores, labels = [5000.0, -3000.0, 100.0], [False, True, False]
    loss = query_loss(scores, labels, 3).item()
    assert math.isfinite(loss)
    assert loss == pytest.approx(ref_adore(scores, labels, 3, sp=stable_softplus), rel=1e-6)


@pytest.mark.parametrize("labels", [[False, False, False], [True, True, True]])
def test_query_without_pairs_is_zero_with_finite_grad(labels):
    scores = t([0.1, 0.2, 0.3], requires_grad=True)
    loss = adore_query_loss(scores, torch.tensor(labels), 3)
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(scores.grad).all()


@pytest.mark.parametrize("cut", [None, 0, -5, True, 2.0])
def test_metric_cut_must_be_a_positive_int(cut):
    with pytest.raises(ValueError, match="metric_cut"):
        query_loss([0.1, 0.2], [True, False], cut)
    with pytest.raises(ValueError, match="metric_cut"):
        adore_batch_loss([t([0.1, 0.2])], [torch.tensor([True, False])], cut, divisor=1)


BATCH = [  # (scores, labels) of queries with different list lengths
    ([2.0, 1.5, 1.7, -0.3, 0.4], [False, False, True, False, False]),
    ([0.9, 0.8, 0.1, -0.2, 0.5, 0.3], [False] * 4 + [True, True]),
    ([0.4, 0.1, 0.2], [False, False, False]),                                    # no positive
    ([1.0, 1.0, -2.0, 0.5, 3.0], [True, False, True, False, True]),
]


def test_batch_loss_is_sum_of_query_losses_over_nominal_divisor():
    cut, divisor = 4, 32  # nominal batch 16 × accumulation 2, only 4 queries here (short last batch)
    expected = sum(ref_adore(s, y, cut) for s, y in BATCH) / divisor
    loss = adore_batch_loss([t(s) for s, _ in BATCH], [torch.tensor(y) for _, y in BATCH], cut, divisor)
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_batch_loss_gradients_equal_per_query_sum():
    cut = 3
    rows = [t(s, requires_grad=True) for s, _ in BATCH]
    adore_batch_loss(rows, [torch.tensor(y) for _, y in BATCH], cut, divisor=8).backward()
    batch_grads = [r.grad.clone() for r in rows]
    for r in rows:
        r.grad = None
    (sum(adore_query_loss(r, torch.tensor(y), cut) for r, (_, y) in zip(rows, BATCH)) / 8).backward()
    for got, want in zip(batch_grads, (r.grad for r in rows)):
        torch.testing.assert_close(got, want)


def test_batch_loss_accepts_padded_tensors_with_lengths():
    n = max(len(s) for s, _ in BATCH)
    scores = torch.full((len(BATCH), n), 9.0)   # junk padding must be ignored
    labels = torch.ones((len(BATCH), n), dtype=torch.bool)
    for i, (s, y) in enumerate(BATCH):
        scores[i, :len(s)], labels[i, :len(y)] = t(s), torch.tensor(y)
    lengths = torch.tensor([len(s) for s, _ in BATCH])
    loss = adore_batch_loss(scores, labels, 5, 4, lengths=lengths)
    assert loss.item() == pytest.approx(sum(ref_adore(s, y, 5) for s, y in BATCH) / 4, rel=1e-6)


def test_batch_loss_low_precision_scores_in_fp32():
    rows = [t(s).half() for s, _ in BATCH]
    labels = [torch.tensor(y) for _, y in BATCH]
    loss = adore_batch_loss(rows, labels, 5, 4)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(adore_batch_loss([r.float() for r in rows], labels, 5, 4).item(), rel=1e-7)


# -- score scale (γ inside the softplus) -------------------------------------------------------------------------

def scaled(gamma: float):
    return lambda x: softplus(gamma * x)


@pytest.mark.parametrize("gamma", [0.5, 20.0])
def test_scaled_pairwise_losses_match_their_formulas(gamma):
    """softplus(γ·(s_neg − s_pos)), written with loops, for the three STAR-type losses."""
    sp = scaled(gamma)
    assert inbatch_loss(t(Q), t(D), t(M), gamma).item() == pytest.approx(ref_pooled(Q, D, [(D, M)], sp), rel=1e-6)
    assert randneg_loss(t(Q), t(D), t(H), t(N), gamma).item() == pytest.approx(ref_pooled(Q, D, [(H, N)], sp),
                                                                             rel=1e-6)
    assert star_loss(t(Q), t(D), t(H), t(M), t(N), gamma).item() == pytest.approx(
        ref_pooled(Q, D, [(D, M), (H, N)], sp), rel=1e-6)


@pytest.mark.parametrize("gamma", [0.5, 20.0])
def test_scaled_adore_losses_match_their_formula(gamma):
    sp = scaled(gamma)
    scores, labels = BATCH[0]
    one = adore_query_loss(t(scores), torch.tensor(labels), 4, score_scale=gamma)
    assert one.item() == pytest.approx(ref_adore(scores, labels, 4, sp), rel=1e-6)
    batch = adore_batch_loss([t(s) for s, _ in BATCH], [torch.tensor(y) for _, y in BATCH], 4, 8, score_scale=gamma)
    assert batch.item() == pytest.approx(sum(ref_adore(s, y, 4, sp) for s, y in BATCH) / 8, rel=1e-6)


def test_scale_one_is_bitwise_the_unscaled_loss_and_gradient():
    """γ = 1 (the default, the paper's loss) against the unscaled pooled softplus computed here in torch."""
    q = t(Q, requires_grad=True)
    expected = (t(M) * torch.nn.functional.softplus(q @ t(D).T - (q * t(D)).sum(1, keepdim=True))).sum() / t(M).sum()
    expected.backward()
    want = q.grad.clone()
    q.grad = None
    loss = inbatch_loss(q, t(D), t(M), score_scale=1.0)
    loss.backward()
    assert torch.equal(loss, expected) and torch.equal(q.grad, want)


def test_scaling_the_queries_equals_scaling_the_scores():
    """Scores are linear in q, so γ·q with γ = 1 gives the loss of q with score_scale γ."""
    gamma = 7.0
    assert star_loss(t(Q), t(D), t(H), t(M), t(N), gamma).item() == pytest.approx(
        star_loss(gamma * t(Q), t(D), t(H), t(M), t(N)).item(), rel=1e-6)


@pytest.mark.parametrize("gamma", [0.0, -1.0, float("inf"), float("nan"), True])
def test_score_scale_must_be_positive_and_finite(gamma):
    with pytest.raises(ValueError, match="score_scale"):
        inbatch_loss(t(Q), t(D), t(M), gamma)
    with pytest.raises(ValueError, match="score_scale"):
        adore_batch_loss([t([0.1, 0.2])], [torch.tensor([True, False])], 2, divisor=1, score_scale=gamma)
