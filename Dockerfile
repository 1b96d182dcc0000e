# syntax=docker/dockerfile:1
#
# Lighter's image: the one `lighter` binary. In Kubernetes it runs twice in one pod, as
# `lighter data-plane` and `lighter control-plane` (see deploy/); `docker run IMAGE` runs
# `lighter serve`, which supervises both.
#
#   docker build -t lighter:0.1.0 .
#   docker run -p 5000:5000 -v lighter-data:/var/lib/lighter lighter:0.1.0
#
# A glibc build on distroless/cc, not a static musl one: musl's allocator is much slower than
# glibc's under the control plane's many-threaded allocation pattern (hyper, tokio, rustls), and
# the builder (Debian 12, glibc 2.36) matches the runtime image (distroless cc-debian12, the
# same glibc), so no cross toolchain is involved. The binary needs only libc, libm and
# libgcc_s, all in distroless/cc; reqwest uses rustls with built-in roots, so no system CA
# bundle is needed either.

FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
# The caches keep the crates.io downloads and the target directory between builds (BuildKit);
# the binary is copied out of the cached target directory in the same step.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin lighter \
 && install -D -m 0755 target/release/lighter /out/bin/lighter \
 && install -d -o 65532 -g 65532 -m 0750 /out/data

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/bin/lighter /usr/local/bin/lighter
# An empty data directory owned by the runtime user, so that a fresh Docker volume mounted here
# is writable (Kubernetes makes its volumes writable with fsGroup instead).
COPY --from=build --chown=65532:65532 /out/data /var/lib/lighter
USER 65532:65532
EXPOSE 5000 8443
ENTRYPOINT ["/usr/local/bin/lighter"]
CMD ["serve", "--listen", "0.0.0.0:5000", "--data-dir", "/var/lib/lighter"]
