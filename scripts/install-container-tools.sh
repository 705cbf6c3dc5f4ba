#!/usr/bin/env bash
# What `make images`, `make demo-containers` and `make test-containers` need to build and run the
# images, idempotently: nothing where a Docker engine answers; else podman (served as a Docker API
# engine by dinoflow_tools.images), runc (its runtime here: crun refuses hybrid cgroups) and
# debootstrap (the base image where no registry answers), from Debian when running as root.
set -euo pipefail

say() { printf 'install-container-tools: %s\n' "$*" >&2; }

docker_answers() {
  local host="${DOCKER_HOST:-unix:///var/run/docker.sock}"
  [[ "$host" == unix://* ]] || return 1
  command -v curl >/dev/null 2>&1 || return 1
  curl -fsS --max-time 5 --unix-socket "${host#unix://}" http://localhost/_ping >/dev/null 2>&1
}

if docker_answers; then
  say "a Docker engine answers; nothing to install"
  exit 0
fi
missing=()
for cmd in podman runc debootstrap; do
  command -v "$cmd" >/dev/null 2>&1 || missing+=("$cmd")
done
if [[ ${#missing[@]} -eq 0 ]]; then
  exit 0
fi
if [[ "$(id -u)" != 0 ]]; then
  say "no Docker engine answers and ${missing[*]} missing: start Docker, or run 'sudo apt-get install podman runc debootstrap'"
  exit 1
fi
say "installing ${missing[*]} (Debian packages podman runc debootstrap)"
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq podman runc debootstrap >/dev/null
