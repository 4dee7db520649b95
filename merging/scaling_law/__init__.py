"""The merging scaling law: curve and joint fits, variance, planning, the stop/continue decision, backtests,
theory, the fit folder and its plots."""
