"""Model definitions the project owns (the default `shapes` classifier)."""
