//! The checked-in code of the control protocol (src/proto/) is what tonic-prost-build makes of
//! proto/ today. The .proto files are parsed by protox, a protobuf compiler written in Rust, so
//! neither this test nor building the crate needs `protoc`.

use std::path::PathBuf;

const REGENERATE: &str = "WASMFILTER_REGENERATE=1 cargo test -p wasmfilter-api --test proto";
const GENERATED: &str = "wasmfilter.control.v1alpha1.rs";

#[test]
fn generated_code_matches_the_proto() {
    let api = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let out = tempfile_dir();
    let proto = api.join("proto/wasmfilter/control/v1alpha1/control.proto");
    // What `protoc --include_imports --include_source_info` would give prost-build: source info
    // carries the comments into the generated code.
    let descriptors = protox::compile([&proto], [api.join("proto")])
        .unwrap_or_else(|e| panic!("parsing {}: {e:?}", proto.display()));
    tonic_prost_build::configure()
        .out_dir(&out)
        .emit_rerun_if_changed(false)
        // No `connect` helper: the dataplane builds its own Channel (TLS, keepalives), and the
        // api crate stays free of tonic's transport.
        .build_transport(false)
        // `bytes` fields as `Bytes`: module chunks are slices of one buffer, not copies.
        .bytes(".")
        // `compile_protos` adds this attribute to every type itself; `compile_fds` does not.
        .type_attribute(".", "#[allow(clippy::all)]")
        .compile_fds(descriptors)
        .unwrap_or_else(|e| panic!("generating the control protocol: {e}"));
    let fresh = std::fs::read_to_string(out.join(GENERATED)).unwrap();
    let checked_in_path = api.join("src/proto").join(GENERATED);
    if std::env::var_os("WASMFILTER_REGENERATE").is_some() {
        std::fs::write(&checked_in_path, &fresh).unwrap();
        return;
    }
    let checked_in = std::fs::read_to_string(&checked_in_path).unwrap_or_default();
    assert!(
        checked_in == fresh,
        "{} is out of date with proto/; regenerate it with:\n    {REGENERATE}",
        checked_in_path.display()
    );
}

fn tempfile_dir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("wasmfilter-proto-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}
