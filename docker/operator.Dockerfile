# syntax=docker/dockerfile:1
# The operator image: wasmfilter-operator built from this repository, on Debian slim, as a non-root user.
#
#   docker build -f docker/operator.Dockerfile -t wasmfilter/operator:dev .
#
# (from the repository root; docker/operator.Dockerfile.dockerignore keeps target/ and the rest out).
# The toolchain is the workspace's rust-version; the runtime is the same Debian release as the
# build image, so the binary's glibc matches.
FROM rust:1.95-trixie AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --locked --release -p wasmfilter-operator --bin wasmfilter-operator \
    && install -m 0755 target/release/wasmfilter-operator /usr/local/bin/wasmfilter-operator

FROM debian:trixie-slim
# The operator pulls modules from registries over HTTPS: it needs the system roots.
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /usr/local/bin/wasmfilter-operator /usr/local/bin/wasmfilter-operator
# The chart runs it as 65532 too (runAsNonRoot needs a numeric user).
USER 65532:65532
EXPOSE 7070 8080
ENTRYPOINT ["/usr/local/bin/wasmfilter-operator"]
