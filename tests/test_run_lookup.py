"""Run lookups on a store larger than one page of MLflow search results (1000 runs): a team store
of a ten-week study passes that, and a truncated search would turn old grids' children into parents."""

from mlflow import MlflowClient

from pipeline import render, tracking, writeup

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

    assert [r.id for r in tracking.stage_parents("breastmnist", "linear_probe")] == [parent]
    assert {r.id for r in tracking.child_runs(parent, "breastmnist")} == children
    assert len(tracking.finished_runs("breastmnist")) == CHILDREN + 1
    assert [r.id for r in tracking.all_runs("attributes.status = 'RUNNING'")] == [stale]


def test_a_deleted_grid_leaves_no_parents_and_nested_steps_count(tracking_uri):
    client = MlflowClient()
    experiment = client.create_experiment("grids")

    def finished(stage: str, parent: str = "") -> str:
        tags = {"dataset": "breastmnist", "stage": stage, **({"mlflow.parentRunId": parent} if parent else {})}
        run = client.create_run(experiment, tags=tags)
        client.set_terminated(run.info.run_id, "FINISHED")
        return run.info.run_id

    study = finished("study")
    step = finished("augment_ablation", study)
    driver = client.create_run(experiment).info.run_id  # a user's own driver run (MLflow's multistep_workflow)
    driven = finished("augment_ablation", driver)
    grid = finished("augment_ablation")
    children = [finished("augment_ablation", grid) for _ in range(2)]
    assert {r.id for r in tracking.stage_parents("breastmnist", "augment_ablation")} == {step, driven, grid}
    assert {r.id for r in tracking.child_runs(grid, "breastmnist")} == set(children)

    client.delete_run(grid)  # the MLflow UI deletes a parent and leaves its children
    client.delete_run(study)
    assert {r.id for r in tracking.stage_parents("breastmnist", "augment_ablation")} == {step, driven}


def test_checklist_reads_the_cited_runs_and_notes_purged_ones(tracking_uri):
    client = MlflowClient()
    experiment = client.create_experiment("cited")
    parent = client.create_run(experiment, tags={"command": "medmnist-ssl linear_probe --seeds 0,1"}).info.run_id
    child = client.create_run(experiment, tags={"mlflow.parentRunId": parent, "seed": "1", "code_version": "abc"}).info.run_id
    purged = "f" * 32
    table = render.Table("t", "t", ["x"], records=[{"run_id": child}, {"run_id": purged, "parent_run_id": parent}])
    lines, commands = writeup.checklist_lines([table])
    assert lines[0] == "Runs cited by the tables: 2, from 1 top-level run."
    assert f"Cited runs no longer in the store (purged): {purged[:8]}." in lines
    assert commands == [f"medmnist-ssl linear_probe --seeds 0,1   # run {parent[:8]}"]
    assert tracking.runs_by_id(["x' OR 1=1 --", purged]) == {}  # ids are checked before they reach a filter
