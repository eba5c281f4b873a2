"""Tools around camserve's runtime: the `camserve` command (cli.py), deployment bundles, the loopback KServe front,
manifest checks.

Nothing here goes into a .mar and the handler never imports it (scripts/build_archive.py packs only camserve/ and
handlers/); these modules may import anything in requirements.txt.
"""
