"""Prefect flows that wire the stages: harvest, label, export and the pipeline of all three;
serving them on a schedule; and `featurescribe demo`.

Importing this package imports no Prefect. Prefect's settings are made by the entry point
(`featurescribe`'s `main`, the test session) with `prefect_env.configure_prefect()` before a flow
module is imported; importing a flow module configures nothing.

The label pipeline: `label_options.py` (the options, declared once), `label_core.py` (the
steps: select, prepare, compute, write), `label_run.py` (the run context and the plain loop),
`label_flow.py` + `label_chunks.py` (the Prefect flow and its chunk loop), `label_batch.py`
(provider batch APIs), `label_command.py` (the command and its summary).
"""
