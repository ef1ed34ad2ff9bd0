"""The study's steps, one module per MLflow entry point and named as it: each parses nothing,
computes with the library in `pipeline/`, logs through `pipeline.tracking`, and never imports
another step."""
