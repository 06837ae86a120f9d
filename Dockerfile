# syntax=docker/dockerfile:1

# ws_echo in a container: built with the pinned toolchain from Cargo.lock, run as an
# unprivileged user on debian:bookworm-slim.
#
#   docker build -t ws-echo .
#   docker run --rm -p 3001:3001 ws-echo
#
# bookworm-slim rather than distroless: HEALTHCHECK needs a shell, and bash's /dev/tcp
# is one without installing curl. The binary needs nothing but glibc, which matches the
# bookworm builder: it is Rust (zlib-rs, no OpenSSL) plus jemalloc, linked statically.

ARG RUST_VERSION=1.95

FROM rust:${RUST_VERSION}-slim-bookworm AS builder
# jemalloc (the binary's allocator, built by tikv-jemalloc-sys) needs make.
RUN apt-get update \
    && apt-get install -y --no-install-recommends make=4.3-4.1 \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
# BuildKit keeps the registry and target directories between builds. The target cache
# is not part of the image, so the binary is copied out of it in the same step.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin ws_echo \
    && install -D -m 0755 target/release/ws_echo /out/ws_echo

FROM debian:bookworm-slim
# A fixed numeric id, so that Kubernetes' runAsNonRoot can verify it.
RUN groupadd --system --gid 10001 ws_echo \
    && useradd --system --uid 10001 --gid 10001 --no-create-home \
       --home-dir /nonexistent --shell /usr/sbin/nologin ws_echo
COPY --from=builder /out/ws_echo /usr/local/bin/ws_echo
USER 10001:10001

# All interfaces: the container's port is published by Docker or a Service.
ENV WS_ECHO_LISTEN=0.0.0.0:3001
# `docker stop` sends SIGKILL 10 s after SIGTERM. The drain (echo what was received,
# Close 1001, wait for the answers) gets 8 s of those, so it ends before the kill.
# Give it longer with `docker stop -t` / `stop_grace_period` and a larger value here;
# deploy/kubernetes sets 10 s with a 30 s grace period.
ENV WS_ECHO_SHUTDOWN_TIMEOUT=8s
EXPOSE 3001

# GET /healthz over bash's /dev/tcp, on the port WS_ECHO_LISTEN names (or PORT, or
# 3001). It passes only on a `200` status line. .ci/validate-deploy.sh runs this exact
# command against the real binary.
HEALTHCHECK --interval=15s --timeout=3s --start-period=5s --retries=3 \
    CMD ["/bin/bash", "-c", "listen=${WS_ECHO_LISTEN:-:${PORT:-3001}}; exec 3<>/dev/tcp/127.0.0.1/${listen##*:} && printf 'GET /healthz HTTP/1.1\\r\\nHost: localhost\\r\\nConnection: close\\r\\n\\r\\n' >&3 && IFS= read -r -t 2 status <&3 && [[ $status == 'HTTP/1.1 200 '* ]]"]

# The drain starts on SIGTERM (and Ctrl-C); this is Docker's default, stated for readers.
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/ws_echo"]
