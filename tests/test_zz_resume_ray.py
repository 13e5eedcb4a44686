"""Rerunning with the same run name resumes from the latest checkpoint. Kept in a file that runs
last in the session: after a resumed run Ray Train has been seen to keep the run's controller and
its placement group alive, which starves later tests of CPUs (see tests/conftest.py)."""
from conftest import ci_overrides, compose

F2C = ["method=f2c", *ci_overrides("f2c"), "trainer.cpus_per_worker=0.5", "trainer.num_workers=2", "run.name=resume"]


def test_rerun_with_same_name_resumes(ray_head, tmp_path):
    from trustlab.platform.experiment import train

    first = train(compose(F2C + ["trainer.epochs=1"], tmp_path))
    assert first["train_history"]["train"]["epoch"] == 1
    m = train(compose(F2C + ["trainer.epochs=2"], tmp_path))
    hist = m["train_history"]["train"]
    assert hist["resumed_from_epoch"] == 1 and hist["epoch"] == 2
