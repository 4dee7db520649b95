"""The merging scaling law: the per-method curve, variance, joint and planning fits, the stop/continue decision,
backtests, theory, sweep tables read into curves, the fit folder, plan answers from it, and the plots."""
