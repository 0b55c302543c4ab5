#!/usr/bin/env bash
# The CPU form of the Dockerfile, built with podman from a local Debian 12 base (no registry),
# then checked by running the toy main job for a few steps inside it as the image's non-root
# user, writing to a mounted run directory. Root; Debian's podman, runc and debootstrap are
# installed when missing. Not part of scripts/test.sh (about 8.5 minutes; docs/cluster.md):
#
#   bash scripts/build_image.sh            # build trb-megatron:0.1.0-cpu, then the toy check
#   CHECK=0 bash scripts/build_image.sh    # build only
#
# Environment: IMAGE (trb-megatron:0.1.0-cpu), BASE (localhost/trb-base:bookworm: made with
# debootstrap when podman does not have it), WORK (a directory for the base's root file system,
# the build's configs and the check's run directory; default a new one under /tmp, removed at
# the end), CHECK_STEPS (3). This machine's pip configuration (/etc/pip.conf, ~/.config/pip/
# pip.conf: local wheel folders and indexes, the CA bundle for TLS to the package index) is
# offered to the build: the folders it names are mounted read-only into every RUN step.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
image="${IMAGE:-trb-megatron:0.1.0-cpu}"
base="${BASE:-localhost/trb-base:bookworm}"
steps="${CHECK_STEPS:-3}"
# the CPU form's Python is Debian 12's 3.11: the megatron-core of the 3.11 environment (the
# Dockerfile's default, the newest tested release, needs 3.12)
mcore="$(awk '$1 == "main" { print $4 }' "$root/scripts/environments.txt")"
[ -n "$mcore" ] || { echo "build_image.sh: no 'main' environment in scripts/environments.txt" >&2; exit 1; }
own_work=0
if [ -z "${WORK:-}" ]; then WORK="$(mktemp -d /tmp/trb-image.XXXXXX)"; own_work=1; fi
log() { echo "[build_image] $(date +%T) $*" >&2; }
elapsed() { echo $(($(date +%s) - $1)); }

bash "$root/scripts/apt_install.sh" podman runc debootstrap

# Two podman defaults fail on machines like this one: crun cannot raise RLIMIT_NOFILE without
# CAP_SYS_RESOURCE and does not support cgroups in hybrid mode. runc with limits no higher than
# the host's hard ones works; podman's container monitor runs with at most 32768 processes, and
# runc cannot set more than that (docs/troubleshooting.md).
nofile=$(ulimit -Hn) nproc=$(ulimit -Hu)
[ "$nofile" = unlimited ] && nofile=1048576
{ [ "$nproc" = unlimited ] || [ "$nproc" -gt 32768 ]; } && nproc=32768
cat > "$WORK/containers.conf" <<EOF
[containers]
default_ulimits = ["nofile=$nofile:$nofile", "nproc=$nproc:$nproc"]
[engine]
runtime = "runc"
EOF
export CONTAINERS_CONF="$WORK/containers.conf"

if ! podman image exists "$base"; then
  start=$(date +%s)
  log "making $base with debootstrap (minbase bookworm)"
  debootstrap --variant=minbase bookworm "$WORK/rootfs" http://deb.debian.org/debian >/dev/null
  tar -C "$WORK/rootfs" -c . | podman import - "$base" >/dev/null
  rm -rf "$WORK/rootfs"
  log "base image in $(elapsed "$start") s"
fi

# This machine's pip configuration, merged into one file mounted as the build's /etc/pip.conf;
# every local folder or file it names (find-links, file:// indexes, a constraints file) is
# mounted at the same path, and the CA bundle it names (or the system's) at
# /run/trb-build/ca.crt.
volumes=()
while IFS= read -r line; do volumes+=("$line"); done < <(python3 - "$WORK" <<'EOF'
import configparser, os, re, sys
work = sys.argv[1]
merged = configparser.ConfigParser()
for path in ("/etc/xdg/pip/pip.conf", "/etc/pip.conf", os.path.expanduser("~/.pip/pip.conf"),
             os.path.expanduser("~/.config/pip/pip.conf"), os.environ.get("PIP_CONFIG_FILE", "")):
    if path and os.path.isfile(path):
        merged.read(path)
if not merged.has_section("global"):
    merged.add_section("global")
cert = merged.get("global", "cert", fallback="/etc/ssl/certs/ca-certificates.crt")
folders = set()
for section in merged.sections():
    for key, value in merged.items(section):
        if key == "constraint" and os.path.isfile(value):  # a constraints file: the same path
            folders.add(value)
        if key not in ("find-links", "index-url", "extra-index-url"):
            continue
        for word in value.split():
            path = re.sub(r"^file://", "", word)
            if path.startswith("/") and os.path.exists(path):
                # a file:// index's folder: mount the repository around it (its files may be
                # linked relative to it, as ../../files/ is)
                folders.add(os.path.dirname(path.rstrip("/")) if word.startswith("file://")
                            else path)
if os.path.isfile(cert):
    merged.set("global", "cert", "/run/trb-build/ca.crt")
    print(f"--volume={cert}:/run/trb-build/ca.crt:ro")
with open(os.path.join(work, "pip.conf"), "w") as f:
    merged.write(f)
print(f"--volume={work}/pip.conf:/etc/pip.conf:ro")
for folder in sorted(folders):
    print(f"--volume={folder}:{folder}:ro")
EOF
)

start=$(date +%s)
log "building $image (CPU form) from $base"
# docker format: the OCI format would drop the Dockerfile's SHELL (bash with pipefail)
podman build --format docker --force-rm --network=host "${volumes[@]}" -t "$image" \
  --build-arg BASE_IMAGE="$base" --build-arg CPU_STACK=1 --build-arg MCORE_VERSION="$mcore" \
  --build-arg INSTALL_TE=0 --build-arg INSTALL_APEX=0 "$root"
build_s=$(elapsed "$start")
log "built $image in $build_s s ($(podman image inspect --format '{{.Size}}' "$image" \
  | awk '{printf "%.1f GB", $1 / 1e9}'))"

if [ "${CHECK:-1}" = 1 ]; then
  # The toy main job as the image runs it by default, for a few steps: the image's user (not
  # root) writes the toy build, the converted models, checkpoints and metrics to a directory of
  # the host mounted over the image's runs/ (:U hands it to that user), where the toy config
  # puts them.
  run="$WORK/run"
  mkdir -p "$run"
  start=$(date +%s)
  log "running $steps toy steps in $image as its user, $run mounted at /opt/trb-megatron/runs"
  podman run --rm --network=none --ipc=host -v "$run:/opt/trb-megatron/runs:U" "$image" \
    bash -c 'id -u && exec bash examples/run_trb_distill.sh "$@"' _ \
    "train.steps=$steps" train.eval_every=0 eval.data.limit=32 | tee "$WORK/check.log"
  grep -q '^  status: done$' "$WORK/check.log"
  [ "$(head -n 1 "$WORK/check.log")" != 0 ] || { log "the job ran as root"; exit 1; }
  log "toy check passed in $(elapsed "$start") s: $(wc -l < "$run/toy_trb/metrics.jsonl")" \
    "steps in $run/toy_trb/metrics.jsonl, owned by uid $(stat -c %u "$run/toy_trb/metrics.jsonl")"
fi
if [ "$own_work" = 1 ]; then rm -rf "$WORK"; fi
