"""Scaling-law sweeps: subset designs, task vectors held in memory, the table, and the run that fills it."""
