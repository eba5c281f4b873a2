"""Build a checked, self-contained .mar: the archive builder's command line, as `make archive` and `camserve archive`
run it (camserve_tools/commands/archive.py; `--help` lists every model form and option)."""

from camserve_tools.commands.archive import build_main

if __name__ == "__main__":
    build_main()
