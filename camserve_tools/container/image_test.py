"""`make image-test`: camserve's image, run for real with podman and driven from outside, as a user would.

    python -m camserve_tools.container.image_test [--image localhost/camserve:0.2.0] [--skip-kube]

1. podman & co are installed with apt when missing (as root), and it says so. Where that is impossible (not root, no
   apt) it prints SKIPPED with the reason and exits 0, unless CAMSERVE_IMAGE_TEST_REQUIRED=1 (then it fails).
2. `make image` first (its layers cached: seconds unless a pin changed), so the image tested is this checkout's;
   --no-build tests the image as it is.
3. One container of the image, as shipped (production config: token authorization on), on loopback and free ports,
   `--read-only --memory 2560m --cpus 1.5`:
   - cold start: seconds from `podman run` to the first answer with a map;
   - the image's HEALTHCHECK (its probe, a real prediction with the container's own key) passes;
   - without the key, 401; `camserve smoke`'s probes (labels of the archive, a map of the image, peak and box
     inside it, a 4xx JSON error for a body that is not an image), with the key;
   - the JVM's maximum heap follows the container's limit (container support), read with jcmd inside it;
   - Prometheus (Debian's `prometheus`) scrapes the container's metrics port; camserve's own metrics (CamMapTime,
     CamRequests, CamErrors by type) and TorchServe's request counter must appear in it;
   - Locust, 30 s, with the SLO gates (load_tests/locustfile.py), while the container's summed RSS is sampled: it
     must stay under the limit, and the container must not be OOM-killed;
   - SIGTERM while clients are sending long requests: every request in flight at the signal is answered (200), and
     the container exits with code 0 within the grace period;
   - restarted on the same image and model store, the same requests get the same answers.
4. KServe, each container as its manifests make it (read-only root, writable only where an emptyDir is declared):
   the camserve-torchserve runtime with each InferenceService (v1, v2) answers KServe's route with a map, refuses a
   body that is not JSON with a 4xx, and passes the InferenceService's readiness command; the camserve runtime
   (KServe's model server, its command and args, the archives at /mnt/models) answers v2 and v1 and its readiness
   path; an engine the image lacks is refused with a message.
5. `podman kube play` of deploy/kubernetes's ConfigMap and Deployment (one replica, the image built here, hostPorts
   on loopback, free): the container runs as the manifest says (uid 1000, read-only root), and the Deployment's
   own readiness and liveness commands (exec, a real answer) pass inside the pod.

Everything it starts is removed by the name it gave it. Exit code 0 all passed (or SKIPPED), 1 a check failed.
Figures go to .run/image-test/report.json.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import sys
import time

from camserve_tools.container.build import HOST_PACKAGES, ToolsMissing, build, default_tag, ensure_host_tools, image_exists
from camserve_tools.container.image_checks import (
    answers,
    check_healthcheck,
    check_heap,
    check_load,
    check_prometheus,
    check_sigterm,
    check_smoke,
    check_token,
    prometheus_scraping,
)
from camserve_tools.container.image_harness import WORK_DIR, Container, Report, podman
from camserve_tools.container.image_kube import check_engine_refusal, check_kube_play, check_native_runtime, check_torchserve_runtime

# --- the run ------------------------------------------------------------------------------------------------------


def skip(reason: str) -> int:
    message = f"make image-test SKIPPED: {reason}"
    print("\n" + "!" * len(message) + f"\n{message}\n" + "!" * len(message), flush=True)
    if os.environ.get("CAMSERVE_IMAGE_TEST_REQUIRED") == "1":
        print("CAMSERVE_IMAGE_TEST_REQUIRED=1: a skip is a failure", flush=True)
        return 1
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image", default=default_tag())
    parser.add_argument("--skip-kube", action="store_true", help="leave out `podman kube play`")
    parser.add_argument("--no-build", action="store_true", help="test the image as it is, without `make image` first")
    args = parser.parse_args()
    try:
        installed = ensure_host_tools((*HOST_PACKAGES, "prometheus"))
    except ToolsMissing as error:
        return skip(str(error))
    if installed:
        print(f"installed with apt: {' '.join(installed)}", flush=True)
    if podman("info", check=False).returncode != 0:
        return skip("podman is installed but cannot run containers here (`podman info` fails)")
    WORK_DIR.mkdir(parents=True, exist_ok=True)
    report = Report()
    if not args.no_build:
        # make image first: with its layers cached, seconds; the image tested is always this checkout's.
        print(f"building {args.image} (make image){'' if image_exists(args.image) else ': absent, from nothing'}", flush=True)
        report.figures["build"] = build(args.image)
    elif not image_exists(args.image):
        return skip(f"{args.image} is absent and --no-build was given")
    started = time.monotonic()
    name = f"camserve-image-test-{secrets.token_hex(3)}"
    container = Container(args.image, name)
    try:
        container.run()
        if report.run("cold start to the first answer", lambda: f"{container.wait_for_answer():.1f} s"):
            report.figures["cold_start_s"] = float(report.checks[-1]["detail"].split()[0])
            report.run("HEALTHCHECK (a real prediction) passes", lambda: check_healthcheck(container))
            report.run("production config: token authorization", lambda: check_token(container))
            report.run("camserve smoke's probes against the container", lambda: check_smoke(container))
            report.run("JVM heap sized by container support", lambda: check_heap(container, report))
            with prometheus_scraping(f"127.0.0.1:{container.metrics_port}") as prometheus:
                report.run("Locust 30 s with SLO gates; RSS inside the limit", lambda: check_load(container, report))
                report.run("Prometheus scraped camserve's metrics", lambda: check_prometheus(prometheus, report))
            before = answers(container)
            report.run("SIGTERM during load: in-flight answered, exit within grace", lambda: check_sigterm(container, report))

            def restart() -> str:
                container.start()
                seconds = container.wait_for_answer()
                after = answers(container)
                assert after == before, "an answer differs after the restart"
                return f"answering again after {seconds:.1f} s; {len(after)} answers identical (shapes and imagenet)"

            report.run("restart with the same model store: same answers", restart)
    finally:
        container.remove()
    report.run("KServe camserve-torchserve runtime, protocol v1", lambda: check_torchserve_runtime(args.image, "v1"))
    report.run("KServe camserve-torchserve runtime, protocol v2", lambda: check_torchserve_runtime(args.image, "v2"))
    report.run("KServe camserve runtime (KServe's model server)", lambda: check_native_runtime(args.image))
    report.run("an engine the image lacks is refused", lambda: check_engine_refusal(args.image))
    if not args.skip_kube:
        check_kube_play(args.image, report)
    report.figures["image_test_seconds"] = round(time.monotonic() - started, 1)
    (WORK_DIR / "report.json").write_text(
        json.dumps({"ok": report.ok, "checks": report.checks, "figures": report.figures}, indent=2) + "\n"
    )
    passed = sum(check["ok"] for check in report.checks)
    seconds = report.figures["image_test_seconds"]
    print(f"\nmake image-test: {passed}/{len(report.checks)} checks passed in {seconds:.0f} s; {WORK_DIR / 'report.json'}")
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
