"""PlateauCallback: the rule as a table, then the callback writing through the RunLogCallback."""

from types import SimpleNamespace

import pytest
import torch

from agingnet.callbacks.plateau import PlateauCallback, plateau_reached
from agingnet.callbacks.run_log import RunLogCallback


@pytest.mark.parametrize("step,best,idmin,expected", [
    (56000, 54800, 55200, True),    # 1200 since best, 800 since id min: both at the boundary
    (56000, 54801, 55200, False),   # 1199 since best
    (56000, 54800, 55201, False),   # 799 since the id minimum
    (60000, 50500, 59999, False),   # identity still improving
    (60000, 59500, 50000, False),   # recent best
    (60000, None, 50000, False),    # no validation yet
    (60000, 50000, None, False),    # no training id yet
])
def test_rule_table(step, best, idmin, expected):
    assert plateau_reached(step, best, idmin, 1200, 800) is expected


def test_negative_patience_rejected():
    with pytest.raises(ValueError, match="best_patience=-1"):
        PlateauCallback(best_patience=-1)


def test_callback_writes_once_per_validation_and_logs(tmp_path):
    logged = []
    pl = SimpleNamespace(abs_step=0, log=lambda k, v, **kw: logged.append((k, v)))
    run_log = RunLogCallback(str(tmp_path))
    cb = PlateauCallback(best_patience=2, id_patience=1)
    tr = SimpleNamespace(global_step=0, callback_metrics={}, callbacks=[run_log, cb], sanity_checking=False)
    ids = [0.9, 0.5, 0.6, 0.7, 0.8, 0.4]
    for step, v in enumerate(ids, 1):
        pl.abs_step = step
        tr.callback_metrics = {"train/real/id": torch.tensor(v), "val/total": torch.tensor(1.0)}
        cb.on_train_batch_end(tr, pl, None, None, step)
        if step == 2:
            cb.on_validation_end(tr, pl)  # best at step 2
    # steps 4, 5: 2+ since best (2) and 1+ since id min (2) → plateau; line only once (no validation between);
    # step 6: a new id minimum → no plateau
    assert [v for k, v in logged if k == "train/plateau"] == [0.0, 0.0, 0.0, 1.0, 1.0, 0.0]
    lines = (tmp_path / "timestamp.txt").read_text().splitlines()
    assert lines == ["PHASE3: plateau step=4 best_step=2 id_min_step=2"]
    assert cb.state_dict() == {"best": 1.0, "best_step": 2, "id_min": pytest.approx(0.4), "id_min_step": 6,
                               "count": 1}
    cb2 = PlateauCallback()
    cb2.load_state_dict(cb.state_dict())
    assert (cb2.best_step, cb2.id_min_step) == (2, 6)
