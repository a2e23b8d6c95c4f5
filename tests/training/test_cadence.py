"""The end-of-iteration cadence shared by every loop: its units and its once-per-multiple rule."""

from __future__ import annotations

from tailorpo.config import load_config
from tailorpo.training.cadence import Cadence, Counters, Due, crossed


def test_an_action_is_due_once_per_multiple_however_many_updates_an_iteration_makes():
    assert [crossed(2, n, n + 1) for n in range(6)] == [False, True, False, True, False, True]
    assert crossed(2, 1, 5) and not crossed(4, 5, 7) and crossed(4, 7, 8)  # one call for 2 multiples: once
    assert not any(crossed(0, n, n + 3) for n in range(5))  # 0: never


def test_checkpoint_and_eval_count_updates_and_save_every_counts_iterations():
    cadence = Cadence(checkpoint_every=2, eval_every=3, save_every=2)
    # an iteration of accumulated gradients: no update, so nothing update-based is due; the save is
    assert cadence.due(Counters(1, 2), Counters(2, 2), gradients_pending=True) == Due(False, False, True)
    # an update (the 3rd) on an odd iteration: the eval is due, not the checkpoint (2) nor the save (even)
    assert cadence.due(Counters(2, 2), Counters(3, 3), gradients_pending=False) == Due(False, True, False)
    # on Ray one iteration trains on two rollouts: updates 3 -> 5 cross 4, so one checkpoint
    assert cadence.due(Counters(3, 3), Counters(4, 5), gradients_pending=False) == Due(True, False, True)


def test_a_checkpoint_waits_for_the_pending_gradients():
    cadence = Cadence(checkpoint_every=1, eval_every=1, save_every=1)
    assert cadence.due(Counters(0, 0), Counters(1, 1), gradients_pending=True) == Due(False, True, True)


def test_the_cadence_reads_the_config_fields():
    cfg = load_config("launch/tiny.yaml", ["train.checkpoint_every=5", "eval.every=7", "train.save_every=3"])
    assert Cadence.of(cfg) == Cadence(checkpoint_every=5, eval_every=7, save_every=3)
