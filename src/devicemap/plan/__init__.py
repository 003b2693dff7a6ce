"""Where the model goes: the plan options, placement of blocks on devices, what would fit
when nothing does (shortfall), and the Plan itself. Pure: budgets arrive as bytes.

`devicemap.plan` is the function (plan/planner.py); this package is `devicemap.plan` only
to `from devicemap.plan import ...` and `sys.modules`."""
