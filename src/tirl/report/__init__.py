"""A run's report: PNG plots and one static, self-contained HTML page with a trajectory viewer.

`tirl report RUN_DIR` (or `tirl.report.build.build_report`) reads the run directory (config,
metrics.jsonl, RL step trajectories, eval trajectories and summaries) and writes `report.html` and
`plots/*.png` into it; the pipeline does the same at the end of every run. matplotlib and the token
view are optional: without them the page says what it leaves out.
"""
