"""One module per ``mtkd`` command, each declaring ``COMMAND`` (``args.Command``); the modules
that hold a command's work (reporting, prediction, ...) are imported by its ``main`` only."""
