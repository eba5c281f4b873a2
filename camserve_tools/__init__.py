"""Everything around camserve's worker runtime: the `camserve` command (cli.py, commands/), the launcher, the
archive builder, the scenes and photos the models are trained and tested on, the in-process handler, benchmarks,
deployment bundles and manifest checks.

Nothing here goes into a .mar and the runtime (camserve/) never imports it; these modules may import anything the
project pins.
"""
