"""How the weights get there: each tensor read from the checkpoint straight to its device
(loader), the threaded reader pool, transformers' key conversions and the progress bar.

`devicemap.load` is the function (load/loader.py); this package is `devicemap.load` only
to `from devicemap.load import ...` and `sys.modules`."""
