#!/usr/bin/env bash
# Build the Go-only test tools (kube-apiserver, kubectl, crictl, helm,
# kubeconform, promtool, oras, SeaweedFS's weed) from the Go module proxy and cache them by
# version, so only the first run on a machine pays for the build
# (kube-apiserver: many minutes; weed about 7).
#
# Layout of $BIN_DIR:  <tool>-<version>  (the binary)
#                      <tool> -> <tool>-<version>  (symlink to use in tests)
# Build scratch (temp go modules, logs) lives in $BIN_DIR/../build.
#
# Needs only `go` and the Go module proxy (GOPROXY). Idempotent: a tool whose
# <tool>-<version> exists and is executable is not rebuilt.
#
# Usage: tests/tools/go-tools.sh [TOOL...]   (then put $BIN_DIR on PATH)
#        With TOOL names, only those are checked and built (e.g. `weed`).
set -euo pipefail

# ---- pinned versions: the first one of each list that builds wins ----------
K8S_VERSIONS="v1.34.4 v1.34.3"        # k8s.io/kubernetes: control plane, kubelet, kube-proxy, kubectl
CRICTL_VERSIONS="v1.34.0 v1.37.0"     # sigs.k8s.io/cri-tools (CRI v1, fine for containerd 1.6)
HELM_VERSIONS="v3.19.0 v3.19.5"       # helm.sh/helm/v3
KUBECONFORM_VERSIONS="v0.7.0 v0.6.7"  # github.com/yannh/kubeconform
# github.com/prometheus/prometheus (module v0.316.0 = Prometheus 3.16.0):
# promtool checks and unit-tests the chart's PrometheusRule.
PROMTOOL_VERSIONS="v0.316.0 v0.315.1"
# oras pushes and pulls OCI artifacts (Helm charts, signatures, referrers).
ORAS_VERSIONS="v1.3.6 v1.3.5"
# github.com/seaweedfs/seaweedfs (the object store of the scale-out tests);
# the module proxy serves it only as a pseudo-version.
WEED_VERSIONS="v0.0.0-20261109003541-7506e5f91cd6"
# The only newer Go toolchain this workplace serves (via the module proxy);
# used only if a module's go.mod demands more than the local Go.
NEWER_GO="go1.27.3"

BIN_DIR="${PULLTHROUGH_TOOLS_DIR:-$HOME/.cache/pullthrough/bin}"
mkdir -p "$BIN_DIR"
BIN_DIR="$(cd "$BIN_DIR" && pwd)"
BUILD_DIR="$(dirname "$BIN_DIR")/build"
mkdir -p "$BUILD_DIR"

command -v go >/dev/null || { echo "go-tools.sh: 'go' not found on PATH" >&2; exit 1; }
# Go 1.21 is the oldest that reads these modules' go.mod files (`go 1.24.0`,
# `toolchain` lines) and can switch toolchains (GOTOOLCHAIN, run_go below);
# an older one (Debian bookworm's golang is 1.19) would fail every build
# minutes later with "invalid go version" in a log.
MIN_GO_MINOR=21
GO_VERSION="$(GOTOOLCHAIN=local go env GOVERSION 2>/dev/null || true)"
if [[ "$GO_VERSION" =~ ^go1\.([0-9]+) ]] && ((BASH_REMATCH[1] < MIN_GO_MINOR)); then
  echo "go-tools.sh: Go ${GO_VERSION#go} is too old: these builds need Go 1.$MIN_GO_MINOR or newer" \
    "(it fetches $NEWER_GO through the module proxy for modules that need more)." \
    "Debian bookworm's golang package is 1.19: install a newer Go (https://go.dev/dl/) first on PATH." >&2
  exit 1
fi
# A go.work somewhere above the build dir must not leak into our temp modules.
export GOWORK=off

# Serialize concurrent runs (e.g. two test suites starting at once).
exec 9>"$BIN_DIR/.lock"
flock 9

FAILED=()
ONLY=("$@")
TOOLS="weed kube-apiserver kubectl kube-controller-manager kube-scheduler kubelet kube-proxy crictl helm kubeconform promtool oras"
for t in "${ONLY[@]}"; do
  [[ " $TOOLS " == *" $t "* ]] || { echo "go-tools.sh: unknown tool '$t' (known: $TOOLS)" >&2; exit 2; }
done

# wanted TOOL: true when no tools were named on the command line, or TOOL was.
wanted() {
  ((${#ONLY[@]} == 0)) && return 0
  local t
  for t in "${ONLY[@]}"; do [[ "$t" == "$1" ]] && return 0; done
  return 1
}

# run_go LOG ARGS...: run `go ARGS` with the local toolchain, output to LOG.
# If the module says it needs a newer Go ("requires go >= ... GOTOOLCHAIN=local"),
# retry once with $NEWER_GO, which the go command fetches from the proxy.
run_go() {
  local log="$1"; shift
  if GOTOOLCHAIN=local go "$@" >>"$log" 2>&1; then return 0; fi
  if grep -q 'requires go >=.*GOTOOLCHAIN=local' "$log"; then
    echo "    (needs newer Go: retrying with GOTOOLCHAIN=$NEWER_GO)" >&2
    GOTOOLCHAIN="$NEWER_GO" go "$@" >>"$log" 2>&1
  else
    return 1
  fi
}

# install_bin TOOL VERSION FILE: move a freshly built FILE into the cache
# atomically (rename within $BIN_DIR) and point the plain name at it.
install_bin() {
  local tool="$1" ver="$2" file="$3"
  mv -f "$file" "$BIN_DIR/.$tool-$ver.tmp"
  chmod 0755 "$BIN_DIR/.$tool-$ver.tmp"
  mv -f "$BIN_DIR/.$tool-$ver.tmp" "$BIN_DIR/$tool-$ver"
  ln -sfn "$tool-$ver" "$BIN_DIR/$tool"
}

# ---- k8s.io/kubernetes ------------------------------------------------------
# k8s.io/kubernetes cannot be `go install`ed: its go.mod requires the staging
# modules (k8s.io/api, client-go, ...) at v0.0.0 and replaces them with
# ./staging/src paths that only exist in its git tree. So we build from a temp
# module that requires k8s.io/kubernetes and replaces every staging module with
# its published release k8s.io/<name> v0.<minor>.<patch>.
k8s_module() {  # k8s_module VERSION LOG -> prints the module dir
  local ver="$1" log="$2" dir="$BUILD_DIR/k8s-$1"
  local stagever="v0.${ver#v1.}"   # v1.34.4 -> v0.34.4
  mkdir -p "$dir"
  # go.sum is complete for the commands listed in tools.go; a module dir made
  # for a shorter list (an older checkout) is tidied again.
  local stamp="$dir/.tidy-${K8S_CMDS// /+}"
  if [[ ! -s "$dir/go.sum" || ! -e "$stamp" ]]; then
    # Read the staging list from kubernetes' own go.mod at this tag.
    local json gomod
    json="$(GOTOOLCHAIN=local go mod download -json "k8s.io/kubernetes@$ver" 2>>"$log")" || {
      echo "$json" >>"$log"; return 1; }
    gomod="$(sed -n 's/^[[:space:]]*"GoMod": "\(.*\)",*$/\1/p' <<<"$json")"
    [[ -f "$gomod" ]] || { echo "no GoMod in: $json" >>"$log"; return 1; }
    local staging
    staging="$(awk '{ for (i = 1; i < NF; i++) if ($i == "=>" && $(i+1) ~ /^\.\/staging\//) print $(i-1) }' "$gomod")"
    [[ -n "$staging" ]] || { echo "no staging replaces in $gomod" >>"$log"; return 1; }
    local goline
    goline="$(awk '$1 == "go" { print $2; exit }' "$gomod")"
    {
      echo "module pullthrough.test/k8s-tools"
      echo
      echo "go $goline"
      echo
      echo "require k8s.io/kubernetes $ver"
      echo
      echo "replace ("
      for m in $staging; do echo "	$m => $m $stagever"; done
      echo ")"
    } >"$dir/go.mod"
    # Blank imports (never compiled: build tag) so `go mod tidy` records
    # every module these commands need in go.mod / go.sum.
    {
      printf '//go:build tools\n\npackage tools\n\nimport (\n'
      for c in $K8S_CMDS; do printf '\t_ "k8s.io/kubernetes/cmd/%s"\n' "$c"; done
      printf ')\n'
    } >"$dir/tools.go"
    (cd "$dir" && run_go "$log" mod tidy) || { rm -f "$dir/go.sum"; return 1; }
    rm -f "$dir"/.tidy-*; : >"$stamp"
  fi
  echo "$dir"
}

build_k8s() {  # build_k8s TOOL VERSION LOG OUT
  local tool="$1" ver="$2" log="$3" out="$4" dir
  dir="$(k8s_module "$ver" "$log")" || return 1
  local minor="${ver#v1.}"; minor="${minor%%.*}"
  # The version vars hack/lib/version.sh sets, so `--version` tells the truth.
  local ld="-s -w" pkg kv key val
  for pkg in k8s.io/client-go/pkg/version k8s.io/component-base/version; do
    for kv in gitVersion="$ver" gitMajor=1 gitMinor="$minor" gitTreeState=clean \
              buildDate="$(date -u +%Y-%m-%dT%H:%M:%SZ)"; do
      key="${kv%%=*}"; val="${kv#*=}"
      ld+=" -X $pkg.$key=$val"
    done
  done
  (cd "$dir" && run_go "$log" build -trimpath -buildvcs=false -ldflags "$ld" \
    -o "$out" "k8s.io/kubernetes/cmd/$tool")
}

# Every k8s.io/kubernetes command the tests run (one module, one go.sum).
K8S_CMDS="kube-apiserver kube-controller-manager kube-scheduler kubelet kube-proxy kubectl"

# ---- plain `go install pkg@version` tools -----------------------------------
# GOBIN points at a temp dir so nothing lands in ~/go/bin.
go_install() {  # go_install PKG VERSION LDFLAGS LOG OUT
  local pkg="$1" ver="$2" ld="$3" log="$4" out="$5" gobin
  gobin="$(mktemp -d "$BUILD_DIR/gobin.XXXXXX")"
  if GOBIN="$gobin" run_go "$log" install -trimpath -buildvcs=false \
       -ldflags "-s -w $ld" "$pkg@$ver"; then
    mv -f "$gobin/${pkg##*/}" "$out"
    rm -rf "$gobin"
  else
    rm -rf "$gobin"; return 1
  fi
}

build_crictl() {
  go_install sigs.k8s.io/cri-tools/cmd/crictl "$2" \
    "-X sigs.k8s.io/cri-tools/pkg/version.Version=$2" "$3" "$4"
}
build_helm() {
  go_install helm.sh/helm/v3/cmd/helm "$2" \
    "-X helm.sh/helm/v3/internal/version.version=$2 -X helm.sh/helm/v3/internal/version.gitTreeState=clean" "$3" "$4"
}
build_kubeconform() {
  go_install github.com/yannh/kubeconform/cmd/kubeconform "$2" \
    "-X main.version=$2" "$3" "$4"
}
build_promtool() {
  go_install github.com/prometheus/prometheus/cmd/promtool "$2" \
    "-X github.com/prometheus/common/version.Version=$2" "$3" "$4"
}
build_oras() {
  go_install oras.land/oras/cmd/oras "$2" \
    "-X oras.land/oras/internal/version.Version=${2#v} -X oras.land/oras/internal/version.BuildMetadata=" "$3" "$4"
}

# SeaweedFS's go.mod has a `replace`, which `go install pkg@version` refuses:
# build inside the downloaded (read-only) module, with its own go.mod/go.sum.
build_weed() {
  local ver="$2" log="$3" out="$4" json dir
  json="$(GOTOOLCHAIN=local go mod download -json "github.com/seaweedfs/seaweedfs@$ver" 2>>"$log")" || {
    echo "$json" >>"$log"; return 1; }
  dir="$(sed -n 's/^[[:space:]]*"Dir": "\(.*\)",*$/\1/p' <<<"$json")"
  [[ -d "$dir" ]] || { echo "no Dir in: $json" >>"$log"; return 1; }
  (cd "$dir" && GOFLAGS=-mod=readonly run_go "$log" build -trimpath -buildvcs=false \
    -ldflags "-s -w" -o "$out" ./weed)
}

# ensure TOOL BUILDER "VERSIONS": use the first cached version, else build the
# versions in order until one works. Prints one status line.
ensure() {
  local tool="$1" builder="$2" versions="$3" start=$SECONDS ver
  for ver in $versions; do
    if [[ -x "$BIN_DIR/$tool-$ver" && ! -d "$BIN_DIR/$tool-$ver" ]]; then
      ln -sfn "$tool-$ver" "$BIN_DIR/$tool"
      printf '%-15s %-8s cached %4ds\n' "$tool" "$ver" $((SECONDS - start))
      return 0
    fi
  done
  for ver in $versions; do
    local log="$BUILD_DIR/$tool-$ver.log" out="$BUILD_DIR/$tool-$ver.out"
    : >"$log"
    echo "  building $tool $ver (log: $log)" >&2
    if "$builder" "$tool" "$ver" "$log" "$out" && [[ -s "$out" ]]; then
      install_bin "$tool" "$ver" "$out"
      printf '%-15s %-8s built  %4ds\n' "$tool" "$ver" $((SECONDS - start))
      return 0
    fi
    rm -f "$out"
    echo "  $tool $ver failed; last lines of $log:" >&2
    tail -n 15 "$log" | sed 's/^/    /' >&2
  done
  printf '%-15s %-8s FAILED %4ds\n' "$tool" "-" $((SECONDS - start))
  FAILED+=("$tool")
}

# ensure_bg TOOL BUILDER "VERSIONS": `ensure` in the background, for a tool
# that shares nothing with the others (its own module): its downloads and
# compiles overlap theirs, filling the cores while the others download or run
# their single-threaded links. Its own process group, so an interrupted run
# stops that whole build too. Collected by wait_bg.
BG_PIDS=()
BG_TOOLS=()
ensure_bg() {
  set -m
  ( ensure "$@"; ((${#FAILED[@]} == 0)) ) &
  set +m
  BG_PIDS+=("$!")
  BG_TOOLS+=("$1")
}
wait_bg() {
  local i
  for i in "${!BG_PIDS[@]}"; do
    wait "${BG_PIDS[$i]}" || FAILED+=("${BG_TOOLS[$i]}")
  done
  BG_PIDS=()
}
stop_bg() {
  local pid
  for pid in "${BG_PIDS[@]}"; do kill -- "-$pid" 2>/dev/null || true; done
}
trap stop_bg EXIT
trap 'stop_bg; exit 130' INT
trap 'stop_bg; exit 143' TERM

total=$SECONDS
# SeaweedFS (the object store of the scale-out tests) first and alongside
# the rest: cold it takes ~7 min, which would otherwise start only after the
# ~11 of the k8s.io/kubernetes builds.
wanted weed && ensure_bg weed build_weed "$WEED_VERSIONS"
for t in kube-apiserver kubectl \
         kube-controller-manager kube-scheduler kubelet kube-proxy; do
  # kube-controller-manager .. kube-proxy: the one-node cluster (tests/tests/cluster.rs).
  wanted "$t" && ensure "$t" build_k8s "$K8S_VERSIONS"
done
wanted crictl      && ensure crictl      build_crictl      "$CRICTL_VERSIONS"
wanted helm        && ensure helm        build_helm        "$HELM_VERSIONS"
wanted kubeconform && ensure kubeconform build_kubeconform "$KUBECONFORM_VERSIONS"
wanted promtool    && ensure promtool    build_promtool    "$PROMTOOL_VERSIONS"
wanted oras        && ensure oras        build_oras        "$ORAS_VERSIONS"
wait_bg
echo "tools in $BIN_DIR ($((SECONDS - total))s)"

if ((${#FAILED[@]})); then
  echo "go-tools.sh: failed to build: ${FAILED[*]}" >&2
  exit 1
fi
