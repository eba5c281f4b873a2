"""camserve's container image: its entry point and probe (they run inside the image), and the host-side tools that
build it (`make image`, build.py) and drive it for real (`make image-test`, image_test.py) with podman."""
