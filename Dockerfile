# The gateway, the certs tool and the device simulator on Debian 12 (slim), running as
# an unprivileged user. packaging/README.md ("Container image") shows how to run it.
#
#   docker build -t iot-gateway .

# --- build -----------------------------------------------------------------------------
# The image's Rust must be at least the workspace's rust-version (Cargo.toml).
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
# The same builds as scripts/build-deb. The caches keep the crate downloads and the
# target directory between builds; the binaries are copied out of the cache (stripped of
# their debug line tables, as in the Debian package).
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p gateway -p certs \
 && cargo build --release --locked -p device-client --features sim --bin device-sim \
 && mkdir /out \
 && for b in gateway certs device-sim; do strip --strip-debug -o "/out/$b" "target/release/$b"; done

# --- runtime ---------------------------------------------------------------------------
FROM debian:bookworm-slim
# A fixed uid/gid, so that mounted certificates can be given to it (chown 10001).
RUN groupadd --gid 10001 iot-gateway \
 && useradd --uid 10001 --gid iot-gateway --no-log-init --no-create-home \
      --home-dir /var/lib/iot-gateway --shell /usr/sbin/nologin iot-gateway \
 && install -d -o iot-gateway -g iot-gateway -m 0700 /var/lib/iot-gateway \
 && install -d -o iot-gateway -g iot-gateway -m 0750 /etc/iot-gateway/certs
COPY --from=build /out/ /usr/bin/
COPY packaging/gateway.toml /etc/iot-gateway/gateway.toml
USER 10001:10001
# The store and API token; the CA, CRL, gateway certificate and key (read only).
VOLUME ["/var/lib/iot-gateway", "/etc/iot-gateway/certs"]
# 7443: devices (mutual TLS). 8080: the operator API, /metrics and the dashboard.
EXPOSE 7443 8080
# SIGTERM: Goodbye to every device, last commit, exit. Give it time:
# docker run --stop-timeout 30 (the default is 10 s). SIGHUP reloads certificates and CRL.
STOPSIGNAL SIGTERM
# The API listens on 127.0.0.1:8080 by default (gateway.toml), which no published port
# reaches from outside the container: --api-listen 0.0.0.0:8080 opens it to the
# container's network. Publish it on the host's loopback (-p 127.0.0.1:8080:8080)
# unless the API must be reached from elsewhere. No ENTRYPOINT, so that
# `docker run IMAGE certs ...` and `docker run IMAGE device-sim ...` work too.
CMD ["gateway", "run", "--config", "/etc/iot-gateway/gateway.toml", "--api-listen", "0.0.0.0:8080"]
