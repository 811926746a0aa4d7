# syntax=docker/dockerfile:1

# ---- build ----
FROM rust:1-bookworm AS builder
WORKDIR /src

# Build the dependencies alone first, against placeholder sources, so that this layer stays
# cached until Cargo.toml or Cargo.lock change.
COPY Cargo.toml Cargo.lock ./
RUN mkdir src \
 && echo 'fn main() {}' > src/main.rs \
 && touch src/lib.rs \
 && cargo build --release --locked \
 && rm -rf src

# Now the real sources. COPY keeps the files' original timestamps, which can be older than the
# placeholders; touch them so cargo rebuilds the crate itself.
COPY src ./src
RUN touch src/main.rs src/lib.rs \
 && cargo build --release --locked

# ---- runtime ----
FROM debian:bookworm-slim

# CA certificates for HTTPS to Lambda and for mqtts:// brokers; nothing else is needed.
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/*

# An unprivileged user owning the buffer directory. The directory is created before VOLUME
# so that a fresh named volume inherits its ownership.
RUN groupadd --system --gid 10001 mlb \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin mlb \
 && mkdir -p /var/lib/mqtt-lambda-bridge /etc/mqtt-lambda-bridge \
 && chown 10001:10001 /var/lib/mqtt-lambda-bridge \
 && chmod 0700 /var/lib/mqtt-lambda-bridge

COPY --from=builder /src/target/release/mqtt-lambda-bridge /usr/local/bin/mqtt-lambda-bridge

# The durable buffer (buffer.dir's default): keep it on a volume so it survives the container.
VOLUME /var/lib/mqtt-lambda-bridge

# Mount the configuration at /etc/mqtt-lambda-bridge/config.toml (read-only is fine);
# MLB_ environment variables override it, e.g. MLB_MQTT__PASSWORD. Set mqtt.client_id there:
# the default derives from the hostname, which changes with every new container, and the
# broker keeps the persistent session under the client id.
ENV RUST_LOG=info
USER 10001:10001

# SIGTERM starts a graceful shutdown bounded by shutdown_timeout (default 8s), inside
# `docker stop`'s default 10s grace period.
STOPSIGNAL SIGTERM
ENTRYPOINT ["mqtt-lambda-bridge"]
CMD ["run", "--config", "/etc/mqtt-lambda-bridge/config.toml"]
