"""Run lookups on a store larger than one page of MLflow search results (1000 runs): a team store
of a ten-week study passes that, and a truncated search would turn old grids' children into parents."""

from mlflow import MlflowClient

from pipeline import tracking

CHILDREN = 1001


def test_lookups_page_past_one_thousand_runs(tracking_uri):
    client = MlflowClient()
    experiment = client.create_experiment("big")
    tags = {"dataset": "breastmnist", "stage": "linear_probe"}

    def finished(start: int, **extra: str) -> str:
        run = client.create_run(experiment, start_time=start, tags={**tags, **extra})
        client.set_terminated(run.info.run_id, "FINISHED", end_time=start + 1)
        return run.info.run_id

    parent = finished(1_000)
    children = {finished(2_000 + i, **{"mlflow.parentRunId": parent}) for i in range(CHILDREN)}
    stale = client.create_run(experiment, start_time=500, tags=tags).info.run_id

    assert [r.info.run_id for r in tracking.stage_parents("breastmnist", "linear_probe")] == [parent]
    assert {r.info.run_id for r in tracking.child_runs(parent, "breastmnist")} == children
    assert len(tracking.finished_runs("breastmnist")) == CHILDREN + 1
    assert [r.info.run_id for r in tracking.all_runs("attributes.status = 'RUNNING'")] == [stale]
