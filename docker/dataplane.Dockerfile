# syntax=docker/dockerfile:1
# The dataplane image: wasmfilter-dataplane built from this repository, on Debian slim, as a non-root user.
#
#   docker build -f docker/dataplane.Dockerfile -t wasmfilter/dataplane:dev .
#
# (from the repository root; docker/dataplane.Dockerfile.dockerignore keeps target/ and the rest out).
# The toolchain is the workspace's rust-version; the runtime is the same Debian release as the
# build image, so the binary's glibc matches.
FROM rust:1.95-trixie AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --locked --release -p wasmfilter-dataplane --bin wasmfilter-dataplane \
    && install -m 0755 target/release/wasmfilter-dataplane /usr/local/bin/wasmfilter-dataplane

FROM debian:trixie-slim
# The dataplane fetches modules from the operator and may proxy to HTTPS upstreams.
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /usr/local/bin/wasmfilter-dataplane /usr/local/bin/wasmfilter-dataplane
# The chart runs it as 65532 too (runAsNonRoot needs a numeric user).
USER 65532:65532
EXPOSE 8080 9901
ENTRYPOINT ["/usr/local/bin/wasmfilter-dataplane"]
