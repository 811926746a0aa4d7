# syntax=docker/dockerfile:1
#
# Multi-arch image: linux/amd64, linux/arm64 (Pi 3/4/5, 64-bit OS), linux/arm/v7 (32-bit OS).
#   docker buildx build --platform linux/amd64,linux/arm64,linux/arm/v7 -t mqtt-lambda-bridge .
# The build stage runs on the builder's own platform and cross-compiles with Debian's cross gcc,
# so no stage runs under emulation. scripts/docker-replay.sh replays the build stage on this
# machine, with the context laid out as the COPY lines below and .dockerignore make it.

# ---- build ----
FROM --platform=$BUILDPLATFORM rust:1-bookworm AS builder
ARG TARGETPLATFORM
# Cargo profile of the binary.
ARG PROFILE=release
WORKDIR /src

# The whole context, filtered by .dockerignore: whatever Cargo.toml declares (benches, tests,
# build scripts) is there, so this cannot drift from it. Dependencies stay cached across builds
# in the cache mounts below instead of in a placeholder layer.
COPY . .

# The Rust target and Debian's cross gcc (linker and C compiler for ring) for TARGETPLATFORM;
# nothing to install when it is the builder's own. .cargo/config.toml names the ARM linkers;
# x86_64's is set here for builders that are not x86_64 (on x86_64 it is the native gcc).
# hadolint ignore=DL3008
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,target=/src/target,id=mlb-target-${TARGETPLATFORM},sharing=locked \
    set -eu; \
    case "${TARGETPLATFORM:-linux/amd64}" in \
      linux/amd64)  triple=x86_64-unknown-linux-gnu;      gnu=x86-64-linux-gnu;    arch=amd64 ;; \
      linux/arm64)  triple=aarch64-unknown-linux-gnu;     gnu=aarch64-linux-gnu;   arch=arm64 ;; \
      linux/arm/v7) triple=armv7-unknown-linux-gnueabihf; gnu=arm-linux-gnueabihf; arch=armhf ;; \
      *) echo "unsupported platform ${TARGETPLATFORM}: use linux/amd64, linux/arm64 or linux/arm/v7" >&2; exit 1 ;; \
    esac; \
    if [ "$(dpkg --print-architecture)" != "$arch" ]; then \
      apt-get update; \
      apt-get install -y --no-install-recommends "gcc-${gnu}" "libc6-dev-${arch}-cross"; \
      rm -rf /var/lib/apt/lists/*; \
    fi; \
    rustup target add "$triple"; \
    export CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_LINKER=x86_64-linux-gnu-gcc \
      CC_x86_64_unknown_linux_gnu=x86_64-linux-gnu-gcc; \
    cargo build --locked --profile "$PROFILE" --target "$triple"; \
    mkdir -p out/state; \
    cp "target/${triple}/${PROFILE}/mqtt-lambda-bridge" out/

# ---- runtime ----
# No RUN here: nothing in this stage needs the target's CPU, so buildx needs no qemu.
FROM debian:bookworm-slim

# CA certificates for HTTPS to Lambda and for mqtts:// brokers.
COPY --from=builder /etc/ssl/certs/ca-certificates.crt /etc/ssl/certs/ca-certificates.crt
COPY --from=builder /src/out/mqtt-lambda-bridge /usr/local/bin/mqtt-lambda-bridge
# The durable buffer (buffer.dir's default), owned by the unprivileged user below. It exists
# before VOLUME so that a fresh named volume inherits its ownership.
COPY --from=builder --chown=10001:10001 --chmod=0700 /src/out/state /var/lib/mqtt-lambda-bridge
VOLUME /var/lib/mqtt-lambda-bridge

# Mount the configuration at /etc/mqtt-lambda-bridge/config.toml (read-only is fine);
# MLB_ environment variables override it, e.g. MLB_MQTT__PASSWORD. Set mqtt.client_id there:
# the default derives from the hostname, which changes with every new container, and the
# broker keeps the persistent session under the client id.
ENV RUST_LOG=info
# A numeric user with no entry in /etc/passwd: the daemon needs no home and no name.
USER 10001:10001

# Healthy when the metrics listener answers 200 on /readyz (connected to the broker). It needs
# `[metrics] listen` on port 9898 in the config (compose.yaml's config has it).
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["mqtt-lambda-bridge", "probe", "http://127.0.0.1:9898/readyz"]

# SIGTERM starts a graceful shutdown bounded by shutdown_timeout (default 8s), inside
# `docker stop`'s default 10s grace period.
STOPSIGNAL SIGTERM
ENTRYPOINT ["mqtt-lambda-bridge"]
CMD ["run", "--config", "/etc/mqtt-lambda-bridge/config.toml"]
