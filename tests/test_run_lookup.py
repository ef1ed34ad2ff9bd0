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


def test_a_deleted_grid_leaves_no_parents_and_study_steps_count(tracking_uri):
    client = MlflowClient()
    experiment = client.create_experiment("grids")

    def finished(stage: str, parent: str = "") -> str:
        tags = {"dataset": "breastmnist", "stage": stage, **({"mlflow.parentRunId": parent} if parent else {})}
        run = client.create_run(experiment, tags=tags)
        client.set_terminated(run.info.run_id, "FINISHED")
        return run.info.run_id

    study = finished("study")
    step = finished("augment_ablation", study)
    grid = finished("augment_ablation")
    children = [finished("augment_ablation", grid) for _ in range(2)]
    assert {r.info.run_id for r in tracking.stage_parents("breastmnist", "augment_ablation")} == {step, grid}
    assert {r.info.run_id for r in tracking.child_runs(grid, "breastmnist")} == set(children)

    client.delete_run(grid)  # the MLflow UI deletes a parent and leaves its children
    client.delete_run(study)
    assert [r.info.run_id for r in tracking.stage_parents("breastmnist", "augment_ablation")] == [step]
