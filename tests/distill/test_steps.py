"""The training loop's steps (`distill.steps`): what a resumed run reads back of its checkpoint's metrics."""

from __future__ import annotations

from distill.steps import saved_metrics


def test_metrics_of_a_checkpoint_with_the_old_names_resume_under_the_new_ones():
    old = {"val_agreement": 0.6, "val_agreement_initial": 0.2, "val_agreement_blind_initial": 0.5, "loss": 1.0}
    state = {"metrics": old}
    assert saved_metrics(state) == {
        "val_mask_iou": 0.6,
        "val_mask_iou_initial": 0.2,
        "val_mask_iou_blind_initial": 0.5,
        "loss": 1.0,
    }
    assert state["metrics"] is old and "val_agreement" in old  # the checkpoint's own dict is left as it was
    current = {"val_mask_iou": 0.7, "val_mask_iou_initial": 0.3}
    assert saved_metrics({"metrics": current}) == current
