"""One module per CLI subcommand: ``add_args(parser)`` and ``run(args) -> exit status``."""
