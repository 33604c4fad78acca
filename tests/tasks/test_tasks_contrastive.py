"""Contrastive losses (tasks.pretrain.contrastive) against hand-computed values, and the objective."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from tasks.pretrain import contrastive as ct
from tasks.pretrain import objectives


def softplus_sum(*gaps: float) -> float:
    """-log softmax of a positive whose score exceeds each negative's by ``gaps``: log(1 + sum e^-gap)."""
    return math.log(1 + sum(math.exp(-g) for g in gaps))


TEXT = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
IMAGE = torch.tensor([[1.0, 0.0], [0.6, 0.8]])


def test_in_batch_info_nce_matches_a_hand_computed_case():
    # scale 2: text->image logits [[2, 1.2], [0, 1.6]]; image->text [[2, 0], [1.2, 1.6]].
    r = ct.in_batch_info_nce(TEXT, IMAGE, 2.0)
    t2i = (softplus_sum(2 - 1.2) + softplus_sum(1.6 - 0)) / 2
    i2t = (softplus_sum(2 - 0) + softplus_sum(1.6 - 1.2)) / 2
    assert float(r.loss) == pytest.approx((t2i + i2t) / 2, abs=1e-6)
    assert r.parts == pytest.approx({"contrastive_t2i": t2i, "contrastive_i2t": i2t}, abs=1e-6)
    assert r.n == 2 and r.correct == 2.0 and r.candidates == 2
    one_way = ct.in_batch_info_nce(TEXT, IMAGE, 2.0, symmetric=False)
    assert float(one_way.loss) == pytest.approx(t2i, abs=1e-6)


def test_extra_negatives_and_same_image_rows():
    extra_image = torch.tensor([[0.0, 1.0]])  # scores 0 for text 0, 2 for text 1
    r = ct.in_batch_info_nce(TEXT, IMAGE, 2.0, extra_image=extra_image, symmetric=False)
    expected = (softplus_sum(2 - 1.2, 2 - 0) + softplus_sum(1.6 - 0, 1.6 - 2)) / 2
    assert float(r.loss) == pytest.approx(expected, abs=1e-6)
    assert r.candidates == 3 and r.correct == 1.0  # text 1's extra negative outscores its image
    # The extra image is text 1's own image's (same group): removed from its candidates.
    r = ct.in_batch_info_nce(TEXT, IMAGE, 2.0, groups=torch.tensor([5, 7]), extra_image=extra_image,
                             extra_image_groups=torch.tensor([7]), symmetric=False)  # fmt: skip
    expected = (softplus_sum(2 - 1.2, 2 - 0) + softplus_sum(1.6 - 0)) / 2
    assert float(r.loss) == pytest.approx(expected, abs=1e-6)
    # Two captions of one image are not each other's negatives: nothing is left to contrast.
    r = ct.in_batch_info_nce(TEXT, IMAGE, 2.0, groups=torch.tensor([3, 3]))
    assert float(r.loss) == pytest.approx(0.0, abs=1e-6)


def test_learned_scale_gets_a_gradient_and_fixed_scale_works():
    scale = torch.tensor(2.0, requires_grad=True)
    text = TEXT.clone().requires_grad_(True)
    r = ct.in_batch_info_nce(text, IMAGE, scale)
    r.loss.backward()
    assert scale.grad is not None and float(scale.grad) < 0  # sharper is better: positives lead here
    assert text.grad is not None and torch.isfinite(text.grad).all()


def test_group_and_itm_info_nce_match_hand_computed_cases():
    r = ct.group_info_nce(torch.tensor([[3.0, 1.0, 1.0]]))
    assert float(r.loss) == pytest.approx(softplus_sum(2, 2), abs=1e-6) and r.correct == 1.0
    r = ct.group_info_nce(torch.tensor([[3.0, 1.0, 1.0]]), temperature=0.5)
    assert float(r.loss) == pytest.approx(softplus_sum(4, 4), abs=1e-6)
    # Matching logits -> log-odds of "matched": [3, 1, -1] for one image's positive and 2 negatives.
    logits = torch.tensor([[0.0, 3.0], [1.0, 2.0], [2.0, 1.0]])
    r = ct.itm_info_nce(logits, group_size=3)
    assert float(r.loss) == pytest.approx(softplus_sum(2, 4), abs=1e-6)
    with pytest.raises(ValueError, match="not groups of 2"):
        ct.itm_info_nce(logits, group_size=2)


def test_negative_pairs_lays_out_one_positive_and_k_negatives_of_other_images():
    b, k = 5, 2
    batch = {"input_ids": torch.arange(b)[:, None].repeat(1, 3), "attention_mask": torch.ones(b, 3, dtype=torch.long),
             "token_type_ids": torch.zeros(b, 3, dtype=torch.long),
             "visual_feats": torch.arange(b).float()[:, None, None].repeat(1, 2, 4), "visual_pos": torch.rand(b, 2, 4),
             "mlm_labels": torch.zeros(b, 3)}  # fmt: skip
    groups = torch.tensor([0, 0, 1, 2, 3])
    out = ct.negative_pairs(batch, k, groups, torch.Generator().manual_seed(0))
    assert out["input_ids"].shape == (b * (1 + k), 3) and "mlm_labels" not in out
    image_row = out["visual_feats"][:, 0, 0].long().view(b, 1 + k)
    text_row = out["input_ids"][:, 0].view(b, 1 + k)
    assert (image_row == torch.arange(b)[:, None]).all()
    assert (text_row[:, 0] == torch.arange(b)).all()
    assert (out["match_labels"].view(b, 1 + k) == torch.tensor([1] + [0] * k)).all()
    for i in range(b):
        negs = text_row[i, 1:]
        assert len(set(negs.tolist())) == k and (groups[negs] != groups[i]).all()
    again = ct.negative_pairs(batch, k, groups, torch.Generator().manual_seed(0))
    assert torch.equal(again["input_ids"], out["input_ids"])
    with pytest.raises(ValueError, match="fewer than k=4"):
        ct.negative_pairs(batch, 4, groups, torch.Generator().manual_seed(0))


def test_negative_queue_is_fifo_and_saved_in_its_state():
    q = ct.NegativeQueue(size=3, dim=2)
    assert q.negatives()["extra_text"].shape == (0, 2)
    q.push(torch.ones(2, 2), torch.ones(2, 2), torch.tensor([1, 2]))
    q.push(torch.full((2, 2), 2.0), torch.full((2, 2), 2.0), torch.tensor([3, 4]))
    neg = q.negatives()
    assert neg["extra_text"].shape == (3, 2)
    assert sorted(neg["extra_text_groups"].tolist()) == [2, 3, 4]  # group 1 was the oldest: dropped
    copy = ct.NegativeQueue(size=3, dim=2)
    copy.load_state_dict(q.state_dict())
    assert torch.equal(copy.negatives()["extra_image"], neg["extra_image"])
    # Usable as extra negatives.
    r = ct.in_batch_info_nce(TEXT, IMAGE, 2.0, **q.negatives())
    assert r.candidates == 5


def test_contrastive_objective_uses_the_true_pairs_only():
    out = SimpleNamespace(contrastive={"text": torch.cat([TEXT, torch.tensor([[0.0, 1.0]])]),
                                       "image": torch.cat([IMAGE, torch.tensor([[1.0, 0.0]])]),
                                       "scale": torch.tensor(2.0)})  # fmt: skip
    batch = {"match_labels": torch.tensor([1, 1, 0]), "image_key": torch.tensor([0, 1, 2])}
    r = objectives.get("contrastive").loss(out, batch)
    assert r.n == 2 and float(r.loss) == pytest.approx(float(ct.in_batch_info_nce(TEXT, IMAGE, 2.0).loss), abs=1e-6)
    none = objectives.get("contrastive").loss(out, {"match_labels": torch.tensor([0, -1, 0])})
    assert none.n == 0 and float(none.loss) == 0.0
    assert objectives.chance_scales(["contrastive"], {}) == {"contrastive": 1.0}
