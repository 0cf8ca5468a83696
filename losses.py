"""Training losses of Inbatch-Neg, Rand-Neg, STAR and ADORE (as the original star/train.py and adore/train.py compute
them) as pure functions of embeddings and masks.

Every loss casts its inputs to float32 (the original computes scores and losses outside autocast) and uses
``softplus(x) = log(1 + e^x)`` in its numerically stable form (``torch.nn.functional.softplus``), so large
score gaps give no inf/NaN.  Notation: ``s_ij = q_i · d_j`` (raw dot product, no temperature).

A loss whose masks leave no valid pair is 0 (still attached to the graph), where the original divides 0 by 0.
"""
from __future__ import annotations

from numbers import Integral, Real
from typing import Sequence, Union

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


def _pooled_mean(terms: Sequence[tuple[Tensor, Tensor]]) -> Tensor:
    """``Σ_blocks Σ mask·softplus(diff) / Σ_blocks Σ mask`` over ``(diff, mask)`` blocks; 0 without pairs."""
    total = sum((mask * F.softplus(diff)).sum() for diff, mask in terms)
    count = sum(mask.sum() for _, mask in terms)
    return total / count.clamp(min=1.0)


def _mask(mask: Tensor, rows: int, cols: int, name: str) -> Tensor:
    if tuple(mask.shape) != (rows, cols):
        raise ValueError(f"{name} must have shape [{rows}, {cols}], got {list(mask.shape)}")
    return mask.float()


def _positive_scores(q: Tensor, d: Tensor) -> Tensor:
    """``s_ii = q_i · d_i`` as a float32 column ``[B, 1]``."""
    if q.shape != d.shape or q.dim() != 2:
        raise ValueError(f"q and d must both be [B, D], got {list(q.shape)} and {list(d.shape)}")
    return (q.float() * d.float()).sum(dim=1, keepdim=True)


def inbatch_loss(q: Tensor, d: Tensor, rel_pair_mask: Tensor) -> Tensor:
    """Inbatch-Neg: pairwise logistic loss of each query against the other queries' positives.

    Inputs: ``q`` [B, D] query embeddings, ``d`` [B, D] their positive docs (row i is q_i's positive),
    ``rel_pair_mask`` [B, B] with M_ij = 1 when d_j is NOT relevant to q_i (so M_ii = 0)::

        L = Σ_ij M_ij · softplus(s_ij − s_ii) / Σ_ij M_ij
    """
    scores = q.float() @ d.float().T
    mask = _mask(rel_pair_mask, q.shape[0], d.shape[0], "rel_pair_mask")
    return _pooled_mean([(scores - _positive_scores(q, d), mask)])


def randneg_loss(q: Tensor, d: Tensor, rand_docs: Tensor, rand_pair_mask: Tensor) -> Tensor:
    """Rand-Neg: each query against ALL random docs of the batch (in-batch positives not used).

    Inputs: ``q``, ``d`` [B, D] as in :func:`inbatch_loss`; ``rand_docs`` [B·R, D] random docs r_k;
    ``rand_pair_mask`` [B, B·R] with N_ik = 1 when r_k is NOT relevant to q_i. With t_ik = q_i · r_k::

        L = Σ_ik N_ik · softplus(t_ik − s_ii) / Σ_ik N_ik
    """
    scores = q.float() @ rand_docs.float().T
    mask = _mask(rand_pair_mask, q.shape[0], rand_docs.shape[0], "rand_pair_mask")
    return _pooled_mean([(scores - _positive_scores(q, d), mask)])


def star_loss(q: Tensor, d: Tensor, hard_docs: Tensor, rel_pair_mask: Tensor, hard_pair_mask: Tensor) -> Tensor:
    """STAR: in-batch negatives plus ALL static hard negatives of the batch, one pooled mean, no α.

    Inputs: ``q``, ``d``, ``rel_pair_mask`` as in :func:`inbatch_loss`; ``hard_docs`` [B·H, D] hard negatives
    h_k; ``hard_pair_mask`` [B, B·H] with N_ik = 1 when h_k is NOT relevant to q_i. With u_ik = q_i · h_k::

        L = [Σ_ij M_ij·softplus(s_ij − s_ii) + Σ_ik N_ik·softplus(u_ik − s_ii)] / [Σ M + Σ N]
    """
    positive = _positive_scores(q, d)
    inbatch = q.float() @ d.float().T
    hard = q.float() @ hard_docs.float().T
    return _pooled_mean([
        (inbatch - positive, _mask(rel_pair_mask, q.shape[0], d.shape[0], "rel_pair_mask")),
        (hard - positive, _mask(hard_pair_mask, q.shape[0], hard_docs.shape[0], "hard_pair_mask")),
    ])


# -- ADORE ------------------------------------------------------------------------------------------

def _check_cut(metric_cut: int) -> int:
    if isinstance(metric_cut, bool) or not isinstance(metric_cut, Integral) or metric_cut <= 0:
        raise ValueError(f"metric_cut must be a positive int (the original's None trains on zero loss), "
                         f"got {metric_cut!r}")
    return int(metric_cut)


def adore_gains(n_items: int, metric_cut: int, device: Union[str, torch.device, None] = None) -> Tensor:
    """``a_r = 1/r`` for 1-based positions ``r ≤ metric_cut``, else 0; float32 ``[n_items]``."""
    cut = _check_cut(metric_cut)
    positions = torch.arange(1, n_items + 1, dtype=torch.float32, device=device)
    return torch.where(positions <= cut, 1.0 / positions, torch.zeros_like(positions))


def adore_pair_weights(n_items: int, metric_cut: int, device: Union[str, torch.device, None] = None) -> Tensor:
    """ΔRR pair weights ``w_rs = |a_r − a_s|`` for positions r, s (rows, columns); float32 ``[n, n]``.

    ``w_rs`` is the change of reciprocal rank (cut at ``metric_cut``) when the items at r and s swap.
    """
    gains = adore_gains(n_items, metric_cut, device)
    return (gains[:, None] - gains[None, :]).abs()


def adore_query_loss(scores: Tensor, labels: Tensor, metric_cut: int) -> Tensor:
    """ADORE loss of one query, positions = list order (1-based; appended positives come last).

    Inputs: ``scores`` [n] f_r = q · e(p_r) for the retrieved list (plus any appended positives),
    ``labels`` [n] bool y_r (True = relevant)::

        loss_q = Σ_{r: y_r=1} Σ_{s: y_s=0} |a_r − a_s| · softplus(f_s − f_r) / #{(r, s): y_r=1, y_s=0}

    with a_r = 1/r for r ≤ metric_cut else 0.  0 when the list has no (positive, negative) pair.
    """
    scores = scores.float()
    labels = labels.bool()
    if scores.dim() != 1 or labels.shape != scores.shape:
        raise ValueError(f"scores and labels must both be [n], got {list(scores.shape)} and {list(labels.shape)}")
    weights = adore_pair_weights(scores.shape[0], metric_cut, scores.device)[labels][:, ~labels]  # [P, N]
    pairs = scores[labels][:, None], scores[~labels][None, :]
    terms = weights * F.softplus(pairs[1] - pairs[0])
    return terms.sum() / max(terms.numel(), 1)


def _pad(rows: Union[Tensor, Sequence[Tensor]], fill: float | bool) -> tuple[Tensor, Tensor]:
    """``(padded [B, n_max], valid [B, n_max])`` from a list of 1-D tensors or a padded 2-D tensor."""
    if isinstance(rows, Tensor):
        if rows.dim() != 2:
            raise ValueError(f"padded inputs must be [B, n], got {list(rows.shape)}")
        return rows, torch.ones(rows.shape, dtype=torch.bool, device=rows.device)
    if len(rows) == 0:
        raise ValueError("the batch has no queries")
    padded = torch.nn.utils.rnn.pad_sequence(list(rows), batch_first=True, padding_value=fill)
    lengths = torch.tensor([len(r) for r in rows], device=padded.device)
    return padded, torch.arange(padded.shape[1], device=padded.device)[None, :] < lengths[:, None]


def adore_batch_loss(scores: Union[Tensor, Sequence[Tensor]], labels: Union[Tensor, Sequence[Tensor]],
                     metric_cut: int, divisor: float, lengths: Tensor | None = None) -> Tensor:
    """ADORE batch loss: ``Σ_q loss_q / divisor`` (``loss_q`` as in :func:`adore_query_loss`).

    ``scores``/``labels``: a list of per-query 1-D tensors (any lengths), or left-aligned padded tensors
    [B, n] with optional ``lengths`` [B] (entries at column ≥ length are ignored; default: all valid).
    ``divisor``: the nominal batch size × gradient-accumulation steps (faithful: also for a short last
    batch).  Vectorised over the batch as a [B, P_max, n] matrix of (positive, any item) pairs.
    """
    if isinstance(divisor, bool) or not isinstance(divisor, Real) or divisor <= 0:
        raise ValueError(f"divisor must be a positive number, got {divisor!r}")
    _check_cut(metric_cut)
    f, valid = _pad(scores, 0.0)
    y, _ = _pad(labels, False)
    f, y = f.float(), y.bool()
    if y.shape != f.shape:
        raise ValueError(f"scores and labels differ in shape: {list(f.shape)} vs {list(y.shape)}")
    if lengths is not None:
        valid = valid & (torch.arange(f.shape[1], device=f.device)[None, :] < lengths.to(f.device)[:, None])
    positive, negative = y & valid, ~y & valid
    n_pos = int(positive.sum(dim=1).max()) if f.numel() else 0
    if n_pos == 0:
        return f.sum() * 0.0
    # positions of each query's positives, padded to n_pos (padding slots are masked out by pos_valid)
    pos_index = torch.sort(positive.int(), dim=1, descending=True, stable=True).indices[:, :n_pos]
    pos_valid = torch.gather(positive, 1, pos_index)
    gains = adore_gains(f.shape[1], metric_cut, f.device)
    weights = (gains[pos_index][:, :, None] - gains[None, None, :]).abs()          # [B, P, n]
    diff = f[:, None, :] - torch.gather(f, 1, pos_index)[:, :, None]               # f_s − f_r
    pair_mask = pos_valid[:, :, None] & negative[:, None, :]
    terms = weights * F.softplus(diff) * pair_mask
    per_query = terms.sum(dim=(1, 2)) / pair_mask.sum(dim=(1, 2)).clamp(min=1)
    return per_query.sum() / divisor


__all__ = ["inbatch_loss", "randneg_loss", "star_loss", "adore_gains", "adore_pair_weights",
           "adore_query_loss", "adore_batch_loss"]
