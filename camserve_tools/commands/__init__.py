"""The subcommands of `camserve` (camserve_tools.cli), one module each: its parser, its run, its report."""
