"""Prefect flows that wire the stages: harvest, label, export and the pipeline of all three;
serving them on a schedule; and `featurescribe demo`.

Importing this package imports no Prefect; each module sets Prefect up (`prefect_env`) first.
"""
